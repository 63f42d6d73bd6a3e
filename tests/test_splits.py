"""Splits are by image, stratified, seeded, reused, and never put an image on two sides."""

import json
from pathlib import Path

import pytest

from breastnet import CLASSES
from breastnet.data.bach import DataError, IndexEntry
from breastnet.data.splits import SIDES, holdout_split, kfold_split, load_or_make_split


def entries(per_class: int = 50) -> list[IndexEntry]:
    return [
        IndexEntry(image_id=f"{c}/{i:03d}", path="", label=c, sha1=f"{c}{i}")
        for c in CLASSES
        for i in range(per_class)
    ]


def label_of(image_id: str) -> str:
    return image_id.split("/")[0]


def test_holdout_is_stratified_70_20_10_and_disjoint() -> None:
    split = holdout_split(entries(50), (0.7, 0.2, 0.1), seed=1)
    for side, n in zip(SIDES, (35, 10, 5), strict=True):
        assert sorted(label_of(i) for i in split[side]) == sorted(CLASSES * n)
    ids = [i for side in SIDES for i in split[side]]
    assert len(ids) == len(set(ids)) == 200


def test_holdout_is_seeded() -> None:
    assert holdout_split(entries(), seed=1) == holdout_split(entries(), seed=1)
    assert holdout_split(entries(), seed=1)["test"] != holdout_split(entries(), seed=2)["test"]


def test_duplicates_and_bad_files_stay_out() -> None:
    data = entries(10)
    data[0].duplicate_of = data[1].image_id
    data[2].error = "broken"
    split = holdout_split(data)
    everything = {i for side in SIDES for i in split[side]}
    assert data[0].image_id not in everything and data[2].image_id not in everything
    assert len(everything) == 38


def test_kfold_test_sets_partition_the_data() -> None:
    data = entries(10)
    folds = [kfold_split(data, 5, k, val_fraction=0.25, seed=3) for k in range(5)]
    tests = [set(f["test"]) for f in folds]
    assert set().union(*tests) == {e.image_id for e in data}
    assert sum(len(t) for t in tests) == 40
    for f in folds:
        assert sorted(label_of(i) for i in f["test"]) == sorted(CLASSES * 2)
        assert len(f["val"]) == 8 and len(f["train"]) == 24
        sides = [set(f[s]) for s in SIDES]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])


def test_too_few_images_for_the_split() -> None:
    with pytest.raises(DataError, match="class Normal has only 2 usable image"):
        holdout_split(entries(2))
    with pytest.raises(DataError, match="fewer than 5 folds"):
        kfold_split(entries(3), 5, 0)
    with pytest.raises(ValueError, match="0 <= fold < folds"):
        kfold_split(entries(10), 5, 5)


def test_split_is_written_once_and_reused(tmp_path: Path) -> None:
    split, path = load_or_make_split(tmp_path, entries(10), seed=4)
    assert path.parent == tmp_path / "splits" and json.loads(path.read_text()) == split
    path.write_text(json.dumps({**split, "marker": []}))
    again, again_path = load_or_make_split(tmp_path, entries(10), seed=4)
    assert again_path == path and "marker" in again  # read back, not remade
    more, more_path = load_or_make_split(tmp_path, entries(11), seed=4)
    assert more_path != path and len(more["train"]) + len(more["val"]) + len(more["test"]) == 44
    fold, fold_path = load_or_make_split(tmp_path, entries(10), folds=5, fold=2, seed=4)
    assert fold_path.name.startswith("kfold5-fold2-seed4-") and len(fold["test"]) == 8
