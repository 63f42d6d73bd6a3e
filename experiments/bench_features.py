"""Features-stage throughput (tiles/s) of patch encoders, against MobileNetV2 in the same run.

Each encoder embeds the same random uint8 224 px tiles through the features stage's own path
(``embed_patches``: normalisation, ``forward_features``, head and softmax), in chunks of
``--chunk`` tiles (``features.batch_size``), after one warm-up chunk. Random weights: speed
does not depend on them. An encoder is ``mobilenet_v2`` (or any torchvision registry name),
an entry of ``conf/patch_model/`` (``uni2_h``: its architecture and kwargs), or any timm
model name. With CUDA, ``--gpu`` adds the ``--gpu-models`` in bf16 autocast with
``torch.compile``; without CUDA those rows are skipped, saying so.

    .venv/bin/python experiments/bench_features.py [--tiles 64] [--chunk 16] [--threads 2]
    .venv/bin/python experiments/bench_features.py --gpu --tiles 2048 --chunk 256

Prints one row per encoder: parameters, tiles/s and the ratio to the first (baseline) row.
"""

import argparse
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from breastnet.models.backbone import PatchNet, build_backbone
from breastnet.models.embedding import embed_patches
from breastnet.models.registry import BACKBONES
from breastnet.models.timm_backbone import TimmBackbone

CONF = Path(__file__).resolve().parents[1] / "conf" / "patch_model"
CPU_MODELS = ("mobilenet_v2", "vit_small_patch16_224", "vit_base_patch16_224")
GPU_MODELS = ("mobilenet_v2", "vit_base_patch16_224", "uni", "uni2_h", "h_optimus_0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CPU_MODELS), help="CPU rows")
    parser.add_argument("--tiles", type=int, default=64, help="tiles timed per encoder")
    parser.add_argument("--chunk", type=int, default=16, help="tiles per forward call")
    parser.add_argument("--size", type=int, default=224, help="tile side in px")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gpu", action="store_true", help="also the GPU rows (bf16, compile)")
    parser.add_argument("--gpu-models", nargs="+", default=list(GPU_MODELS))
    return parser.parse_args(argv)


def build(name: str) -> PatchNet:
    """A random-init encoder: torchvision registry name, conf/patch_model entry, or timm name."""
    if name in BACKBONES:
        return build_backbone(name, weights="none")
    if (CONF / f"{name}.yaml").is_file():
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return instantiate(compose(name).net, weights="none")
    return TimmBackbone(name)


@torch.inference_mode()
def tiles_per_second(net: PatchNet, tiles: torch.Tensor, chunk: int, bf16: bool) -> float:
    """Tiles/s of ``embed_patches`` over ``tiles`` after one warm-up chunk."""
    device = tiles.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        embed_patches(net, tiles[:chunk], chunk)  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        embed_patches(net, tiles, chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(tiles) / (time.perf_counter() - start)


def rows(names: list[str], args: argparse.Namespace, device: str) -> list[tuple[str, int, float]]:
    """(encoder, parameters, tiles/s) on ``device``; on CUDA in bf16 with compile."""
    gen = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (args.tiles, 3, args.size, args.size), generator=gen)
    tiles = tiles.to(torch.uint8).to(device)
    found = []
    for name in names:
        net = build(name).eval().to(device)
        if device == "cuda":
            net.forward_features = torch.compile(net.forward_features)
        speed = tiles_per_second(net, tiles, args.chunk, bf16=device == "cuda")
        found.append((name, sum(p.numel() for p in net.parameters()), speed))
        del net
    return found


def show(title: str, found: list[tuple[str, int, float]]) -> None:
    base = found[0][2]
    print(f"\n{title}\n| encoder | parameters | tiles/s | vs {found[0][0]} |")
    print("| --- | --- | --- | --- |")
    for name, params, speed in found:
        print(f"| {name} | {params / 1e6:.1f} M | {speed:.1f} | {speed / base:.3f}x |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch "
        f"{torch.__version__}; {args.tiles} tiles of {args.size} px, chunks of {args.chunk}"
    )
    show("CPU, float32", rows(args.models, args, "cpu"))
    if args.gpu and torch.cuda.is_available():
        show(f"{torch.cuda.get_device_name()}, bf16, compile", rows(args.gpu_models, args, "cuda"))
    elif args.gpu:
        print("\nno CUDA device: the GPU rows (bf16, compile) are skipped")


if __name__ == "__main__":
    main()
