"""Time a patch-model training step (eager against tuned) and the patch DataLoader per worker.

1. ``PatchClassifier`` with a randomly initialised Inception-V3 (aux head on, SGD) on
   synthetic uint8 299 px batches: forward + loss (``model_step``) + backward + optimizer
   step, warm-up steps excluded. "eager" is fp32 NCHW; "tuned" is channels_last, plus bf16
   autocast and ``torch.compile`` when CUDA is available.
2. The training DataLoader of ``BreastDataModule`` (paper augmentation: H&E jitter
   U(0.7, 1.3) with the reference stains, rot90, flip) over the bach-dev patch cache, with
   ``num_workers=0`` (one process doing the loading) and ``num_workers=2`` (the total), and
   its parts on their own (mmap patch read, bare ``HEJitter``, the whole transform,
   ``__getitem__``, ``default_collate``), so a reader sees where the time goes. The per-worker
   rate is ``num_workers=0`` with 1 torch thread, as torch sets inside every DataLoader worker;
   the rate with the default threads (what ``num_workers=0`` training gets) is printed too.

    .venv/bin/python experiments/bench_train_step.py [--data DIR] [--work-dir DIR]

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``) unless the environment sets the
policy: on a shared, busy machine spinning threads stall every parallel region (measured here:
several times slower training steps, 60-160x slower ``default_collate``; RESULTS.md).
``OMP_WAIT_POLICY=default`` measures libgomp's own default (spin a while, then sleep).

The last two lines are ``train_step_speedup_tuned_vs_eager: <ratio>`` and
``loader_patches_per_s_per_worker: <n>``.
"""

# ruff: noqa: E402
import os

# Read once, when libgomp loads with torch. "default" drops the variable: libgomp's own default.
if os.environ.get("OMP_WAIT_POLICY", "").lower() == "default":
    del os.environ["OMP_WAIT_POLICY"]
else:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from breastnet.data.datamodule import BreastDataModule
from breastnet.data.datasets import PatchDataset, to_tensor
from breastnet.data.prepare import build
from breastnet.data.transforms import HEJitter
from breastnet.models.backbone import build_backbone
from breastnet.models.patch_classifier import PatchClassifier

ROOT = Path(__file__).resolve().parents[1]


