"""Leakage audit: each val/test image's most similar training image, and near-duplicates of it.

Two kinds of descriptor, compared by cosine similarity:

- ``features``: the features stage's store; an image is the mean of its patch features, centred
  on the mean over all images of the file (uncentred, every ReLU feature vector looks alike).
- ``images``: any folder; an image is its 32x32 area-averaged thumbnail, each colour channel
  centred on its mean and scaled by the image's standard deviation (a correlation of
  layouts, blind to overall colour and brightness). A query is compared with the eight flips
  and quarter turns of each training thumbnail and keeps the best, so a flipped or rotated
  copy matches; area averaging makes it robust to rescaling and JPEG re-encoding.

A pair is a near-duplicate when its similarity reaches the threshold. The defaults sit in the
gap, measured on bach-dev, between each image's nearest distinct image and planted copies
(``experiments/audit_threshold/RESULTS.md``): thumbnails, distinct <= 0.75 and copies >= 0.997;
frozen MobileNetV2 features, distinct <= 0.85 and flipped or re-encoded copies >= 0.94. The
features route misses rescaled copies (other tiles) and, without TTA, quarter turns; the
image route misses crops.

The prepare stage audits its split by thumbnails (``audit_split``; ``audit.enabled``,
``audit.threshold``) and warns when near-duplicates cross it; evaluate shows the closest pairs.
Any folder and split file: ``python -m breastnet.audit <features/<key> | folder> <split.json>``.
"""

import argparse
import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from breastnet.artifacts import atomic_write, write_json, write_text
from breastnet.data.bach import DataError, IndexEntry, data_fingerprint, find_images, read_rgb
from breastnet.data.feature_store import FeatureStore

log = logging.getLogger(__name__)

THUMBNAIL = 32
# Cosine at and above which a pair counts as a near-duplicate, per descriptor kind.
THRESHOLDS = {"images": 0.9, "features": 0.9}
QUERY_SIDES = ("val", "test")


@dataclass
class Match:
    """One val/test image and its most similar training image."""

    image_id: str
    side: str  # val or test
    train_id: str
    similarity: float
    near_duplicates: int  # training images at or above the threshold


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def image_descriptor(image: np.ndarray) -> np.ndarray:
    """The eight dihedral variants of an RGB image's normalised thumbnail: [8, 32*32*3]."""
    thumb = Image.fromarray(image).resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
    x = np.asarray(thumb, dtype=np.float64)
    x = (x - x.mean(axis=(0, 1))) / max(x.std(), 1e-6)
    variants = [np.rot90(v, k) for v in (x, x[:, ::-1]) for k in range(4)]
    return _unit(np.stack([v.ravel() for v in variants]))


def image_descriptors(paths: Mapping[str, str | Path]) -> dict[str, np.ndarray]:
    """``image_descriptor`` of each image file: image_id -> [8, D]."""
    return {image_id: image_descriptor(read_rgb(p)[0]) for image_id, p in paths.items()}


