"""Pixel size: TIFF tags read back, images rescaled to the tiling's, tiles of equal microns."""

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from breastnet.artifacts import artifact_key
from breastnet.data.bach import DataError, build_index, read_index, write_index
from breastnet.data.keys import cache_dir, dataset_key
from breastnet.data.resolution import read_mpp, rescale
from breastnet.data.store import PatchCache, StainSettings, Tiling, normalise_and_tile
from breastnet.inference.files import ImageFiles

from conftest import compose_config, tissue_like, write_image

TILING = Tiling(tile_size=128, stride=128, patch_size=64)  # at BACH's 0.42 µm/px


def doubled(image: np.ndarray) -> np.ndarray:
    """The same tissue at half the pixel size (0.21 µm/px): twice the pixels each way."""
    height, width = image.shape[:2]
    return cv2.resize(image, (2 * width, 2 * height), interpolation=cv2.INTER_CUBIC)


def write_tiff(path: Path, image: np.ndarray, **tags: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **tags)
    return path


def test_half_the_pixel_size_gives_the_same_tiles() -> None:
    """Per-pixel noise is the worst case for a 2x cubic up and area down: measured 1.12 grey
    levels mean absolute difference (max 6); blurred or real tissue differs by < 0.2."""
    image = tissue_like(3, 300, 420)
    patches, positions = normalise_and_tile(image, TILING, None)
    half, half_positions = normalise_and_tile(doubled(image), TILING, None, mpp=0.21)
    assert half.shape == patches.shape == (6, 64, 64, 3)  # 2x3 tiles of 128 px = 54 µm
    assert np.array_equal(half_positions, positions)
    assert np.abs(half.astype(int) - patches).mean() < 2


@pytest.mark.slow
def test_half_the_pixel_size_of_a_real_image(bach_dev: Path) -> None:
    """A real 1536x1536 image: measured 0.15 grey levels mean absolute difference (max 2)."""
    image = np.asarray(Image.open(sorted((bach_dev / "Invasive").iterdir())[0]).convert("RGB"))
    tiling = Tiling(512, 512, 299)
    patches, positions = normalise_and_tile(image, tiling, None)
    half, half_positions = normalise_and_tile(doubled(image), tiling, None, mpp=0.21)
    assert half.shape == patches.shape and np.array_equal(half_positions, positions)
    assert np.abs(half.astype(int) - patches).mean() < 0.5


def test_rescaling_goes_both_ways_and_ignores_small_differences() -> None:
    image = tissue_like(1, 100, 200)
    assert rescale(image, 0.84, 0.42).shape == (200, 400, 3)  # coarser pixels: enlarged
    assert rescale(image, 0.21, 0.42).shape == (50, 100, 3)
    assert rescale(image, 0.425, 0.42) is image  # within 2 %
    assert rescale(image, None, 0.42) is image
    assert Tiling().tile_um == pytest.approx(215.04)


@pytest.mark.parametrize(
    "tags",
    [
        {"dpi": (25400 / 0.21, 25400 / 0.21)},
        {"resolution_unit": 3, "x_resolution": 10000 / 0.21, "y_resolution": 10000 / 0.21},
        {"description": "Aperio Image Library v12.0.15 |AppMag = 40|MPP = 0.21|Left = 1.2"},
    ],
    ids=["inch", "cm", "aperio"],
)
def test_tiff_tags_give_the_pixel_size(tmp_path: Path, tags: dict) -> None:
    path = write_tiff(tmp_path / "a.tif", tissue_like(0), **tags)
    assert read_mpp(path) == pytest.approx(0.21, abs=1e-4)


def test_screen_resolutions_and_other_formats_say_nothing(tmp_path: Path) -> None:
    assert read_mpp(write_tiff(tmp_path / "a.tif", tissue_like(0), dpi=(72, 72))) is None
    assert read_mpp(write_tiff(tmp_path / "b.tif", tissue_like(0))) is None
    assert read_mpp(write_image(tmp_path / "c.png", tissue_like(0))) is None
    (tmp_path / "d.tif").write_bytes(b"not an image")
    assert read_mpp(tmp_path / "d.tif") is None


@pytest.fixture
def tagged(tmp_path: Path) -> Path:
    """One image per class: at 0.21 µm/px (inch and cm tags), 72 dpi (no pixel size), PNG."""
    root = tmp_path / "bach"
    image = tissue_like(5, 96, 128)
    write_tiff(root / "Normal/n0.tif", doubled(image), dpi=(25400 / 0.21,) * 2)
    write_tiff(
        root / "Benign/b0.tif",
        doubled(tissue_like(6, 96, 128)),
        resolution_unit=3,
        x_resolution=10000 / 0.21,
        y_resolution=10000 / 0.21,
    )
    write_tiff(root / "InSitu/is0.tif", tissue_like(7, 96, 128), dpi=(72, 72))
    write_image(root / "Invasive/iv0.png", image)
    return root


