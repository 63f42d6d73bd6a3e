"""Peak memory of the image stage's data path: one features file held whole vs the store.

Generates ``--images`` images x ``--tiles`` tiles x ``--width`` float32 features (and 4 patch
probabilities) twice: as the single ``features/<key>.pt`` the features stage wrote before
(``{"images": {id: {...}}}``, loaded whole by the image stage) and as the features store
(``breastnet.data.feature_store``: one file per image and a manifest). Then, each in a fresh
process, one epoch of what the image stage does with them: the training images through a
DataLoader (``pad_collate``, batches of 16) into a mean-features linear head, forward,
backward and an optimiser step. Prints each process's peak resident memory (VmHWM).

    .venv/bin/python experiments/bench_features/memory.py [--images 2000] [--tiles 36]
        [--width 1536] [--dir /tmp/features_memory]
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from breastnet.data import feature_store
from breastnet.data.datasets import FeatureDataset, pad_collate
from breastnet.data.feature_store import FeatureStore, Row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--tiles", type=int, default=36)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/features_memory"))
    parser.add_argument("--run", choices=("file", "store"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def generate(args: argparse.Namespace) -> None:
    """Both layouts of the same random features, written one image at a time."""
    shutil.rmtree(args.dir, ignore_errors=True)
    store, images, rows = args.dir / "store", {}, []
    gen = torch.Generator().manual_seed(0)
    for i in range(args.images):
        image_id = f"{('Normal', 'Benign', 'InSitu', 'Invasive')[i % 4]}/{i:05d}"
        arrays = {
            "features": torch.randn(args.tiles, args.width, generator=gen),
            "probs": torch.full((args.tiles, 4), 0.25),
            "positions": torch.stack(
                torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij"), -1
            ).reshape(-1, 2)[: args.tiles],
            "tissue": torch.ones(args.tiles),
        }
        feature_store.write_image(store, image_id, arrays)
        rows.append(
            Row(
                image_id,
                feature_store.image_path(image_id),
                args.tiles,
                args.width,
                "g",
                f"{i:040x}",
            )
        )
        images[image_id] = {**arrays, "label": i % 4, "split": "train"}
    feature_store.finish(store, rows, {"width": args.width}, {})
    torch.save({"images": images}, args.dir / "features.pt")


class WholeFile(Dataset):
    """The image stage before the store: the whole features file in memory."""

    def __init__(self, path: Path) -> None:
        self.images = torch.load(path, weights_only=False)["images"]
        self.image_ids = list(self.images)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict:
        image = self.images[self.image_ids[i]]
        return {
            "x": image["features"],
            "probs": image["probs"],
            "pos": image["positions"],
            "y": image["label"],
            "image_id": self.image_ids[i],
        }


def one_epoch(args: argparse.Namespace) -> None:
    """One training epoch of a mean-features linear head over one layout; prints peak RSS."""
    start = time.perf_counter()
    if args.run == "file":
        dataset: Dataset = WholeFile(args.dir / "features.pt")
    else:
        store = FeatureStore(args.dir / "store")
        dataset = FeatureDataset(store, list(store), {i: k % 4 for k, i in enumerate(store)})
    head = torch.nn.Linear(args.width, 4)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for batch in DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=pad_collate):
        mask = batch["mask"].unsqueeze(-1)  # B x N x 1
        pooled = (batch["x"] * mask).sum(1) / mask.sum(1)  # B x D
        loss = torch.nn.functional.cross_entropy(head(pooled), batch["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"| {args.run} | {peak_memory():.0f} MiB | {time.perf_counter() - start:.1f} s |")


def peak_memory() -> float:
    """This process's peak resident memory in MiB: VmHWM, which starts afresh at exec (unlike
    ru_maxrss, which Linux carries over from the parent that generated the data)."""
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        / 1024
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run:
        one_epoch(args)
        return
    size = args.images * args.tiles * args.width * 4 / 2**20
    print(f"{args.images} images x {args.tiles} tiles x {args.width} float32: {size:.0f} MiB")
    generate(args)
    print("| layout | peak resident memory | epoch |\n| --- | --- | --- |")
    for layout in ("file", "store"):
        subprocess.run(
            [sys.executable, __file__, *(argv or sys.argv[1:]), "--run", layout], check=True
        )
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
