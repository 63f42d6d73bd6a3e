"""Stratified, seeded splits by image or by source group: a group lands on one side only.

A split is written once to ``work_dir/splits/<name>.json`` and read back by every later
stage and rerun. The name carries the settings and a fingerprint of the data, so new or
changed images make a new split rather than silently reshuffling an old one. With
``data.groups`` (see ``breastnet.data.groups``) every image of one source (patient, slide, a
block of BACH file numbers) stays on one side, and the name says so.
"""

import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from breastnet import CLASSES
from breastnet.artifacts import write_json
from breastnet.data.bach import DataError, IndexEntry, data_fingerprint
from breastnet.data.groups import resolve_groups, spec_token

log = logging.getLogger(__name__)

SIDES = ("train", "val", "test")
MAX_FOLDS = 20  # the finest fold count a grouped split uses to match its ratios


def _largest_remainder(n: int, ratios: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, proportional to ratios."""
    exact = n * ratios / ratios.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def _ratio_text(ratios: Sequence[float]) -> str:
    return "/".join(f"{r:g}" for r in ratios)


def _by_class(entries: list[IndexEntry]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        if e.usable:
            groups[e.label].append(e.image_id)
    return {c: sorted(groups[c]) for c in CLASSES if groups[c]}


def holdout_split(
    entries: list[IndexEntry],
    ratios: tuple[float, ...] = (0.7, 0.2, 0.1),
    seed: int = 2019,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Train/val/test, stratified by class (the paper's 70/20/10).

    Args:
        entries: the index; unusable entries are left out.
        ratios: train/val/test shares.
        seed: the split's seed.
        groups: image_id -> source group (``resolve_groups``); None splits by image.
    """
    ratio = np.asarray(ratios, dtype=float)
    if ratio.shape != (3,) or (ratio < 0).any() or ratio[0] <= 0:
        raise ValueError(f"data.split must be three non-negative ratios (train > 0), got {ratios}")
    if groups is not None:
        sides = _grouped_sides(*_grouped(entries, groups), ratio, seed)
        return dict(zip(SIDES, sides, strict=True))
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {side: [] for side in SIDES}
    for label, ids in _by_class(entries).items():
        counts = _largest_remainder(len(ids), ratio)
        if (counts[ratio > 0] == 0).any():
            raise DataError(
                f"class {label} has only {len(ids)} usable image(s): too few for a "
                f"{_ratio_text(ratios)} split"
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
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Fold ``fold`` of a stratified k-fold is the test set; val is carved from the rest.

    Args:
        entries: the index; unusable entries are left out.
        folds: number of folds.
        fold: which fold is the test set (0-based).
        val_fraction: share of the non-test images that go to val.
        seed: the split's seed (the same seed gives the same folds for every ``fold``).
        groups: image_id -> source group (``resolve_groups``); None splits by image.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds} fold={fold}")
    if groups is not None:
        return _grouped_kfold(entries, groups, folds, fold, val_fraction, seed)
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


# -- by source group ------------------------------------------------------------------------
def _grouped(
    entries: list[IndexEntry], groups: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, labels, groups) of the usable entries, sorted by id."""
    usable = sorted((e for e in entries if e.usable), key=lambda e: e.image_id)
    missing = [e.image_id for e in usable if e.image_id not in groups]
    if missing:
        raise DataError(f"{len(missing)} image(s) have no group, e.g. {missing[0]}")
    return (
        np.array([e.image_id for e in usable]),
        np.array([e.label for e in usable]),
        np.array([groups[e.image_id] for e in usable]),
    )


def _groups_per_class(labels: np.ndarray, groups: np.ndarray) -> dict[str, int]:
    """How many groups hold images of each class present."""
    return {c: len(set(groups[labels == c])) for c in CLASSES if (labels == c).any()}


def _fold_plan(ratio: np.ndarray, max_folds: int) -> np.ndarray | None:
    """Folds per side whose shares best match ``ratio``, at most ``max_folds`` in all.

    Returns None when no fold count gives every side with a positive ratio a fold.
    """
    target = ratio / ratio.sum()
    best, best_error = None, np.inf
    for n in range(int((ratio > 0).sum()), max_folds + 1):
        plan = _largest_remainder(n, ratio)
        error = np.abs(plan / n - target).max()
        if (plan[ratio > 0] > 0).all() and error < best_error - 1e-9:
            best, best_error = plan, error
    return best


def _grouped_sides(
    ids: np.ndarray, labels: np.ndarray, groups: np.ndarray, ratio: np.ndarray, seed: int
) -> list[list[str]]:
    """Whole groups onto ``len(ratio)`` sides, stratified by class.

    ``StratifiedGroupKFold`` deals the groups into n folds, n chosen (up to the fewest groups
    of any class) so that whole folds per side best match the ratios; side k takes the next
    ``plan[k]`` folds.
    """
    per_class = _groups_per_class(labels, groups)
    fewest = min(per_class, key=per_class.get)
    plan = _fold_plan(ratio, min(per_class[fewest], MAX_FOLDS))
    if plan is None:
        raise DataError(
            f"class {fewest} has only {per_class[fewest]} source group(s): too few for a "
            f"{_ratio_text(ratio)} split that keeps each group on one side (use coarser "
            "ratios or finer data.groups)"
        )
    fold_of = np.zeros(len(ids), dtype=int)
    if plan.sum() > 1:
        dealer = StratifiedGroupKFold(int(plan.sum()), shuffle=True, random_state=seed)
        for k, (_, held) in enumerate(dealer.split(ids, labels, groups)):
            fold_of[held] = k
    side_of = np.repeat(np.arange(len(plan)), plan)[fold_of]
    for k in np.flatnonzero(ratio > 0):
        if absent := set(per_class) - set(labels[side_of == k]):
            raise DataError(
                f"the source groups of class {sorted(absent)[0]} are too few or too uneven "
                f"for a {_ratio_text(ratio)} split: one side would have none of it"
            )
    return [sorted(ids[side_of == k].tolist()) for k in range(len(plan))]


def _grouped_kfold(
    entries: list[IndexEntry],
    groups: Mapping[str, str],
    folds: int,
    fold: int,
    val_fraction: float,
    seed: int,
) -> dict[str, list[str]]:
    """``kfold_split`` along whole groups: ``StratifiedGroupKFold`` for test, then val."""
    ids, labels, group = _grouped(entries, groups)
    for label, n in _groups_per_class(labels, group).items():
        if n < folds:
            raise DataError(f"class {label} has {n} source group(s): fewer than {folds} folds")
    dealer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    _, held = list(dealer.split(ids, labels, group))[fold]
    rest = np.ones(len(ids), dtype=bool)
    rest[held] = False
    ratio = np.array([1 - val_fraction, val_fraction])
    train, val = _grouped_sides(ids[rest], labels[rest], group[rest], ratio, seed)
    return {"train": train, "val": val, "test": sorted(ids[held].tolist())}


def crossing_groups(split: Mapping[str, Sequence[str]], groups: Mapping[str, str]) -> list[str]:
    """Groups with images on more than one side of ``split`` (empty for a leak-free split)."""
    sides: dict[str, set[str]] = defaultdict(set)
    for side in SIDES:
        for image_id in split[side]:
            sides[groups.get(image_id, image_id)].add(side)
    return sorted(g for g, s in sides.items() if len(s) > 1)


def split_summary(
    split: Mapping[str, Sequence[str]],
    groups: Mapping[str, str] | None = None,
    spec: str | None = None,
) -> dict:
    """Images and source groups on each side, and a line a report can print.

    Returns:
        ``{"groups": spec, "n_images": {side: n}, "n_groups": {side: n}, "text": "grouped by
        blocks:10: 140 train / 20 val / 40 test images, 14/2/4 groups"}``.
    """
    groups = groups or {}
    n_images = {side: len(split[side]) for side in SIDES}
    n_groups = {side: len({groups.get(i, i) for i in split[side]}) for side in SIDES}
    shown = [side for side in SIDES if n_images[side]]
    text = (
        f"grouped by {spec or 'image'}: "
        + " / ".join(f"{n_images[side]} {side}" for side in shown)
        + " images, "
        + "/".join(str(n_groups[side]) for side in shown)
        + " groups"
    )
    return {"groups": spec, "n_images": n_images, "n_groups": n_groups, "text": text}


# -- inner folds: the out-of-fold patch models --------------------------------------------
def inner_folds(
    split: Mapping[str, Sequence[str]],
    entries: list[IndexEntry],
    folds: int,
    seed: int,
    groups: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """The training images of ``split`` dealt into ``folds`` class-stratified folds, whole
    source groups kept together: what each out-of-fold patch model leaves out.

    Raises:
        DataError: a class with fewer training groups (images) than ``folds``.
    """
    train = set(split["train"])
    inside = [e for e in entries if e.image_id in train]
    ids, labels, group = _grouped(inside, groups or {i: i for i in train})
    for label, n in _groups_per_class(labels, group).items():
        if n < folds:
            raise DataError(
                f"class {label} has {n} source group(s) among the training images: fewer than "
                f"image.oof_folds={folds}"
            )
    dealer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return [sorted(ids[held].tolist()) for _, held in dealer.split(ids, labels, group)]


def inner_name(outer: str, fold: int, folds: int) -> str:
    """Stem of inner split ``fold`` of ``folds`` inside the split file ``outer``."""
    return f"{outer}-inner{fold}of{folds}"


def inner_split(split: Mapping[str, Sequence[str]], held: Sequence[str]) -> dict[str, list[str]]:
    """Train without ``held``, the same val (model selection), ``held`` as the test side."""
    left_out = set(held)
    return {
        "train": [i for i in split["train"] if i not in left_out],
        "val": list(split["val"]),
        "test": sorted(held),
    }


# -- the split file -------------------------------------------------------------------------
def split_name(
    ratios: Sequence[float],
    folds: int | None,
    fold: int,
    seed: int,
    groups: str | None,
    data: str,
) -> str:
    """The split file's stem for these settings and data (writes nothing).

    Args:
        ratios: ``data.split``.
        folds: ``data.folds`` (None or 0: hold-out).
        fold: ``data.fold``.
        seed: the split seed (``data.split_seed``).
        groups: the ``data.groups`` spec.
        data: ``data_fingerprint`` of the index.
    """
    grouping = f"-groups_{spec_token(groups)}" if groups is not None else ""
    if folds:
        return f"kfold{folds}-fold{fold}{grouping}-seed{seed}-{data}"
    return f"holdout-{'-'.join(f'{r:g}' for r in ratios)}{grouping}-seed{seed}-{data}"


def load_or_make_split(
    work_dir: Path,
    entries: list[IndexEntry],
    ratios: tuple[float, ...] = (0.7, 0.2, 0.1),
    folds: int | None = None,
    fold: int = 0,
    seed: int = 2019,
    *,
    groups: str | None = None,
    split_seed: int | None = None,
    data_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    inner: tuple[int, int] | None = None,
) -> tuple[dict[str, list[str]], Path]:
    """The split for these settings and data: read from ``work_dir/splits`` or made once.

    Args:
        work_dir: artifacts root.
        entries: the index.
        ratios, folds, fold: ``data.split``, ``data.folds``, ``data.fold``.
        seed: ``data.seed``, the split's seed unless ``split_seed`` is given.
        groups: ``data.groups`` spec (None: by image).
        split_seed: ``data.split_seed``.
        data_dir, labels_csv: where a CSV-column spec finds the label CSV.
        inner: (k, K): inner split k of K of this split (``inner_split``) instead, the data
            of out-of-fold patch model k.

    Raises:
        DataError: too few groups for the split, or a split file read back whose groups
            cross sides (the group column changed since it was written: delete the file).
    """
    seed = seed if split_seed is None else split_seed
    by_group = None if groups is None else resolve_groups(entries, groups, data_dir, labels_csv)
    name = split_name(ratios, folds, fold, seed, groups, data_fingerprint(entries))
    path = Path(work_dir) / "splits" / f"{name}.json"
    if path.is_file():
        split = json.loads(path.read_text())
        if by_group and (crossing := crossing_groups(split, by_group)):
            raise DataError(
                f"{path}: groups on two sides ({', '.join(crossing[:5])}): the groups changed "
                "since this split was written; delete it to make a new one"
            )
    elif folds:
        val_fraction = ratios[1] / (ratios[0] + ratios[1])
        split = kfold_split(entries, folds, fold, val_fraction, seed, by_group)
    else:
        split = holdout_split(entries, ratios, seed, by_group)
    if not path.is_file():
        write_json(path, split)
        log.info("split %s: %s", path.name, split_summary(split, by_group, groups)["text"])
    if inner is None:
        return split, path
    k, n = inner
    inner_path = path.with_name(f"{inner_name(path.stem, k, n)}.json")
    if not inner_path.is_file():
        held = inner_folds(split, entries, n, seed, by_group)[k]
        write_json(inner_path, inner_split(split, held))
    return json.loads(inner_path.read_text()), inner_path
