"""Splits are stratified, seeded, reused, and never put an image or a source on two sides."""

import json
from collections import Counter
from pathlib import Path

import pytest

from breastnet import CLASSES
from breastnet.artifacts import config_hash
from breastnet.data.bach import DataError, IndexEntry, data_fingerprint
from breastnet.data.groups import resolve_groups
from breastnet.data.protocols import SIDES, crossing_groups, holdout_split, kfold_split
from breastnet.data.splits import SplitSpec, load_or_make_split, split_name, split_summary


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
    split, path = load_or_make_split(tmp_path, entries(10), SplitSpec(seed=4))
    assert path.parent == tmp_path / "splits" and json.loads(path.read_text()) == split
    path.write_text(json.dumps({**split, "marker": []}))
    again, again_path = load_or_make_split(tmp_path, entries(10), SplitSpec(seed=4))
    assert again_path == path and "marker" in again  # read back, not remade
    more, more_path = load_or_make_split(tmp_path, entries(11), SplitSpec(seed=4))
    assert more_path != path and len(more["train"]) + len(more["val"]) + len(more["test"]) == 44
    fold, fold_path = load_or_make_split(tmp_path, entries(10), SplitSpec(folds=5, fold=2, seed=4))
    assert fold_path.name.startswith("kfold5-fold2-seed4-") and len(fold["test"]) == 8


def test_null_grouping_reproduces_the_splits_made_before_groups(tmp_path: Path) -> None:
    # Hashes of the splits the by-image code made before data.groups existed.
    assert config_hash(holdout_split(entries(30), seed=5)) == "66e2e1f1a0"
    folds = [kfold_split(entries(30), 5, k, 0.25, seed=5) for k in range(5)]
    assert config_hash(folds) == "0af944d24f"
    split, path = load_or_make_split(tmp_path, entries(30), SplitSpec(seed=5))
    assert split == holdout_split(entries(30), seed=5)
    assert path.stem == f"holdout-0.7-0.2-0.1-seed5-{data_fingerprint(entries(30))}"


def test_split_seed_replaces_seed_for_the_split(tmp_path: Path) -> None:
    settings = {"split": [0.7, 0.2, 0.1], "data_dir": "."}
    a_spec = SplitSpec.from_data(settings | {"seed": 1, "split_seed": 7})
    b_spec = SplitSpec.from_data(settings | {"seed": 2, "split_seed": 7})
    a, a_path = load_or_make_split(tmp_path, entries(10), a_spec)
    b, b_path = load_or_make_split(tmp_path, entries(10), b_spec)
    assert a == b == holdout_split(entries(10), seed=7) and a_path == b_path
    assert a_path.stem == split_name(SplitSpec(seed=7), entries(10))


def test_split_name_carries_the_grouping(tmp_path: Path) -> None:
    data = entries(10)
    fingerprint = data_fingerprint(data)
    blocks = config_hash({"groups": resolve_groups(data, "blocks:10")}, 8)
    assert split_name(SplitSpec(seed=3, groups="blocks:10"), data) == (
        f"holdout-0.7-0.2-0.1-groups_blocks10-seed3-{fingerprint}-{blocks}"
    )
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "file,label,patient\n" + "".join(f"{e.image_id},{e.label},P{e.sha1}\n" for e in data)
    )
    patient = SplitSpec(folds=5, fold=2, seed=3, groups="patient", labels_csv=str(labels))
    assert split_name(patient, data).startswith("kfold5-fold2-groups_col-patient-seed3-")
    by_image = f"kfold5-fold2-seed3-{fingerprint}"
    assert split_name(SplitSpec(folds=5, fold=2, seed=3), data) == by_image
    # the val share of a k-fold split, when not the paper's ratios
    other = SplitSpec(split=(0.6, 0.2, 0.2), folds=5, fold=2, seed=3)
    assert split_name(other, data) == f"kfold5-fold2-split0.6-0.2-0.2-seed3-{fingerprint}"


def class_counts(ids: list[str]) -> Counter:
    return Counter(label_of(i) for i in ids)


def test_grouped_holdout_keeps_groups_whole_and_classes_at_the_ratios() -> None:
    data = entries(50)
    groups = resolve_groups(data, "blocks:5")  # 10 groups of 5 images per class
    for seed in range(5):
        split = holdout_split(data, (0.7, 0.2, 0.1), seed, groups)
        assert crossing_groups(split, groups) == []
        for side, n in zip(SIDES, (35, 10, 5), strict=True):
            assert class_counts(split[side]) == dict.fromkeys(CLASSES, n)
    assert holdout_split(data, seed=1, groups=groups) != holdout_split(data, seed=2, groups=groups)


