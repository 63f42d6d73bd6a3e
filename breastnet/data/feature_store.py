"""The features stage's store: one file per image and a manifest, read one image at a time.

A single file of every image's features must be held in memory whole: 10,000 images x 36
tiles x 1,536 floats is 2.2 GB. The store keeps each image's arrays in its own file and
lists them in ``manifest.csv`` (as eva's embeddings writer does), so the image model streams
its sequences and memory stays at a batch:

    features/<key>/manifest.csv          image_id, path, n_tiles, width, encoder (the
                                         patch/<key> that embedded it), sha1 (the content of
                                         the image it was embedded from); written last
    features/<key>/meta.json             classes, test-time augmentation, training features
    features/<key>/metrics.json          patch accuracy per split (none: a frozen encoder)
    features/<key>/images/<image_id>.pt  features [N, D], probs [N, C], positions [N, 2],
                                         tissue [N]

Features are a function of an image's content, its tiles and the encoder, never of its label
or side: the store holds neither. The image model and evaluate join labels and sides from the
current index and split, so a relabelled data set reuses every feature. Each row records the
content hash it was embedded from, so a replaced image is embedded again and an added one is
embedded alone (``FeatureStore.stale``).
"""

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from breastnet.artifacts import atomic_write, write_json, write_text

MANIFEST = "manifest.csv"
COLUMNS = ("image_id", "path", "n_tiles", "width", "encoder", "sha1")
ARRAYS = ("features", "probs", "positions", "tissue")


@dataclass(frozen=True)
class Row:
    """One image of the store, as its manifest line says."""

    image_id: str
    path: str
    n_tiles: int
    width: int
    encoder: str
    sha1: str


class FeatureStore:
    """A finished store under ``root`` (``features/<key>``): its manifest, its images on demand.

    Args:
        root: the store's folder; its ``manifest.csv`` must exist (the store is complete).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.manifest_path.is_file():
            raise FileNotFoundError(
                f"features {self.root} not found (no {MANIFEST}): run the features stage first"
            )

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @staticmethod
    def is_complete(root: Path) -> bool:
        """Whether the store's manifest, written last, exists."""
        return (Path(root) / MANIFEST).is_file()

    @cached_property
    def rows(self) -> dict[str, Row]:
        """Every image's manifest row, by image id (a store from before rows kept their
        content hash has none: each of its images counts as stale)."""
        with self.manifest_path.open(newline="") as f:
            return {
                r["image_id"]: Row(
                    r["image_id"],
                    r["path"],
                    int(r["n_tiles"]),
                    int(r["width"]),
                    r["encoder"],
                    r.get("sha1") or "",
                )
                for r in csv.DictReader(f)
            }

    @cached_property
    def meta(self) -> dict[str, Any]:
        """What holds for every image: class names, TTA, which training features."""
        return json.loads((self.root / "meta.json").read_text())

    @property
    def width(self) -> int:
        """Width of the feature vectors (the encoder's embedding)."""
        return int(self.meta["width"])

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, image_id: str) -> dict[str, Any]:
        """One image's arrays and ``patch_model``, the encoder that embedded it."""
        row = self.rows[image_id]
        image = torch.load(self.root / row.path, map_location="cpu", weights_only=True)
        return {**image, "patch_model": row.encoder}

    def stale(
        self, sha1s: Mapping[str, str], encoders: Mapping[str, str] | None = None
    ) -> list[str]:
        """The images of ``sha1s`` (image id -> content hash) that the store lacks or holds
        from other content (or, given ``encoders``, from another patch model), in order."""
        rows = self.rows

        def current(image_id: str) -> bool:
            row = rows.get(image_id)
            return (
                row is not None
                and row.sha1 == sha1s[image_id]
                and (encoders is None or row.encoder == encoders[image_id])
            )

        return [i for i in sha1s if not current(i)]


def open_store(root: Path) -> FeatureStore | None:
    """The store under ``root``, or None when there is none yet (no manifest)."""
    return FeatureStore(root) if FeatureStore.is_complete(root) else None


def missing_message(root: Path, stale: list[str], total: int) -> str:
    """What to do when ``stale`` of ``total`` images are not (or no longer) in the store."""
    shown = ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else "")
    return (
        f"{root}: {len(stale)} of {total} image(s) are not in the features store or were "
        f"embedded from other content ({shown}): run the features stage first"
    )


def image_path(image_id: str) -> str:
    """The image's file inside the store (image ids may hold folders: ``Benign/b001``)."""
    return f"images/{image_id}.pt"


def write_image(root: Path, image_id: str, arrays: Mapping[str, Tensor]) -> None:
    """Write one image's arrays (``ARRAYS``) atomically; the manifest lists it later."""
    saved = {k: arrays[k].contiguous() for k in ARRAYS}
    atomic_write(root / image_path(image_id), lambda f: torch.save(saved, f))


def finish(root: Path, rows: Iterable[Row], meta: Mapping[str, Any], metrics: dict) -> None:
    """Write the meta, the metrics and, last, the manifest that marks the store complete."""
    write_json(root / "meta.json", dict(meta))
    write_json(root / "metrics.json", metrics)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.__dict__ for r in rows)
    write_text(root / MANIFEST, text.getvalue())