def test_the_index_records_each_files_pixel_size(tagged: Path, tmp_path: Path) -> None:
    entries = build_index(tagged, min_size=64, mpp=0.42, num_workers=1)
    found = {e.image_id: e.mpp for e in entries}
    assert found["InSitu/is0"] is None and found["Invasive/iv0"] is None  # no tags: no size
    assert (found["Normal/n0"], found["Benign/b0"]) == pytest.approx((0.21, 0.21), abs=1e-4)
    write_index(tmp_path / "index.csv", entries)
    assert read_index(tmp_path / "index.csv") == entries
    rows = (tmp_path / "index.csv").read_text().splitlines()
    assert not [r for r in rows if r.endswith(",0.0")]  # an empty field, never "mpp 0.0"
    # An index that wrote 0.0 for "none" reads as None.
    zero = tmp_path / "zero.csv"
    zero.write_text("\n".join(r + "0.0" if r.endswith(",") else r for r in rows) + "\n")
    assert [e.mpp for e in read_index(zero)] == [e.mpp for e in entries]
    # An index written before pixel sizes: read, and its reused files get their tags read.
    old = tmp_path / "old.csv"
    lines = (tmp_path / "index.csv").read_text().splitlines()
    old.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    previous = read_index(old)
    assert {e.mpp for e in previous} == {None}
    again = build_index(tagged, min_size=64, mpp=0.42, num_workers=1, previous=previous)
    assert [e.mpp for e in again] == [e.mpp for e in entries]


def test_prepare_rescales_each_file_by_its_pixel_size(tagged: Path, tmp_path: Path) -> None:
    """Normal/n0 is Invasive/iv0 at 0.21 µm/px: the same tiles once rescaled (measured 1.11
    grey levels mean absolute difference, per-pixel noise as above)."""
    entries = build_index(tagged, min_size=64, mpp=0.42, num_workers=1)
    cache = PatchCache(tmp_path / "cache")
    tiling = Tiling(64, 64, 32)
    records = cache.build(entries, tiling, StainSettings(), num_workers=0)
    assert records["Normal/n0"]["shape"] == records["Invasive/iv0"]["shape"] == [2, 32, 32, 3]
    diff = cache.load("Normal/n0").astype(int) - cache.load("Invasive/iv0")
    assert np.abs(diff).mean() < 2


def test_the_size_check_is_after_rescaling(tagged: Path) -> None:
    """Normal/n0 is 256x192 at 0.21 µm/px, so 128x96 at the tiling's 0.42: too small for a
    100 px tile under ``trim``; a fit rule that pads (min_size 1) takes every image."""
    with pytest.raises(DataError) as error:
        build_index(tagged, min_size=100, mpp=0.42, num_workers=1)
    message = str(error.value)
    assert "n0.tif: image 256x192 (128x96 at 0.42 µm/px) is smaller than one 100 px tile" in (
        message
    )
    assert "at most 96 px, or data.fit=pad or overlap" in message
    assert all(e.usable for e in build_index(tagged, min_size=1, mpp=0.42, num_workers=1))


def test_predict_files_carry_the_pixel_size_they_were_taken_at(tagged: Path) -> None:
    files = [tagged / "Normal/n0.tif", tagged / "Invasive/iv0.png"]
    tiling = replace(Tiling(128, 128, 32), fit="pad")  # both are smaller than a tile
    dataset = ImageFiles(files, tagged, tiling, StainSettings(), [read_mpp(f) for f in files])
    samples = [dataset[0], dataset[1]]
    assert [s["mpp"] for s in samples] == pytest.approx([0.21, 0.42], abs=1e-4)
    assert all(s["x"].shape[0] == 1 and "error" not in s for s in samples)


def test_cache_key_moves_only_off_the_defaults(tmp_path: Path) -> None:
    """Work dirs made before pixel sizes and fit rules keep their cache (and model) keys."""
    stain = {"method": "none"}

    def key(*overrides: str) -> str:
        return cache_dir(tmp_path, compose_config(tmp_path, *overrides).data, stain).name

    data = compose_config(tmp_path).data
    old = artifact_key(
        {
            "data": dataset_key(data.data_dir, data.labels_csv),
            "tiling": {k: data[k] for k in ("tile_size", "stride", "patch_size")},
            "stain": stain,
        }
    )
    assert key() == old
    assert len({old, key("data.mpp=0.25"), key("data.fit=overlap"), key("data.fit=pad")}) == 4