def test_grouped_holdout_with_uneven_groups_is_within_one_image_where_groups_allow() -> None:
    data = entries(60)
    groups = {e.image_id: f"{e.label}/{int(e.image_id[-3:]) % 20}" for e in data}  # 3 each
    split = holdout_split(data, (0.7, 0.2, 0.1), 0, groups)
    assert crossing_groups(split, groups) == []
    for side, ratio in zip(SIDES, (0.7, 0.2, 0.1), strict=True):
        for n in class_counts(split[side]).values():
            assert abs(n - 60 * ratio) <= 1 + 1e-9
    # Singletons: the grouped code path balances as well as the by-image one.
    singletons = {e.image_id: e.image_id for e in data}
    split = holdout_split(data, (0.7, 0.2, 0.1), 0, singletons)
    assert class_counts(split["test"]) == dict.fromkeys(CLASSES, 6)


def test_a_group_may_hold_several_classes() -> None:
    data = entries(20)
    patients = {e.image_id: f"P{int(e.image_id[-3:])}" for e in data}  # one image per class
    for k in range(4):
        split = kfold_split(data, 4, k, 0.25, seed=0, groups=patients)
        assert crossing_groups(split, patients) == []
        assert class_counts(split["test"]) == dict.fromkeys(CLASSES, 5)


def test_grouped_kfold_partitions_groups_and_stratifies() -> None:
    data = entries(50)
    groups = resolve_groups(data, "blocks:5")
    folds = [kfold_split(data, 5, k, 0.25, seed=3, groups=groups) for k in range(5)]
    assert sorted(i for f in folds for i in f["test"]) == sorted(e.image_id for e in data)
    for f in folds:
        assert crossing_groups(f, groups) == []
        assert class_counts(f["test"]) == dict.fromkeys(CLASSES, 10)  # 2 groups per class
        assert class_counts(f["val"]) == dict.fromkeys(CLASSES, 10)
        assert len(f["train"]) == 120


def test_too_few_groups_fail_clearly() -> None:
    data = entries(20)
    groups = resolve_groups(data, "blocks:10")  # 2 groups per class
    with pytest.raises(DataError, match="class Normal has only 2 source group.*0.7/0.2/0.1"):
        holdout_split(data, (0.7, 0.2, 0.1), 0, groups)
    with pytest.raises(DataError, match="class Normal has 2 source group.*fewer than 5 folds"):
        kfold_split(data, 5, 0, seed=0, groups=groups)
    split = holdout_split(data, (0.5, 0.5, 0), 0, groups)  # two sides: one group each
    assert crossing_groups(split, groups) == [] and split["test"] == []


def test_grouped_split_file_is_reused_and_checked(tmp_path: Path) -> None:
    data = entries(50)
    grouped = SplitSpec(folds=5, fold=1, seed=0, groups="blocks:5")
    split, path = load_or_make_split(tmp_path, data, grouped)
    assert "-groups_blocks5-" in path.name
    assert crossing_groups(split, resolve_groups(data, "blocks:5")) == []
    again, _ = load_or_make_split(tmp_path, data, grouped)
    assert again == split
    leaked = {**split, "train": split["train"] + split["test"][:1]}
    path.write_text(json.dumps(leaked))
    with pytest.raises(DataError, match="groups on two sides"):
        load_or_make_split(tmp_path, data, grouped)


def test_split_summary_counts_images_and_groups() -> None:
    data = entries(50)
    groups = resolve_groups(data, "blocks:5")
    spec = SplitSpec(groups="blocks:5")
    labels = {e.image_id: e.label for e in data}
    summary = split_summary(holdout_split(data, seed=0, groups=groups), groups, spec, labels)
    assert summary["n_images"] == {"train": 140, "val": 40, "test": 20}
    assert summary["n_groups"] == {"train": 28, "val": 8, "test": 4}
    assert (
        summary["text"]
        == "hold-out 0.7/0.2/0.1, grouped by blocks:5: 140 train / 40 val / 20 test images, "
        "28/8/4 groups"
    )
    assert summary["n_classes"]["test"] == dict.fromkeys(sorted(CLASSES), 5)
    by_image = split_summary({"train": ["a", "b"], "val": [], "test": ["c"]})
    assert by_image["text"] == (
        "hold-out 0.7/0.2/0.1, by image: 2 train / 1 test images, 2/1 groups"
    )
    assert by_image["n_groups"] == {"train": 2, "val": 0, "test": 1}
