"""The inner splits of the out-of-fold patch models: the training side of an outer split
dealt into folds, each fold once the held-out side of one patch model."""

from collections.abc import Mapping, Sequence

from sklearn.model_selection import StratifiedGroupKFold

from breastnet.data.bach import DataError, IndexEntry
from breastnet.data.protocols import grouped_arrays, groups_per_class


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
    ids, labels, group = grouped_arrays(inside, groups or {i: i for i in train})
    for label, n in groups_per_class(labels, group).items():
        if n < folds:
            raise DataError(
                f"class {label} has {n} source group(s) among the training images: fewer than "
                f"image.oof_folds={folds}"
            )
    dealer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return [sorted(ids[held].tolist()) for _, held in dealer.split(ids, labels, group)]


def inner_split(split: Mapping[str, Sequence[str]], held: Sequence[str]) -> dict[str, list[str]]:
    """Train without ``held``, the same val (model selection), ``held`` as the test side."""
    left_out = set(held)
    return {
        "train": [i for i in split["train"] if i not in left_out],
        "val": list(split["val"]),
        "test": sorted(held),
    }
