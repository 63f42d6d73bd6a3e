"""How a split is drawn: hold-out ratios, k-fold, or a fixed split's given sides, stratified
by class and seeded, by image or along whole source groups (a group lands on one side only).

``breastnet.data.splits`` picks the protocol from the settings and keeps the split's file;
``breastnet.data.sides`` reads the sides a fixed split is given.
"""

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from breastnet import CLASSES
from breastnet.data.bach import DataError, IndexEntry

SIDES = ("train", "val", "test")
MAX_FOLDS = 20  # the finest fold count a grouped split uses to match its ratios


def _largest_remainder(n: int, ratios: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, proportional to ratios."""
    exact = n * ratios / ratios.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def ratio_text(ratios: Sequence[float]) -> str:
    """``0.7/0.2/0.1``: ratios as settings and messages write them."""
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
        sides = _grouped_sides(*grouped_arrays(entries, groups), ratio, seed)
        return dict(zip(SIDES, sides, strict=True))
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {side: [] for side in SIDES}
    for label, ids in _by_class(entries).items():
        counts = _largest_remainder(len(ids), ratio)
        if (counts[ratio > 0] == 0).any():
            raise DataError(
                f"class {label} has only {len(ids)} usable image(s): too few for a "
                f"{ratio_text(ratios)} split"
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


def fixed_split(
    entries: list[IndexEntry],
    sides: Mapping[str, str],
    val_fraction: float = 0.2,
    seed: int = 2019,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """A split whose sides are given (``sides``: image_id -> train/val/test).

    The test side is kept as it is. Unless ``sides`` names val images, val is carved out of
    the training side: ``val_fraction`` of it in whole groups, stratified by class and seeded,
    so that the reported images never choose a checkpoint.
    """
    usable = [e for e in entries if e.usable]
    split = {s: sorted(e.image_id for e in usable if sides[e.image_id] == s) for s in SIDES}
    if split["val"] or val_fraction == 0:
        return split
    train = set(split["train"])
    inside = [e for e in usable if e.image_id in train]
    ids, labels, group = grouped_arrays(inside, groups or {i: i for i in train})
    ratio = np.array([1 - val_fraction, val_fraction])
    split["train"], split["val"] = _grouped_sides(ids, labels, group, ratio, seed)
    return split


# -- by source group ------------------------------------------------------------------------
def grouped_arrays(
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


def groups_per_class(labels: np.ndarray, groups: np.ndarray) -> dict[str, int]:
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
    per_class = groups_per_class(labels, groups)
    fewest = min(per_class, key=per_class.get)
    plan = _fold_plan(ratio, min(per_class[fewest], MAX_FOLDS))
    if plan is None:
        raise DataError(
            f"class {fewest} has only {per_class[fewest]} source group(s): too few for a "
            f"{ratio_text(ratio)} split that keeps each group on one side (use coarser "
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
                f"for a {ratio_text(ratio)} split: one side would have none of it"
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
    ids, labels, group = grouped_arrays(entries, groups)
    for label, n in groups_per_class(labels, group).items():
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