def feature_descriptors(images: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
    """Mean patch feature of each image of a features file's ``images``, centred: id -> [1, D]."""
    means = {i: v["features"].float().mean(0).numpy() for i, v in images.items()}
    centre = np.mean(list(means.values()), axis=0)
    return {i: _unit(m - centre)[None] for i, m in means.items()}


def load_descriptors(source: Path, image_ids: Sequence[str]) -> tuple[dict[str, np.ndarray], str]:
    """Descriptors of ``image_ids`` from a features store (or an older single features file)
    or an image folder, and their kind."""
    store = FeatureStore(source) if FeatureStore.is_complete(source) else None
    if store is not None:
        kind, paths = "features", dict.fromkeys(store)
    elif source.is_dir():
        found = {p.relative_to(source).with_suffix("").as_posix(): p for p in find_images(source)}
        kind, paths = "images", found
    else:
        images = torch.load(source, map_location="cpu", weights_only=False)["images"]
        kind, paths = "features", images
    if missing := [i for i in image_ids if i not in paths]:
        raise DataError(
            f"{source}: {len(missing)} image(s) of the split missing, e.g. {missing[0]}"
        )
    wanted = {i: store.load(i) if store else paths[i] for i in image_ids}
    describe = image_descriptors if kind == "images" else feature_descriptors
    return describe(wanted), kind


def audit(
    descriptors: Mapping[str, np.ndarray],
    split: Mapping[str, Sequence[str]],
    threshold: float,
) -> list[Match]:
    """The most similar training image of every val/test image, most similar first.

    Args:
        descriptors: image_id -> [V, D] unit vectors; a query uses its first row, a training
            image all V (its variants).
        split: ``{"train": [...], "val": [...], "test": [...]}``.
        threshold: cosine at and above which a pair is a near-duplicate.
    """
    train = list(split["train"])
    queries = [(i, side) for side in QUERY_SIDES for i in split.get(side, [])]
    if not train or not queries:
        return []
    bank = np.stack([descriptors[i] for i in train])  # T x V x D
    query = np.stack([descriptors[i][0] for i, _ in queries])  # Q x D
    similarity = np.einsum("qd,tvd->qtv", query, bank).max(-1)  # Q x T
    best = similarity.argmax(1)
    matches = [
        Match(i, side, train[b], float(row[b]), int((row >= threshold).sum()))
        for (i, side), row, b in zip(queries, similarity, best, strict=True)
    ]
    return sorted(matches, key=lambda m: -m.similarity)


def crossing_pairs(
    descriptors: Mapping[str, np.ndarray],
    split: Mapping[str, Sequence[str]],
    threshold: float,
) -> list[Match]:
    """The val/test images with a near-duplicate in train (what prepare/evaluate warn about)."""
    return [m for m in audit(descriptors, split, threshold) if m.near_duplicates]


def cached_image_descriptors(
    work_dir: Path, entries: Sequence[IndexEntry]
) -> dict[str, np.ndarray]:
    """``image_descriptors`` of the usable images, computed once per data set (every split and
    fold of it reuses them): ``work_dir/audit/<data fingerprint>.npz``."""
    usable = [e for e in entries if e.usable]
    path = Path(work_dir) / "audit" / f"{data_fingerprint(usable)}.npz"
    if path.is_file():
        saved = np.load(path)
        return dict(zip(saved["ids"].tolist(), saved["descriptors"], strict=True))
    descriptors = image_descriptors({e.image_id: e.path for e in usable})
    ids = list(descriptors)
    stacked = np.stack([descriptors[i] for i in ids]).astype(np.float32)
    atomic_write(path, lambda f: np.savez(f, ids=np.array(ids), descriptors=stacked))
    return descriptors


def audit_split(
    work_dir: Path, entries: Sequence[IndexEntry], split_path: Path, threshold: float
) -> dict:
    """The thumbnail audit of one split file, kept beside it (``<split>.audit.json``/``.csv``)
    and redone only when the threshold changes; warns when near-duplicates cross the split.

    Returns:
        The audit JSON: ``descriptor``, ``threshold``, ``flagged`` (val/test images with a
        near-duplicate in train) and ``matches`` (most similar first).
    """
    out = split_path.with_suffix(".audit.json")
    if out.is_file() and (saved := json.loads(out.read_text()))["threshold"] == threshold:
        return saved
    split = json.loads(split_path.read_text())
    matches = audit(cached_image_descriptors(work_dir, entries), split, threshold)
    saved = _write(out, matches, threshold, "images")
    flagged = [m for m in matches if m.near_duplicates]
    if flagged:
        pairs = "; ".join(f"{m.image_id} ~ {m.train_id} ({m.similarity:.3f})" for m in flagged[:3])
        log.warning(
            "%d of %d val/test images have a near-duplicate among the training images (thumbnail "
            "cosine >= %g), e.g. %s: accuracy on this split is optimistic. Group images by "
            "source (data.groups, e.g. a patient column or blocks:10 for BACH); pairs in %s",
            len(flagged),
            len(matches),
            threshold,
            pairs,
            out,
        )
    return saved


def _write(out: Path, matches: list[Match], threshold: float, kind: str) -> dict:
    """``out`` (JSON: settings, counts, every match) and the same rows as CSV beside it;
    returns what the JSON holds."""
    rows = [asdict(m) for m in matches]
    flagged = sum(m.near_duplicates > 0 for m in matches)
    saved = {"descriptor": kind, "threshold": threshold, "flagged": flagged, "matches": rows}
    write_json(out, saved)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(Match.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out.with_suffix(".csv"), text.getvalue())
    return saved


def main(argv: list[str] | None = None) -> None:
    """CLI: audit a split, write the matches, print the closest pairs."""
    parser = argparse.ArgumentParser(
        prog="python -m breastnet.audit", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", type=Path, help="features store or image folder")
    parser.add_argument("split", type=Path, help="split JSON (work_dir/splits/<name>.json)")
    parser.add_argument(
        "--threshold",
        type=float,
        help=f"near-duplicate cosine (default {THRESHOLDS['images']} for images, "
        f"{THRESHOLDS['features']} for features)",
    )
    parser.add_argument("--out", type=Path, default=Path("audit.json"), help="JSON (+ .csv)")
    parser.add_argument("--top", type=int, default=10, help="pairs to print")
    args = parser.parse_args(argv)
    split = json.loads(args.split.read_text())
    ids = sorted({i for side in ("train", *QUERY_SIDES) for i in split.get(side, [])})
    descriptors, kind = load_descriptors(args.source, ids)
    threshold = THRESHOLDS[kind] if args.threshold is None else args.threshold
    matches = audit(descriptors, split, threshold)
    _write(args.out, matches, threshold, kind)
    flagged = sum(m.near_duplicates > 0 for m in matches)
    print(
        f"{flagged} of {len(matches)} val/test images have a training near-duplicate "
        f"({kind}, cosine >= {threshold}); all matches in {args.out}"
    )
    for m in matches[: args.top]:
        print(f"{m.similarity:.3f}  {m.side:4s} {m.image_id}  ~ train {m.train_id}")


if __name__ == "__main__":
    main()
