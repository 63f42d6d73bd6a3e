"""The Macenko reference of a config: picked from the data (``auto``: any image; ``train``: the
training side) or a given image, fitted once and kept in ``work_dir/stain/<key>.json``."""

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from breastnet.artifacts import config_hash, locked, write_json
from breastnet.data import bach
from breastnet.data.bach import IndexEntry
from breastnet.data.keys import PICKED_REFERENCES
from breastnet.data.stain import MacenkoNormalizer, StainReference, pick_reference

log = logging.getLogger(__name__)

DOWNSAMPLE = 4  # picking the reference needs stain matrices, not full resolution


def stain_reference(
    work_dir: Path,
    entries: list[IndexEntry],
    stain: Mapping,
    settings: dict,
    train: Sequence[str],
    build: bool,
) -> StainReference | None:
    """The fitted reference of these ``settings`` (``keys.stain_settings``; None: no stain
    work), read back or (``build``) fitted now.

    Args:
        work_dir: artifacts root.
        entries: the index.
        stain: ``cfg.stain`` (reference, solver, thresholds).
        settings: what identifies the reference.
        train: the split's training images (where ``reference=train`` picks).
        build: fit it when it is not there yet (prepare); else a missing one is an error.
    """
    if settings["method"] == "none":
        return None
    path = Path(work_dir) / "stain" / f"{config_hash(settings)}.json"
    if path.is_file():
        return StainReference.from_dict(json.loads(path.read_text())["reference"])
    if not build:
        raise FileNotFoundError(f"{path} not found: run the prepare stage first")
    with locked(path):
        if path.is_file():  # fitted by another process while this one waited
            return StainReference.from_dict(json.loads(path.read_text())["reference"])
        return _fit(path, entries, stain, train)


def _fit(path: Path, entries: list[IndexEntry], stain: Mapping, train: Sequence[str]):
    """Pick and fit the reference, write it to ``path``."""
    if stain["reference"] in PICKED_REFERENCES:
        pool = set(train) if stain["reference"] == "train" else None
        ref_path = Path(most_typical(entries, stain, pool).path)
    else:
        ref_path = Path(stain["reference"])
    image, _ = bach.read_rgb(ref_path.expanduser())
    normalizer = MacenkoNormalizer(
        solver=stain["solver"],
        luminosity_threshold=stain["luminosity_threshold"],
        angular_percentile=stain["angular_percentile"],
    ).fit(image)
    write_json(path, {"reference": normalizer.reference.to_dict(), "path": str(ref_path)})
    log.info("stain reference: %s", ref_path)
    return normalizer.reference


def most_typical(entries: list[IndexEntry], stain: Mapping, pool: set[str] | None) -> IndexEntry:
    """The most typical image's stains, label-free, among the usable images of ``pool``
    (None: every image, so every fold shares one patch cache; transductive, as it looks at
    the test images' colours too)."""
    usable = [e for e in entries if e.usable and (pool is None or e.image_id in pool)]

    def small(entry: IndexEntry) -> np.ndarray:
        image, _ = bach.read_rgb(entry.path)
        h, w = image.shape[:2]
        return cv2.resize(image, (w // DOWNSAMPLE, h // DOWNSAMPLE), interpolation=cv2.INTER_AREA)

    best = pick_reference(
        (small(e) for e in usable), stain["luminosity_threshold"], stain["angular_percentile"]
    )
    return usable[best]
