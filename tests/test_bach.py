"""Ingest: labels from folders and CSVs, and a clear error naming the file for bad input."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastnet import CLASSES
from breastnet.data import bach
from breastnet.data.bach import DataError, build_index, find_images, read_rgb
from breastnet.labels import canonical_label

from conftest import tissue_like, write_image


def index(root: Path, **kw) -> list[bach.IndexEntry]:
    return build_index(root, min_size=32, num_workers=1, **kw)


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("Normal", "Normal"),
        ("benign", "Benign"),
        ("in_situ", "InSitu"),
        ("In Situ", "InSitu"),
        ("InSitu", "InSitu"),
        ("INVASIVE", "Invasive"),
        ("Photos", None),
    ],
)
def test_canonical_label(name: str, label: str | None) -> None:
    assert canonical_label(name) == label


def test_index_reads_labels_sizes_and_hashes(tiny_bach: Path) -> None:
    entries = index(tiny_bach)
    assert len(entries) == 16
    assert {e.label for e in entries} == set(CLASSES)
    assert all(e.usable and (e.width, e.height) == (64, 48) and len(e.sha1) == 40 for e in entries)
    assert entries[0].image_id == "Benign/be000"


def test_official_layout_with_photos_parent_and_spelling_variants(tmp_path: Path) -> None:
    for c, folder in enumerate(["normal", "Benign", "In Situ", "invasive_carcinoma"]):
        write_image(tmp_path / "Photos" / folder / f"x{c}.tif", tissue_like(c))
    labels = {e.image_id: e.label for e in index(tmp_path)}
    assert labels == {
        "Photos/normal/x0": "Normal",
        "Photos/Benign/x1": "Benign",
        "Photos/In Situ/x2": "InSitu",
        "Photos/invasive_carcinoma/x3": "Invasive",
    }


def test_truncated_image_is_named(tiny_bach: Path) -> None:
    bad = write_image(tiny_bach / "Benign" / "broken.jpg", tissue_like(99, 200, 200))
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=r"broken\.jpg: cannot read image"):
        index(tiny_bach)


def test_not_an_image_is_named(tiny_bach: Path) -> None:
    (tiny_bach / "Normal" / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png: cannot read image"):
        index(tiny_bach)


def test_every_bad_file_listed_in_one_error(tiny_bach: Path) -> None:
    (tiny_bach / "Normal" / "a.png").write_text("x")
    write_image(tiny_bach / "Invasive" / "small.png", tissue_like(1, 20, 20))
    with pytest.raises(DataError) as err:
        index(tiny_bach)
    message = str(err.value)
    assert "2 problem(s)" in message and "a.png" in message and "small.png" in message
    assert "data.skip_bad=true" in message


def test_image_smaller_than_a_tile(tiny_bach: Path) -> None:
    write_image(tiny_bach / "Invasive" / "small.png", tissue_like(1, 20, 30))
    with pytest.raises(DataError, match=r"small\.png: image 30x20 is smaller than one 32 px tile"):
        index(tiny_bach)


def test_grayscale_and_rgba_are_converted_with_a_warning(
    tiny_bach: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gray = write_image(tiny_bach / "Normal" / "gray.png", tissue_like(5)[..., 0])
    rgba = np.dstack([tissue_like(6), np.full((48, 64), 255, np.uint8)])
    rgba[:10, :, 3] = 0  # transparent rows: background, composited on white
    rgba_path = write_image(tiny_bach / "Normal" / "rgba.png", rgba)
    with caplog.at_level(logging.WARNING):
        entries = {e.image_id: e for e in index(tiny_bach)}
    assert entries["Normal/gray"].mode == "L" and entries["Normal/rgba"].mode == "RGBA"
    assert "gray.png: L image converted to RGB" in caplog.text
    assert "rgba.png: RGBA image converted to RGB" in caplog.text
    image, _ = read_rgb(gray)
    assert image.shape == (48, 64, 3) and (image[..., 0] == image[..., 2]).all()
    image, _ = read_rgb(rgba_path)
    assert (image[:10] == 255).all() and (image[10:] == rgba[10:, :, :3]).all()


def test_empty_class_folder(tiny_bach: Path) -> None:
    for f in (tiny_bach / "InSitu").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"InSitu: class folder holds no images"):
        index(tiny_bach)


def test_missing_class(tiny_bach: Path) -> None:
    for f in (tiny_bach / "InSitu").iterdir():
        f.unlink()
    (tiny_bach / "InSitu").rmdir()
    with pytest.raises(DataError, match="no usable images for class"):
        index(tiny_bach)


def test_unlabelled_folder(tiny_bach: Path) -> None:
    write_image(tiny_bach / "Other" / "o1.png", tissue_like(3))
    with pytest.raises(DataError, match=r"o1\.png: no label: its folder 'Other' is not a class"):
        index(tiny_bach)


def test_label_csv_that_disagrees_with_the_folders(tiny_bach: Path) -> None:
    csv = tiny_bach / "labels.csv"
    csv.write_text("file,label\nbe000.png,Benign\nno001.png,Invasive\n")
    with pytest.raises(
        DataError, match=r"no001\.png: label file .* says Invasive .* Normal folder"
    ):
        index(tiny_bach, labels_csv=csv)


def test_label_csv_with_unknown_label(tiny_bach: Path) -> None:
    csv = tiny_bach / "labels.csv"
    csv.write_text("be000.png,Benign\nno001.png,Cancerous\n")
    unknown = r"'Cancerous' \(1 file\)(.|\n)*labels\.csv gives the unknown label 'Cancerous'"
    with pytest.raises(DataError, match=unknown):
        index(tiny_bach, labels_csv=csv)


def test_bach_ground_truth_csv_labels_a_flat_folder(tmp_path: Path) -> None:
    lines = []
    for c, name in enumerate(CLASSES):
        write_image(tmp_path / "Photos" / f"img{c}.tif", tissue_like(c))
        lines.append(f"img{c}.tif,{name}")
    (tmp_path / "Photos" / bach.GROUND_TRUTH_CSV).write_text("\n".join(lines) + "\n")
    labels = {e.image_id: e.label for e in index(tmp_path)}
    assert labels == {f"Photos/img{c}": name for c, name in enumerate(CLASSES)}


def test_skip_bad_keeps_going_and_records_the_error(
    tiny_bach: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tiny_bach / "Normal" / "bad.png").write_text("x")
    with caplog.at_level(logging.WARNING):
        entries = {e.image_id: e for e in index(tiny_bach, skip_bad=True)}
    assert not entries["Normal/bad"].usable and "cannot read image" in entries["Normal/bad"].error
    assert sum(e.usable for e in entries.values()) == 16
    assert "skipped:" in caplog.text and "bad.png" in caplog.text


def test_exact_duplicates_are_flagged(tiny_bach: Path, caplog: pytest.LogCaptureFixture) -> None:
    original = tiny_bach / "Benign" / "be001.png"
    (tiny_bach / "Benign" / "copy.png").write_bytes(original.read_bytes())
    with caplog.at_level(logging.WARNING):
        entries = {e.image_id: e for e in index(tiny_bach)}
    assert entries["Benign/copy"].duplicate_of == "Benign/be001"
    assert not entries["Benign/copy"].usable and entries["Benign/be001"].usable
    assert "exact duplicate" in caplog.text


def test_index_roundtrip_and_reuse_without_decoding(
    tiny_bach: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = index(tiny_bach)
    bach.write_index(tmp_path / "index.csv", entries)
    previous = bach.read_index(tmp_path / "index.csv")
    assert previous == entries

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(bach, "read_rgb", no_decoding)
    assert index(tiny_bach, previous=previous) == entries
    changed = tiny_bach / "Normal" / "no000.png"
    Image.fromarray(tissue_like(77)).save(changed)
    with pytest.raises(AssertionError, match="no000.png decoded again"):
        index(tiny_bach, previous=previous)


def test_broken_links_are_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder of links whose targets moved: the images still there are found, the broken
    links are counted and named, not skipped without a word."""
    write_image(tmp_path / "Normal" / "n000.png", tissue_like(0))
    for i in (1, 2):
        (tmp_path / "Normal" / f"n00{i}.png").symlink_to(f"../../moved/n00{i}.png")
    found = find_images(tmp_path)
    assert [p.name for p in found] == ["n000.png"]
    (warning,) = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert warning.startswith("2 broken symbolic link(s)") and "n002.png" in warning
