"""Generated demo data: BACH layout, determinism, stain model and learnable classes."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from breastnet import CLASSES
from breastnet.data.resolution import read_mpp
from breastnet.synthetic.dataset import PREFIXES, image_rng, main, write_synthetic_dataset
from breastnet.synthetic.render import STAIN_REF, render_image, render_with_stain
from breastnet.synthetic.rescan import rescan

ROOT = Path(__file__).resolve().parents[1]


def _od(rgb: np.ndarray) -> np.ndarray:
    """Optical density per pixel, [N, 3]."""
    return -np.log(np.maximum(rgb.reshape(-1, 3).astype(np.float64), 1) / 255)


def _features(rgb: np.ndarray) -> list[float]:
    """Cheap per-image statistics: nuclear fraction, white fraction, nucleus size and count."""
    od = _od(rgb)
    hem = (od @ np.linalg.pinv(STAIN_REF))[:, 0].reshape(rgb.shape[:2])
    mask = (hem > 0.55).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    areas = stats[1:, cv2.CC_STAT_AREA]
    areas = areas[areas >= 4]
    return [
        float(mask.mean()),
        float((od.sum(1) < 0.3).mean()),
        float(np.log1p(np.median(areas))) if areas.size else 0.0,
        areas.size / mask.size * 1e4,
    ]


@pytest.mark.parametrize("ext", ["png", "jpeg", "tif"])
def test_layout_and_counts(tmp_path: Path, ext: str) -> None:
    out = write_synthetic_dataset(tmp_path / "demo", n_per_class=2, width=96, height=64, ext=ext)
    assert out == tmp_path / "demo"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(CLASSES)
    for name, prefix in zip(CLASSES, PREFIXES, strict=True):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == [f"{prefix}000.{ext}", f"{prefix}001.{ext}"]  # no temp files left
        with Image.open(out / name / files[0]) as im:
            assert (im.mode, im.size) == ("RGB", (96, 64))
    assert "generated" in (out / "README.txt").read_text().lower()
    assert [p.name for p in out.iterdir() if p.is_file()] == ["README.txt"]


def test_existing_files_are_kept(tmp_path: Path) -> None:
    out = write_synthetic_dataset(tmp_path, n_per_class=1, width=64, height=48)
    marker = out / "Benign" / "b000.png"
    marker.write_bytes(b"not regenerated")
    write_synthetic_dataset(tmp_path, n_per_class=2, width=64, height=48)
    assert marker.read_bytes() == b"not regenerated"
    assert sorted(p.name for p in (out / "Benign").iterdir()) == ["b000.png", "b001.png"]
    # Image i depends only on (seed, class, i): growing the set adds, never reshuffles.
    fresh = write_synthetic_dataset(tmp_path / "fresh", n_per_class=2, width=64, height=48)
    assert (out / "Normal/n001.png").read_bytes() == (fresh / "Normal/n001.png").read_bytes()


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    kw = {"n_per_class": 1, "width": 80, "height": 60}
    a = write_synthetic_dataset(tmp_path / "a", seed=3, **kw)
    b = write_synthetic_dataset(tmp_path / "b", seed=3, **kw)
    c = write_synthetic_dataset(tmp_path / "c", seed=4, **kw)
    for name, prefix in zip(CLASSES, PREFIXES, strict=True):
        rel = f"{name}/{prefix}000.png"
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
        assert (a / rel).read_bytes() != (c / rel).read_bytes()


@pytest.mark.parametrize("label", range(len(CLASSES)))
def test_render_image(label: int) -> None:
    img = render_image(label, 160, 120, np.random.default_rng(7))
    assert img.shape == (120, 160, 3)
    assert img.dtype == np.uint8
    assert np.array_equal(img, render_image(label, 160, 120, np.random.default_rng(7)))
    other = render_image(label, 160, 120, np.random.default_rng(8))
    assert np.abs(img.astype(int) - other).mean() > 5
    # Stained tissue, not a flat colour: dark nuclei and a spread of intensities.
    assert img.min() < 120
    assert img.reshape(-1, 3).std(0).min() > 10


def test_bad_label() -> None:
    with pytest.raises(ValueError, match="label"):
        render_image(4, 64, 64, np.random.default_rng(0))


def test_od_lies_in_the_stain_plane() -> None:
    stains = []
    for label in range(len(CLASSES)):
        for i in range(2):
            img, stain = render_with_stain(label, 128, 96, image_rng(0, label, i))
            stains.append(stain)
            assert stain.shape == (2, 3)
            np.testing.assert_allclose(np.linalg.norm(stain, axis=1), 1.0, atol=1e-9)
            od = _od(img)
            norm = np.linalg.norm(od, axis=1)
            od = od[norm > 0.3]
            basis, _ = np.linalg.qr(stain.T)
            residual = np.linalg.norm(od - od @ basis @ basis.T, axis=1) / norm[norm > 0.3]
            assert np.median(residual) < 0.02
            assert np.percentile(residual, 99) < 0.08
            conc = od @ np.linalg.pinv(stain)  # H and E amounts are non-negative
            assert np.percentile(conc, 1, axis=0).min() > -0.05
    # Stain varies between images, so normalisation has work to do.
    angles = np.degrees(np.arccos(np.clip(np.einsum("nij,ij->ni", stains, STAIN_REF), -1, 1)))
    assert angles.max() > 4
    assert np.ptp(np.array(stains)[:, 0, 2]) > 0.05  # H vectors differ from each other


def _image_set(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = [], []
    for label in range(len(CLASSES)):
        for i in range(n):
            x.append(_features(render_image(label, 256, 192, image_rng(seed, label, i))))
            y.append(label)
    return np.array(x), np.array(y)


def _tile_set(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of all 12 tiles (4 x 3 of 128 px) of 512x384 images."""
    x, y = [], []
    for label in range(len(CLASSES)):
        for i in range(n):
            img = render_image(label, 512, 384, image_rng(seed, label, i))
            for r, c in np.ndindex(3, 4):
                x.append(_features(img[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]))
                y.append(label)
    return np.array(x), np.array(y)