def parse_args(cuda: bool) -> argparse.Namespace:
    """Command-line settings; step counts and batch size default by device."""
    default_data = os.environ.get(
        "BREASTNET_BACH_DEV", ROOT.parent / "shared" / "data" / "bach-dev"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/breastnet-bench"))
    parser.add_argument("--batch-size", type=int, default=64 if cuda else 16)
    parser.add_argument("--steps", type=int, default=30 if cuda else 5)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument(
        "--loader-batches", type=int, default=12, help="timed loader batches of 64 (0: an epoch)"
    )
    parser.add_argument("--part-samples", type=int, default=400, help="samples per part timing")
    parser.add_argument("--backbone", default="inception_v3", help="conf/patch_model name")
    parser.add_argument("--tile-size", type=int, default=512, help="cache tiles (px)")
    parser.add_argument("--patch-size", type=int, default=299, help="patches (px)")
    return parser.parse_args()


def machine(device: torch.device) -> str:
    """CPU model, cores, torch version and threads, OpenMP wait policy and device."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default)")
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={policy}, device {device}{gpu}"
    )


def load_average() -> str:
    """The 1-minute load average: other processes on the machine skew CPU timings."""
    return Path("/proc/loadavg").read_text().split()[0]


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(tuned: bool, device: torch.device, args: argparse.Namespace) -> tuple[float, float]:
    """Patches/s of full training steps after ``args.warmup`` steps, and the last loss."""
    cuda = device.type == "cuda"
    batch_size, size = args.batch_size, args.patch_size
    torch.manual_seed(0)
    model = PatchClassifier(
        build_backbone(args.backbone, weights="none"),
        optimizer=partial(torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=1e-4),
        channels_last=tuned,
    ).to(device)
    if tuned and cuda:
        model.net.compile()  # what PatchClassifier.setup does under a Trainer (compile=True)
    model.train()
    optimizer = model.configure_optimizers()["optimizer"]
    generator = torch.Generator().manual_seed(0)
    batch = {
        "x": torch.randint(
            0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator
        ).to(device),
        "y": torch.randint(0, 4, (batch_size,), generator=generator).to(device),
    }
    bf16 = tuned and cuda
    autocast = torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _, _ = model.model_step(batch)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    return args.steps * batch_size / seconds, float(loss.detach())


def build_datamodule(data: Path, work_dir: Path, tile_size: int, size: int) -> BreastDataModule:
    """The patch DataModule with Macenko stains and the paper's augmentation, cache built."""
    dm = BreastDataModule(
        data_dir=str(data),
        work_dir=str(work_dir),
        stain=OmegaConf.create(
            {
                "method": "macenko",
                "reference": "auto",
                "solver": "lstsq",
                "luminosity_threshold": 0.8,
                "angular_percentile": 99,
            }
        ),
        augment=OmegaConf.create({"he_jitter": [0.7, 1.3], "rot90": True, "flip": True}),
        mode="patch",
        tile_size=tile_size,
        stride=tile_size,
        patch_size=size,
        num_workers=0,
        prepare_workers=2,
        batch_size=64,
    )
    build(dm.hparams)  # reuses a built cache
    dm.setup()
    return dm


def rate(fn: Callable[[int], object], n: int) -> float:
    """Calls per second of ``fn(i)`` for i in 0..n-1, after one untimed call."""
    fn(0)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def part_rates(dataset: PatchDataset, n: int) -> dict[str, float]:
    """Samples/s of each piece of ``PatchDataset.__getitem__`` on its own, in this process."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(dataset))[:n]
    n = len(order)
    items = [dataset.items[i] for i in order]
    cache, transform = dataset.cache, dataset.transform
    patches = [np.array(cache.load(image_id)[k]) for image_id, k, _ in items]
    jitter = next(t for t in transform.transforms if isinstance(t, HEJitter))
    open_maps = {image_id: cache.load(image_id) for image_id, _, _ in items}
    return {
        "mmap patch read (np.load per sample, as __getitem__)": rate(
            lambda i: np.array(cache.load(items[i][0])[items[i][1]]), n
        ),
        "mmap patch read (arrays kept open)": rate(
            lambda i: np.array(open_maps[items[i][0]][items[i][1]]), n
        ),
        "HEJitter alone": rate(lambda i: jitter(image=patches[i])["image"], n),
        "train transform (jitter + rot90 + flip)": rate(
            lambda i: transform(image=patches[i])["image"], n
        ),
        "HWC -> CHW tensor (to_tensor)": rate(lambda i: to_tensor(patches[i]), n),
        "PatchDataset.__getitem__ (all of the above)": rate(lambda i: dataset[int(order[i])], n),
    }


def batches(loader: torch.utils.data.DataLoader, limit: int) -> Iterator[int]:
    """Sizes of the first ``limit`` batches (all when 0), iterating the loader once."""
    for i, batch in enumerate(loader):
        if limit and i >= limit:
            return
        yield len(batch["y"])


def loader_rate(dm: BreastDataModule, workers: int, limit: int) -> tuple[float, float]:
    """Patches/s of the training DataLoader: steady (after the first batch) and overall."""
    dm.hparams.num_workers = workers
    loader = dm.train_dataloader()
    start = time.perf_counter()
    sizes = batches(loader, limit + 1)
    first = next(sizes)
    after_first = time.perf_counter()
    rest = sum(sizes)
    end = time.perf_counter()
    return rest / (end - after_first), (first + rest) / (end - start)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, as a DataLoader worker does (it sets 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def collate_rate(dataset: PatchDataset, batch_size: int, repeats: int = 3) -> float:
    """Samples/s of ``default_collate`` on one batch of ready samples (the DataLoader's stack)."""
    samples = [dataset[i] for i in range(batch_size)]
    return batch_size * rate(lambda i: default_collate(samples), repeats)


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args = parse_args(cuda)
    print(machine(device))
    print(f"load average (1 min) at start: {load_average()}")

    tuned_name = "channels_last + bf16 autocast + torch.compile" if cuda else "channels_last"
    print(
        f"\n== training step: {args.backbone} (aux on where it has one), SGD, "
        f"{args.patch_size} px, batch "
        f"{args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up =="
    )
    rates = {}
    for name, tuned in (("eager", False), ("tuned", True)):
        patches_per_s, loss = train_rate(tuned, device, args)
        rates[name] = patches_per_s
        label = "fp32 NCHW" if not tuned else tuned_name
        print(
            f"{name:6s} {patches_per_s:8.2f} patches/s  "
            f"{args.batch_size / patches_per_s:7.3f} s/step  loss {loss:.3f}  ({label})"
        )
    speedup = rates["tuned"] / rates["eager"]
    print(f"load average (1 min) after training steps: {load_average()}")

    print(f"\n== loader: {args.patch_size} px patches from the cache, paper augmentation ==")
    start = time.perf_counter()
    dm = build_datamodule(args.data, args.work_dir, args.tile_size, args.patch_size)
    dataset = dm.datasets["train"]
    print(
        f"data module ready in {time.perf_counter() - start:.1f} s "
        f"(cache {dm.prepared.cache.root}); train: {len(dataset)} patches"
    )
    for name, value in part_rates(dataset, args.part_samples).items():
        print(f"{name:56s} {value:8.0f} /s")
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        with torch_threads(n):
            value = collate_rate(dataset, dm.hparams.batch_size)
        print(f"{f'default_collate, batch 64, {n} torch thread(s)':56s} {value:8.0f} /s")
    main_process, main_process_all = loader_rate(dm, 0, args.loader_batches)
    with torch_threads(1):
        per_worker, per_worker_all = loader_rate(dm, 0, args.loader_batches)
    total, total_all = loader_rate(dm, 2, args.loader_batches)
    rows = (
        (f"num_workers=0, {threads} torch threads (main process)", main_process, main_process_all),
        ("num_workers=0, 1 torch thread (= one worker)", per_worker, per_worker_all),
        ("num_workers=2 (total)", total, total_all),
    )
    for name, steady, overall in rows:
        print(
            f"{'DataLoader ' + name:56s} {steady:8.0f} patches/s "
            f"(incl. first batch / worker start-up: {overall:.0f})"
        )
    print(f"load average (1 min) at end: {load_average()}")
    print(f"train_step_speedup_tuned_vs_eager: {speedup:.2f}")
    print(f"loader_patches_per_s_per_worker: {per_worker:.0f}")


if __name__ == "__main__":
    main()
