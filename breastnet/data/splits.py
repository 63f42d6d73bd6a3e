"""Stratified, seeded splits by image: every patch of an image lands on the same side.

A split is written once to ``work_dir/splits/<name>.json`` and read back by every later
stage and rerun. The name carries the settings and a fingerprint of the data, so new or
changed images make a new split rather than silently reshuffling an old one.
"""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from breastnet import CLASSES
from breastnet.artifacts import write_json
from breastnet.data.bach import DataError, IndexEntry, data_fingerprint

SIDES = ("train", "val", "test")


def _largest_remainder(n: int, ratios: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, proportional to ratios."""
    exact = n * ratios / ratios.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def _by_class(entries: list[IndexEntry]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        if e.usable:
            groups[e.label].append(e.image_id)
    return {c: sorted(groups[c]) for c in CLASSES if groups[c]}


def holdout_split(
    entries: list[IndexEntry], ratios: tuple[float, ...] = (0.7, 0.2, 0.1), seed: int = 2019
) -> dict[str, list[str]]:
    """Train/val/test by image, stratified by class (the paper's 70/20/10)."""
    ratio = np.asarray(ratios, dtype=float)
    if ratio.shape != (3,) or (ratio < 0).any() or ratio[0] <= 0:
        raise ValueError(f"data.split must be three non-negative ratios (train > 0), got {ratios}")
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {side: [] for side in SIDES}
    for label, ids in _by_class(entries).items():
        counts = _largest_remainder(len(ids), ratio)
        if (counts[ratio > 0] == 0).any():
            raise DataError(
                f"class {label} has only {len(ids)} usable image(s): too few for a "
                f"{'/'.join(f'{r:g}' for r in ratios)} split"
            )
        order = rng.permutation(ids).tolist()
        for side, start, stop in zip(
            SIDES, np.r_[0, counts.cumsum()[:-1]], counts.cumsum(), strict=True
        ):
            split[side] += order[start:stop]
    return {side: sorted(ids) for side, ids in split.items()}


def kfold_split(
    entries: list[IndexEntry],
    folds: int,
    fold: int,
    val_fraction: float = 0.2,
    seed: int = 2019,
) -> dict[str, list[str]]:
    """Fold ``fold`` of a stratified k-fold is the test set; val is carved from the rest."""
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds} fold={fold}")
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {side: [] for side in SIDES}
    for k, (label, ids) in enumerate(_by_class(entries).items()):
        if len(ids) < folds:
            raise DataError(
                f"class {label} has {len(ids)} usable image(s): fewer than {folds} folds"
            )
        order = rng.permutation(ids)
        assignment = (np.arange(len(ids)) + k) % folds  # offset per class balances fold sizes
        rest = order[assignment != fold].tolist()
        n_val = int(round(len(rest) * val_fraction))
        split["test"] += order[assignment == fold].tolist()
        split["val"] += rest[:n_val]
        split["train"] += rest[n_val:]
    return {side: sorted(ids) for side, ids in split.items()}


def split_name(
    ratios: tuple[float, ...], folds: int | None, fold: int, seed: int, fingerprint: str
) -> str:
    """The split file's name: its settings and the fingerprint of the data it splits."""
    if folds:
        return f"kfold{folds}-fold{fold}-seed{seed}-{fingerprint}"
    return f"holdout-{'-'.join(f'{r:g}' for r in ratios)}-seed{seed}-{fingerprint}"


def load_or_make_split(
    work_dir: Path,
    entries: list[IndexEntry],
    ratios: tuple[float, ...] = (0.7, 0.2, 0.1),
    folds: int | None = None,
    fold: int = 0,
    seed: int = 2019,
) -> tuple[dict[str, list[str]], Path]:
    """The split for these settings and data: read from ``work_dir/splits`` or made once."""
    name = split_name(ratios, folds, fold, seed, data_fingerprint(entries))
    path = Path(work_dir) / "splits" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text()), path
    if folds:
        val_fraction = ratios[1] / (ratios[0] + ratios[1])
        split = kfold_split(entries, folds, fold, val_fraction, seed)
    else:
        split = holdout_split(entries, ratios, seed)
    write_json(path, split)
    return split, path
