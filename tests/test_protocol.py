"""BACH's published protocol: eva's split, the organisers' patient groups, split files."""

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from breastnet import CLASSES
from breastnet.cli import run_stages
from breastnet.data.bach import DataError, IndexEntry
from breastnet.data.groups import resolve_groups
from breastnet.data.protocols import SIDES, crossing_groups
from breastnet.data.published import BachName, bach_patients, eva_side, parse_bach_name
from breastnet.data.splits import SplitSpec, make_split
from breastnet.lineage import Lineage
from breastnet.synthetic import write_synthetic_dataset

from conftest import ROOT, SMALL_RUN, compose_config

PREFIX = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}
BACH_DEV_CSV = Path(
    os.environ.get(
        "BREASTNET_BACH_DEV_PATIENTS", ROOT.parent / "shared" / "data" / "bach-dev-patients.csv"
    )
)
# Patient 14 in BACH's names: three classes, 36 images.
PATIENT_14 = (
    [f"Benign/b{i:03d}" for i in range(70, 91)]
    + [f"InSitu/is{i:03d}" for i in range(58, 70)]
    + [f"Invasive/iv{i:03d}" for i in range(71, 74)]
)


def bach_400() -> list[IndexEntry]:
    """BACH's 400 microscopy images by their own names (the files need not exist)."""
    return [
        IndexEntry(
            image_id=f"{c}/{PREFIX[c]}{i:03d}",
            path=f"/bach/{c}/{PREFIX[c]}{i:03d}.tif",
            label=c,
            sha1=f"{c}{i}",
        )
        for c in CLASSES
        for i in range(1, 101)
    ]


def per_class(ids: list[str]) -> dict[str, int]:
    return dict(Counter(i.split("/")[0] for i in ids))


def test_bach_names_parse_and_sort_as_eva_sorts_them() -> None:
    assert parse_bach_name("Benign/b001.tif") == BachName("Benign", 1)
    assert parse_bach_name("IS042") == BachName("InSitu", 42)
    assert parse_bach_name("n100.tif").index == 399
    assert parse_bach_name("iv001.tif").index == 200
    for name in ("b000.tif", "b101.tif", "x001.tif", "benign_1.png"):
        assert parse_bach_name(name) is None
    assert BachName("Invasive", 7).name == "iv007.tif"


def test_the_packaged_patient_map_is_bachs() -> None:
    patients = bach_patients()
    assert len(patients) == 145 and len(set(patients.values())) == 29
    assert {patients[parse_bach_name(f"{i.split('/')[1]}.tif")] for i in PATIENT_14} == {"14"}
    assert sum(p == "14" for p in patients.values()) == 36


def test_eva_split_is_evas_268_and_132_with_val_carved_from_its_training_side() -> None:
    data = bach_400()
    split = make_split(data, SplitSpec(split="eva", groups="bach", seed=3))
    # eva's val side, breastnet's test side: exactly its ranges.
    assert len(split["test"]) == 132
    assert per_class(split["test"]) == {"Benign": 48, "InSitu": 30, "Invasive": 31, "Normal": 23}
    assert len(split["train"]) + len(split["val"]) == 268
    assert all(eva_side(parse_bach_name(i)) == "train" for i in split["train"] + split["val"])
    # the model-selection images: about val_fraction of eva's training side, whole groups,
    # every class, seeded
    assert 0.15 < len(split["val"]) / 268 < 0.25
    assert set(per_class(split["val"])) == set(CLASSES)
    groups = resolve_groups(data, "bach")
    assert crossing_groups({**split, "test": []}, groups) == []
    assert make_split(data, SplitSpec(split="eva", groups="bach", seed=3)) == split
    assert make_split(data, SplitSpec(split="eva", groups="bach", seed=4))["val"] != split["val"]
    # no val carved: eva's own two sides
    bare = make_split(data, SplitSpec(split="eva", val_fraction=0))
    assert (len(bare["train"]), len(bare["val"]), len(bare["test"])) == (268, 0, 132)


