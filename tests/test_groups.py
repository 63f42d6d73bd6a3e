"""Source groups come from file numbers, a regex or a CSV column, and bad names fail clearly."""

from pathlib import Path

import pytest

from breastnet.data.bach import DataError, IndexEntry
from breastnet.data.groups import resolve_groups, spec_token


def entry(image_id: str, label: str, root: Path = Path("/data")) -> IndexEntry:
    return IndexEntry(image_id=image_id, path=str(root / f"{image_id}.tif"), label=label, sha1="")


def test_blocks_group_by_class_and_file_number() -> None:
    data = [
        entry("Invasive/iv037", "Invasive"),
        entry("Invasive/iv030", "Invasive"),
        entry("Invasive/iv040", "Invasive"),
        entry("Benign/b037", "Benign"),
        entry("Photos/Normal/slide2_n007", "Normal"),  # the last number in the name counts
    ]
    assert resolve_groups(data, "blocks:10") == {
        "Invasive/iv037": "Invasive/3",
        "Invasive/iv030": "Invasive/3",
        "Invasive/iv040": "Invasive/4",
        "Benign/b037": "Benign/3",
        "Photos/Normal/slide2_n007": "Normal/0",
    }
    assert resolve_groups(data[:1], "blocks:1") == {"Invasive/iv037": "Invasive/37"}


def test_null_is_one_group_per_usable_image() -> None:
    data = [entry("Benign/b001", "Benign"), entry("Benign/b002", "Benign")]
    data[1].error = "broken"
    assert resolve_groups(data, None) == {"Benign/b001": "Benign/b001"}


def test_regex_takes_the_first_group_of_the_relative_path() -> None:
    data = [entry("Benign/p7_b001", "Benign"), entry("Normal/p12_n001", "Normal")]
    assert resolve_groups(data, r"regex:/p(\d+)_") == {
        "Benign/p7_b001": "7",
        "Normal/p12_n001": "12",
    }
    assert resolve_groups(data[:1], r"regex:^(\w+)/.*\.tif$") == {"Benign/p7_b001": "Benign"}


def test_csv_column(tmp_path: Path) -> None:
    data = [entry("Benign/b001", "Benign", tmp_path), entry("Normal/n001", "Normal", tmp_path)]
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label,patient\nb001.tif,Benign,P1\nNormal/n001.tif,Normal,P1\n")
    assert resolve_groups(data, "patient", labels_csv=csv) == {
        "Benign/b001": "P1",
        "Normal/n001": "P1",
    }
    # BACH's ground-truth file is found in data_dir, as the index finds it.
    (tmp_path / "microscopy_ground_truth.csv").write_text(csv.read_text())
    assert resolve_groups(data, "patient", data_dir=tmp_path)["Benign/b001"] == "P1"


def test_csv_errors_name_the_file(tmp_path: Path) -> None:
    data = [entry("Benign/b001", "Benign", tmp_path), entry("Benign/b002", "Benign", tmp_path)]
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label,patient\nb001.tif,Benign,P1\n")
    with pytest.raises(DataError, match=r"b002\.tif: no 'patient' group for this image in"):
        resolve_groups(data, "patient", labels_csv=csv)
    with pytest.raises(DataError, match=r"labels\.csv: data.groups='slide' names a column"):
        resolve_groups(data, "slide", labels_csv=csv)
    with pytest.raises(DataError, match="there is no label CSV"):
        resolve_groups(data, "patient", data_dir=tmp_path)


def test_names_without_a_group_fail_naming_the_file() -> None:
    with pytest.raises(DataError, match=r"/data/Benign/benign\.tif: .*has none"):
        resolve_groups([entry("Benign/benign", "Benign")], "blocks:10")
    with pytest.raises(DataError, match=r"/data/Benign/b001\.tif: .*does not match"):
        resolve_groups([entry("Benign/b001", "Benign")], r"regex:patient(\d+)")


@pytest.mark.parametrize("spec", ["blocks:0", "blocks:x", "regex:[", "regex:no_group", " "])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="data.groups"):
        resolve_groups([entry("Benign/b001", "Benign")], spec)


def test_spec_tokens_are_file_name_safe() -> None:
    assert spec_token("blocks:10") == "blocks10"
    assert spec_token("patient") == "col-patient"
    assert spec_token("patient id").startswith("col-") and " " not in spec_token("patient id")
    regex = spec_token(r"regex:/p(\d+)_")
    assert regex.startswith("regex-") and regex != spec_token(r"regex:/q(\d+)_")
