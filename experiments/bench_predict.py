"""Predict throughput on real bach-dev files: streamed through a DataLoader vs one at a time.

Baseline: what ``stages=[predict]`` did before: each file decoded, Macenko-normalised, tiled and
embedded in the main process, one image at a time. Streamed: the predict stage's path now,
``ImageFiles`` decoded/normalised/tiled in 0 or 2 DataLoader workers, several images per
batch, through ``Trainer.predict``. Both without and with 8-view TTA. MobileNetV2 (random
weights: speed does not depend on them) at bach_cpu's first tiling (512-px tiles -> 224-px
patches, 9 per 1536x1536 image), mean-probability aggregator. The image probabilities of both paths
are compared, so the speed-up is of the same computation.

    .venv/bin/python experiments/bench_predict.py [--data DIR] [--n 12]

Prints images/s of each setting and its ratio to the baseline with the same TTA setting.
"""

import argparse
import os
import platform
import time
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from breastnet.data.bach import read_rgb
from breastnet.data.datasets import pad_collate, to_tensor
from breastnet.data.stain import MacenkoNormalizer
from breastnet.data.store import StainSettings, Tiling, normalise_and_tile
from breastnet.inference.embedder import Embedder
from breastnet.inference.files import ImageFiles
from breastnet.models.aggregators import MeanProbs
from breastnet.models.backbone import build_backbone
from breastnet.models.embedding import embed_patches

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    default_data = os.environ.get(
        "BREASTNET_BACH_DEV", ROOT.parent / "shared" / "data" / "bach-dev"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--n", type=int, default=12, help="images (every k-th file)")
    parser.add_argument("--images-per-batch", type=int, default=4)
    parser.add_argument(
        "--chunk", type=int, default=64, help="patches per forward call (features.batch_size)"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to time"
    )
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--patch-size", type=int, default=224)
    return parser.parse_args()


@torch.no_grad()
def one_at_a_time(files: list[Path], tiling: Tiling, stain: StainSettings, net, tta, chunk):
    """The former predict loop: everything in the main process, image by image."""
    normalizer, aggregator, out = stain.normalizer(), MeanProbs(), []
    for path in files:
        patches, positions = normalise_and_tile(read_rgb(path)[0], tiling, normalizer)
        features, probs = embed_patches(net, to_tensor(patches), chunk, tta)
        mask = torch.ones(1, len(probs), dtype=torch.bool)
        logits = aggregator(features[None], mask, torch.as_tensor(positions)[None], probs[None])
        out.append(logits["logits"].softmax(1)[0])
    return torch.stack(out)


def streamed(files: list[Path], root: Path, tiling, stain, net, tta, workers, batch, chunk):
    """The predict stage's path: ImageFiles in DataLoader workers, then Trainer.predict."""
    loader = DataLoader(
        ImageFiles(files, root, tiling, stain),
        batch_size=batch,
        num_workers=workers,
        collate_fn=pad_collate,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    batches = trainer.predict(Embedder(net, MeanProbs(), chunk, tta), loader)
    return torch.stack([image["image_probs"] for batch in batches for image in batch])


def timed(run) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    probs = run()
    return time.perf_counter() - start, probs


def main() -> None:
    args = parse_args()
    every = sorted(args.data.rglob("*.jpeg"))
    files = every[:: max(1, len(every) // args.n)][: args.n]
    tiling = Tiling(args.tile_size, args.tile_size, args.patch_size)
    stain = StainSettings(MacenkoNormalizer().fit(read_rgb(files[0])[0]).reference)
    net = build_backbone("mobilenet_v2", weights="none").eval()
    print(
        f"{len(files)} images, tiling {args.tile_size} -> {args.patch_size} px, "
        f"{args.chunk} patches per forward, "
        f"{args.images_per_batch} images per batch, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, {platform.processor()}"
    )
    baseline = partial(one_at_a_time, files, tiling, stain, net, chunk=args.chunk)
    stream = partial(
        streamed,
        files,
        args.data,
        tiling,
        stain,
        net,
        batch=args.images_per_batch,
        chunk=args.chunk,
    )
    stream(tta=False, workers=0)  # warm-up
    print(f"{'setting':<34} {'images/s':>9} {'vs baseline':>12} {'max |dp|':>9}")
    for tta in (False, True):
        seconds, reference = timed(partial(baseline, tta=tta))
        label = f"TTA {'on' if tta else 'off'}"
        print(f"{'one at a time, ' + label:<34} {len(files) / seconds:9.2f} {1.0:12.2f}")
        for workers in args.workers:
            took, probs = timed(partial(stream, tta=tta, workers=workers))
            name = f"streamed, {workers} workers, {label}"
            gap = float((probs - reference).abs().max())
            print(f"{name:<34} {len(files) / took:9.2f} {seconds / took:12.2f} {gap:9.1e}")


if __name__ == "__main__":
    main()
