"""A split is keyed by what decides it: a corrected BACH-name or group column makes a new split,
a fixed split read back is checked for groups on two sides, and eva's errors name the fix."""

import json
import logging
from pathlib import Path

import pytest

from breastnet import CLASSES
from breastnet.data.bach import DataError, IndexEntry
from breastnet.data.splits import SplitSpec, load_or_make_split, make_split, split_name

PREFIX = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}
# Per class three BACH numbers eva trains on (blocks 0-2), three it reports (its val ranges).
NUMBERS = {
    "Benign": (1, 11, 21, 42, 43, 44),
    "InSitu": (1, 11, 21, 41, 42, 43),
    "Invasive": (1, 11, 21, 42, 43, 44),
    "Normal": (1, 11, 21, 50, 51, 52),
}


def renamed_copy(root: Path) -> tuple[list[IndexEntry], Path]:
    """Six files a class named ``img<k>.png`` and a label CSV naming each one's BACH image
    (column ``bach``) and patient (column ``patient``, one per file)."""
    data, rows = [], []
    for c in CLASSES:
        for k, number in enumerate(NUMBERS[c]):
            image_id = f"{c}/img{k}"
            data.append(IndexEntry(image_id, str(root / f"{image_id}.png"), c, sha1=image_id))
            rows.append(f"{image_id}.png,{c},{PREFIX[c]}{number:03d}.tif,P{c}{k}\n")
    labels = root / "labels.csv"
    labels.write_text("file,label,bach,patient\n" + "".join(rows))
    return data, labels


def swap(path: Path, a: str, b: str) -> None:
    """Swap two values of a CSV in place (a corrected column)."""
    path.write_text(path.read_text().replace(a, "\0").replace(b, a).replace("\0", b))


def test_correcting_the_bach_names_in_place_makes_a_new_eva_split(tmp_path: Path) -> None:
    data, labels = renamed_copy(tmp_path)
    spec = SplitSpec(split="eva", groups="bach", bach_names="bach", labels_csv=str(labels))
    split, path = load_or_make_split(tmp_path, data, spec)
    assert "Benign/img0" in split["train"] + split["val"] and "Benign/img3" in split["test"]
    swap(labels, "b001.tif", "b042.tif")  # img0 is BACH's b042 (reported), img3 its b001
    corrected, corrected_path = load_or_make_split(tmp_path, data, spec)
    assert corrected_path != path and path.is_file()  # the old split is never read for it
    assert "Benign/img0" in corrected["test"] and "Benign/img3" not in corrected["test"]
    assert corrected_path.stem.startswith("eva-val0.2-groups_bach-names_bach-seed2019-")


def test_a_changed_group_column_makes_a_new_split(tmp_path: Path) -> None:
    data, labels = renamed_copy(tmp_path)
    spec = SplitSpec(folds=3, groups="patient", labels_csv=str(labels))
    before = split_name(spec, data)
    swap(labels, "PBenign0", "PInvasive5")  # the same groups, on other images
    after = split_name(spec, data)
    assert before != after and before.startswith("kfold3-fold0-groups_col-patient-seed2019-")
    assert after.rsplit("-", 1)[0] == before.rsplit("-", 1)[0]  # the sources hash alone


def test_a_fixed_split_read_back_is_checked_for_groups_on_two_sides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, labels = renamed_copy(tmp_path)
    sides = tmp_path / "sides.csv"  # eva's sides: the reported BACH blocks are test
    sides.write_text(
        "".join(f"{e.image_id}.png,{'test' if e.image_id[-1] > '2' else 'train'}\n" for e in data)
    )
    spec = SplitSpec(
        split_file=str(sides), groups="bach", bach_names="bach", labels_csv=str(labels)
    )
    with caplog.at_level(logging.WARNING):
        split, path = load_or_make_split(tmp_path, data, spec)
    assert "on two sides" not in caplog.text
    edited = {**split, "train": [*split["train"], "Benign/img3"]}  # BACH's b042: patient 16
    edited["test"] = [i for i in split["test"] if i != "Benign/img3"]
    path.write_text(json.dumps(edited))
    with caplog.at_level(logging.WARNING):
        again, _ = load_or_make_split(tmp_path, data, spec)
    assert again == edited
    assert (
        f"the fixed split {path.name} puts 1 source group(s) on two sides (patient16): "
        "numbers on it are not grouped by bach"
    ) in caplog.text


def test_eva_on_a_renumbered_copy_names_the_files_and_the_bach_name_column() -> None:
    """bach-dev's numbering (BACH's minus one): only its ``*000`` files have no BACH name,
    the others would be the wrong BACH images."""
    data = [
        IndexEntry(f"{c}/{PREFIX[c]}{n:03d}", f"/dev/{c}/{PREFIX[c]}{n:03d}.jpeg", c)
        for c in CLASSES
        for n in range(0, 100, 2)
    ]
    with pytest.raises(DataError) as error:
        make_split(data, SplitSpec(split="eva"))
    text = str(error.value)
    assert "4 of 200 file(s) have none (/dev/Normal/n000.jpeg, /dev/Benign/b000.jpeg" in text
    assert "renumbered copy" in text and "would map to the wrong BACH images" in text
    assert "data.labels_csv=<CSV with a bach_name column> data.bach_names=bach_name" in text


def test_eva_on_other_data_names_the_other_splits() -> None:
    data = [
        IndexEntry(f"{c}/slide{k}", f"/x/{c}/slide{k}.png", c) for c in CLASSES for k in (1, 2)
    ]
    with pytest.raises(DataError) as error:
        make_split(data, SplitSpec(split="eva"))
    text = str(error.value)
    assert "8 of 8 file(s) have none (/x/Normal/slide1.png" in text
    for other in ("data.split=[0.7,0.2,0.1]", "data.folds=K data.fold=i", "data.split_file=<csv"):
        assert other in text