@pytest.mark.skipif(not BACH_DEV_CSV.is_file(), reason=f"{BACH_DEV_CSV} not found")
def test_a_renamed_copy_resolves_through_its_bach_name_column() -> None:
    """bach-dev's files are BACH's numbers minus one: its CSV gives 134/66 and its own
    eva_split column agrees file by file."""
    with open(BACH_DEV_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    root = BACH_DEV_CSV.parent / "bach-dev"
    data = [
        IndexEntry(
            image_id=r["file"].rsplit(".", 1)[0], path=str(root / r["file"]), label=r["label"]
        )
        for r in rows
    ]
    spec = SplitSpec(
        split="eva",
        val_fraction=0,
        bach_names="bach_name",
        data_dir=str(root),
        labels_csv=str(BACH_DEV_CSV),
    )
    split = make_split(data, spec)
    assert (len(split["train"]), len(split["test"])) == (134, 66)
    expected = {r["file"].rsplit(".", 1)[0]: r["eva_split"] for r in rows}
    assert all(expected[i] == "val" for i in split["test"])
    assert all(expected[i] == "train" for i in split["train"])
    # by the files' own names it would be another split (b000 is no BACH image)
    with pytest.raises(DataError, match="data.bach_names"):
        make_split(data, SplitSpec(split="eva"))


def test_a_label_csv_column_of_bach_names(tmp_path: Path) -> None:
    renamed = [f"{c}/img{k}" for c in CLASSES for k in range(3)]
    first = {"Benign": 1, "InSitu": 60, "Invasive": 1, "Normal": 1}
    names = {
        i: f"{PREFIX[i.split('/')[0]]}{first[i.split('/')[0]] + int(i[-1]):03d}.tif"
        for i in renamed
    }
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "file,label,bach\n" + "".join(f"{i}.png,{i.split('/')[0]},{names[i]}\n" for i in renamed)
    )
    data = [IndexEntry(i, str(tmp_path / f"{i}.png"), i.split("/")[0]) for i in renamed]
    groups = resolve_groups(data, "bach", tmp_path, labels, "bach")
    # BACH's b001-b003 are unidentified (a block), is060-is062 are patient 14's
    assert groups["Benign/img0"] == "Benign/0" and groups["InSitu/img1"] == "patient14"
    labels.write_text(labels.read_text().replace("n002.tif", "slide7"))
    with pytest.raises(DataError, match=r"Normal/img1\.png.*no BACH name.*'slide7'"):
        resolve_groups(data, "bach", tmp_path, labels, "bach")


def test_bach_groups_keep_patients_on_one_side_in_every_fold() -> None:
    data = bach_400()
    groups = resolve_groups(data, "bach")
    assert {groups[i] for i in PATIENT_14} == {"patient14"}
    assert groups["Benign/b001"] == "Benign/0" and groups["Normal/n100"] == "Normal/10"
    tests = []
    for fold in range(5):
        split = make_split(data, SplitSpec(folds=5, fold=fold, groups="bach", seed=0))
        assert crossing_groups(split, groups) == []
        (side,) = {s for s in SIDES for i in PATIENT_14 if i in split[s]}  # all on one side
        tests.append(per_class(split["test"]))
    # Stratified though groups cross classes: each fold tests 14-26 images of each class
    # (20 in a perfectly even deal; patient 14 alone puts 21 Benign images in one fold).
    assert all(14 <= n <= 26 for counts in tests for n in counts.values())
    assert sum(sum(c.values()) for c in tests) == 400


def test_bach_groups_fall_back_to_blocks_of_the_file_number() -> None:
    other = [IndexEntry("Benign/slide-037", "/x/Benign/slide-037.png", "Benign")]
    assert resolve_groups(other, "bach") == {"Benign/slide-037": "Benign/3"}
    with pytest.raises(DataError, match="needs a number in the file name"):
        resolve_groups([IndexEntry("Benign/a", "/x/Benign/a.png", "Benign")], "bach")


def write_split_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("file,side\n" + "".join(f"{f},{s}\n" for f, s in rows))
    return path