def test_classes_separable_by_simple_statistics() -> None:
    x_train, y_train = _image_set(seed=0, n=8)
    x_test, y_test = _image_set(seed=1, n=8)
    for clf in (NearestCentroid(), LogisticRegression(max_iter=1000)):
        model = make_pipeline(StandardScaler(), clf).fit(x_train, y_train)
        assert model.score(x_test, y_test) >= 0.75


def test_class_shows_in_every_tile() -> None:
    x_train, y_train = _tile_set(seed=0, n=3)
    x_test, y_test = _tile_set(seed=1, n=3)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    pred = model.fit(x_train, y_train).predict(x_test)
    assert (pred == y_test).mean() >= 0.65  # four features, chance 0.25; a CNN does better
    for label in range(len(CLASSES)):
        assert (pred[y_test == label] == label).mean() >= 0.5


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path), "--n-per-class", "1", "--width", "64", "--height", "48"])
    out = capsys.readouterr().out
    assert out.count("wrote 1, kept 0") == len(CLASSES)
    assert (tmp_path / "InSitu" / "is000.png").is_file()
    main([str(tmp_path), "--n-per-class", "1", "--width", "64", "--height", "48"])
    assert capsys.readouterr().out.count("wrote 0, kept 1") == len(CLASSES)


def test_module_entry_point(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "breastnet.synthetic", str(tmp_path), "--n-per-class", "1"]
    cmd += ["--width", "64", "--height", "48", "--ext", "jpeg"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert "4 synthetic 64x48 .jpeg images" in done.stdout
    assert (tmp_path / "Invasive" / "iv000.jpeg").is_file()


def test_rescan_makes_an_external_looking_set(tmp_path: Path) -> None:
    """Half the pixel size in the TIFF tags and twice the pixels, 2-class folders, crops."""
    data = write_synthetic_dataset(tmp_path / "data", 1, 64, 48, seed=1)
    half = rescan(data, tmp_path / "half", mpp=0.21)
    assert sorted(p.relative_to(tmp_path / "half").as_posix() for p in half) == [
        "Benign/b000.tif", "Benign/n000.tif", "Malignant/is000.tif", "Malignant/iv000.tif",
    ]  # fmt: skip
    assert {read_mpp(p) for p in half} == {0.21}
    with Image.open(half[0]) as im:
        assert im.size == (128, 96)
    original = np.asarray(Image.open(data / "Benign" / "b000.png"))
    back = cv2.resize(np.asarray(Image.open(half[0])), (64, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(back.astype(int) - original).mean() < 3  # a resampling, not another image
    (crop,) = rescan(
        data, tmp_path / "crops", crop=(40, 20), image_ids=["InSitu/is000"], tags=False
    )
    assert crop == tmp_path / "crops" / "Malignant" / "is000.png" and read_mpp(crop) is None
    expected = np.asarray(Image.open(data / "InSitu" / "is000.png"))[14:34, 12:52]  # centre
    assert np.array_equal(np.asarray(Image.open(crop)), expected)
