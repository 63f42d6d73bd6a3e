"""Time normalise + tile on real bach-dev images: ours (lstsq, lasso) against staintools.

Everything runs on one core, pinned before numpy, spams and OpenCV start their thread pools,
so neither side wins by threads. All methods are fitted to the same reference image, chosen
by ``pick_reference``; differences are measured on the final uint8 patches.

    .venv/bin/python experiments/bench_prepare.py [--data DIR] [--n 8]

The last line is ``prepare_speedup_vs_staintools: <ratio>``.
"""

# ruff: noqa: E402
import os

os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from staintools import StainNormalizer

from breastnet.data.stain import MacenkoNormalizer, pick_reference
from breastnet.data.tiling import tile_image
from breastnet.data.transforms import HEJitter, build_transforms

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("Normal", "Benign", "InSitu", "Invasive")


def parse_args() -> argparse.Namespace:
    default_data = os.environ.get(
        "BREASTNET_BACH_DEV", ROOT.parent / "shared" / "data" / "bach-dev"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--n", type=int, default=8, help="images, spread over the 4 classes")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="default: the tile size")
    parser.add_argument("--patch-size", type=int, default=299)
    parser.add_argument("--jitter-seconds", type=float, default=3.0)
    return parser.parse_args()


def pick_images(data: Path, n: int) -> list[Path]:
    """``n`` images, class by class in turn, evenly spaced within each class."""
    per_class = -(-n // len(CLASSES))
    chosen = []
    for name in CLASSES:
        files = sorted((data / name).glob("*.*"))
        chosen.append(
            [files[i * len(files) // per_class] for i in range(min(per_class, len(files)))]
        )
    ordered = [paths[i] for i in range(per_class) for paths in chosen if i < len(paths)]
    return ordered[:n]


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def run(
    normalise: Callable[[np.ndarray], np.ndarray], images: list[np.ndarray], args
) -> tuple[float, np.ndarray]:
    """Seconds per image for normalise + tile (after one warm-up), and all patches."""
    stride = args.stride or args.tile_size
    normalise(images[0])
    patches, seconds = [], 0.0
    for image in images:
        start = time.perf_counter()
        tiles, _ = tile_image(normalise(image), args.tile_size, stride, args.patch_size)
        seconds += time.perf_counter() - start
        patches.append(tiles)
    return seconds / len(images), np.concatenate(patches)


def throughput(transform: Callable[[np.ndarray], np.ndarray], patches: np.ndarray, budget: float):
    """Patches per second of ``transform``, cycling over ``patches`` for ``budget`` seconds."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        transform(patches[count % len(patches)])
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    cv2.setNumThreads(1)
    paths = pick_images(args.data, args.n)
    images = [read_rgb(p) for p in paths]
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    print(f"machine: {cpu}, {os.cpu_count()} cores, benchmark pinned to 1 core")
    print(f"images: {len(images)} ({', '.join(p.parent.name + '/' + p.name for p in paths)})")
    print(f"shape: {images[0].shape}, tile {args.tile_size}, patch {args.patch_size}")

    ref_index = pick_reference([im[::4, ::4] for im in images])
    reference = images[ref_index]
    print(f"reference: {paths[ref_index].parent.name}/{paths[ref_index].name}")
    theirs = StainNormalizer("macenko")
    theirs.fit(reference.copy())
    ours = MacenkoNormalizer(solver="lstsq").fit(reference)
    lasso = MacenkoNormalizer(solver="lasso").fit(reference)

    results = {
        "ours (lstsq)": run(ours.transform, images, args),
        "ours (lasso)": run(lasso.transform, images, args),
        # staintools writes into its input: the copy (~2 ms) is part of using it safely.
        "staintools": run(lambda im: theirs.transform(im.copy()), images, args),
    }
    base = results["staintools"][1].astype(np.int16)
    for name, (seconds, patches) in results.items():
        diff = np.abs(patches.astype(np.int16) - base).mean()
        print(f"{name:13s} {seconds:7.3f} s/image   mean |diff| vs staintools {diff:.3f} grey")
    speedup = results["staintools"][0] / results["ours (lstsq)"][0]
    print(
        f"lasso speedup vs staintools: {results['staintools'][0] / results['ours (lasso)'][0]:.2f}"
    )

    patches = results["ours (lstsq)"][1]
    jitter = HEJitter(ours.reference.stain_matrix)
    pipeline = build_transforms(True, ours.reference.stain_matrix, seed=0)
    jitter_rate = throughput(lambda p: jitter(image=p)["image"], patches, args.jitter_seconds)
    pipeline_rate = throughput(lambda p: pipeline(image=p)["image"], patches, args.jitter_seconds)
    print(f"HEJitter {args.patch_size}px: {jitter_rate:.0f} patches/s (1 core)")
    print(f"build_transforms(True) {args.patch_size}px: {pipeline_rate:.0f} patches/s (1 core)")
    print(f"prepare_speedup_vs_staintools: {speedup:.2f}")


if __name__ == "__main__":
    main()