def test_a_split_file_is_honoured(tmp_path: Path) -> None:
    data = bach_400()[::10]  # 40 images, 10 a class
    rows = [(f"{e.image_id}.tif", SIDES[k % 3]) for k, e in enumerate(data)]
    spec = SplitSpec(split_file=str(write_split_file(tmp_path / "split.csv", rows)))
    split = make_split(data, spec)
    assert {s: len(split[s]) for s in SIDES} == {"train": 14, "val": 13, "test": 13}
    assert split["test"] == sorted(e.image_id for k, e in enumerate(data) if k % 3 == 2)
    # without val rows, val is carved from the file's training side
    no_val = [(f, "train" if s == "val" else s) for f, s in rows]
    spec = SplitSpec(split_file=str(write_split_file(tmp_path / "s2.csv", no_val)), seed=1)
    carved = make_split(data, spec)
    assert carved["test"] == split["test"] and 5 <= len(carved["val"]) <= 6  # 20 % of 27
    assert sorted(carved["train"] + carved["val"]) == sorted(split["train"] + split["val"])


def test_a_bad_split_file_names_each_problem(tmp_path: Path) -> None:
    data = bach_400()[::10]  # Normal/n001 and n011 first
    rows = [(f"{e.image_id}.tif", "train") for e in data[2:]]  # lines 2-39
    rows += [("Benign/b999.tif", "test"), ("Normal/n001.tif", "holdout")]
    path = write_split_file(tmp_path / "split.csv", rows)
    with pytest.raises(DataError) as error:
        make_split(data, SplitSpec(split_file=str(path)))
    text = str(error.value)
    assert str(path) in text
    assert "line 40: 'Benign/b999.tif' names no image of the data set" in text
    assert "line 41: expected 'file,side' with side train/val/test" in text
    assert "2 image(s) of the data set have no row: /bach/Normal/n001.tif" in text
    missing = tmp_path / "absent.csv"
    with pytest.raises(DataError, match=f"data.split_file={missing}: no such file"):
        make_split(data, SplitSpec(split_file=str(missing)))


def test_settings_that_cannot_go_together() -> None:
    with pytest.raises(ValueError, match="data.split must be .* ratios or one of"):
        SplitSpec(split="evaa")
    with pytest.raises(ValueError, match="data.folds=null"):
        SplitSpec(split="eva", folds=5)
    with pytest.raises(ValueError, match="val_fraction"):
        SplitSpec(split="eva", val_fraction=1.0)


def test_prepare_makes_evas_split_of_a_renamed_generated_copy(tmp_path: Path) -> None:
    """The pipeline's own prepare stage: generated files renamed by a label CSV's column of
    BACH names get eva's sides, val carved from eva's training side in whole groups."""
    data = write_synthetic_dataset(tmp_path / "data", 6, 128, 128, seed=1)
    # Per class three BACH numbers eva trains on (three blocks of 10), three it reports.
    numbers = {
        "Benign": (1, 11, 21, 42, 43, 44),
        "InSitu": (1, 11, 21, 41, 42, 43),
        "Invasive": (1, 11, 21, 42, 43, 44),
        "Normal": (1, 11, 21, 50, 51, 52),
    }
    rows = [
        (f"{c}/{PREFIX[c]}{k:03d}.png", c, f"{PREFIX[c]}{n:03d}.tif")
        for c in CLASSES
        for k, n in enumerate(numbers[c])
    ]
    labels = tmp_path / "bach_names.csv"
    labels.write_text("file,label,bach\n" + "".join(",".join(r) + "\n" for r in rows))
    cfg = compose_config(
        tmp_path,
        *SMALL_RUN,
        f"data.data_dir={data}",
        f"data.labels_csv={labels}",
        "data.split=eva",
        "data.groups=bach",
        "data.bach_names=bach",
        "stages=[prepare]",
    )
    metrics = run_stages(cfg)
    assert (metrics["data/n_train_images"], metrics["data/n_val_images"]) == (8, 4)
    assert metrics["data/n_test_images"] == 12
    path = Lineage(cfg).split
    assert path.name.startswith("eva-val0.2-groups_bach-names_bach-seed2019-")
    split = json.loads(path.read_text())
    reported = {f"{c}/{PREFIX[c]}{k:03d}" for c in CLASSES for k in range(3, 6)}
    assert set(split["test"]) == reported
