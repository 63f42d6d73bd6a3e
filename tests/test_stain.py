"""Macenko normalisation against staintools (the oracle) and against known synthetic stains."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from staintools import StainNormalizer
from staintools.miscellaneous.get_concentrations import get_concentrations
from staintools.miscellaneous.optical_density_conversion import convert_RGB_to_OD
from staintools.stain_extraction.macenko_stain_extractor import MacenkoStainExtractor
from torch.utils.data import DataLoader, Dataset

from breastnet.data.stain import (
    MacenkoNormalizer,
    StainReference,
    estimate_stain_matrix,
    pick_reference,
    rgb_to_od,
    stain_concentrations,
)


def unit_rows(matrix: list[list[float]]) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


HE = unit_rows([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # a typical H&E stain matrix
OTHER = unit_rows([[0.55, 0.78, 0.30], [0.20, 0.93, 0.30]])  # another lab's stains


def render(concentrations: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Beer-Lambert: [H, W, 2] concentrations through [2, 3] stains to uint8 RGB."""
    return np.clip(np.rint(255 * np.exp(-concentrations @ stain_matrix)), 0, 255).astype(np.uint8)


def tissue(size: int = 160, seed: int = 0) -> np.ndarray:
    """[size, size, 2] H&E concentrations: nuclei over eosin stroma, a bare-slide corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    h = np.full((size, size), 0.05)
    e = 0.45 + 0.25 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    for cy, cx, r, c in rng.uniform([0, 0, 3, 0.8], [size, size, 8, 1.6], (size // 4, 4)):
        nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        h[nucleus] = c
        e[nucleus] *= 0.3
    concentrations = np.stack([h, e], axis=-1) * rng.uniform(0.85, 1.15, (size, size, 2))
    concentrations[(xx + yy) < size // 3] = 0  # bare slide
    return concentrations


@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    return render(tissue(seed=0), HE)


def test_rgb_to_od_matches_staintools_and_keeps_input() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    image[0, :] = np.arange(24)[:, None]  # zeros included: staintools writes 1 over them
    before = image.copy()
    od = rgb_to_od(image)
    assert od.dtype == np.float32 and od.shape == image.shape
    np.testing.assert_allclose(od, convert_RGB_to_OD(image.copy()), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(image, before)
    assert od[0, 0, 0] == pytest.approx(np.log(255), rel=1e-6)  # 0 read as 1
    assert od.min() == pytest.approx(1e-6)  # 255 floored at 1e-6
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_od(image.astype(np.int16))


def test_lstsq_recovers_known_concentrations() -> None:
    truth = np.random.default_rng(1).uniform(0, 2, (1000, 2))
    od = (truth @ HE).astype(np.float32)
    np.testing.assert_allclose(stain_concentrations(od, HE), truth, atol=1e-5)
    # Colours outside the stain cone get a negative share clipped to 0, not a negative value.
    outside = np.array([[-0.5, 1.0]]) @ HE
    got = stain_concentrations(outside.astype(np.float32), HE)
    assert got[0, 0] == 0 and got[0, 1] > 0.5


def test_lasso_is_staintools_call(he_image: np.ndarray) -> None:
    ours = stain_concentrations(rgb_to_od(he_image).reshape(-1, 3), HE, solver="lasso")
    np.testing.assert_allclose(ours, get_concentrations(he_image.copy(), HE), atol=1e-5)
    with pytest.raises(ValueError, match="solver"):
        stain_concentrations(rgb_to_od(he_image).reshape(-1, 3), HE, solver="nmf")


def test_estimate_stain_matrix_finds_the_rendering_stains(he_image: np.ndarray) -> None:
    before = he_image.copy()
    matrix = estimate_stain_matrix(he_image)
    np.testing.assert_array_equal(he_image, before)
    assert matrix.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-9)
    assert np.abs(matrix - HE).max() < 0.05  # H first, then E
    np.testing.assert_allclose(matrix, MacenkoStainExtractor.get_stain_matrix(he_image.copy()))


@pytest.mark.parametrize(
    "image",
    [
        np.full((40, 40, 3), 255, np.uint8),  # no tissue
        np.full((40, 40, 3), (120, 60, 140), np.uint8),  # one colour: H and E coincide
    ],
    ids=["blank", "one-colour"],
)
def test_estimate_stain_matrix_none_without_two_stains(image: np.ndarray) -> None:
    assert estimate_stain_matrix(image) is None


def test_stain_reference_json_round_trip() -> None:
    reference = StainReference(HE, np.array([1.5, 0.8]))
    back = StainReference.from_dict(json.loads(json.dumps(reference.to_dict())))
    np.testing.assert_array_equal(back.stain_matrix, HE)
    np.testing.assert_array_equal(back.max_concentrations, [1.5, 0.8])
    assert not back.stain_matrix.flags.writeable
    with pytest.raises(ValueError, match="shapes"):
        StainReference(HE[:1], [1.0])


def test_fit_without_tissue_and_transform_before_fit_raise() -> None:
    with pytest.raises(ValueError, match="too little tissue"):
        MacenkoNormalizer().fit(np.full((32, 32, 3), 250, np.uint8))
    with pytest.raises(RuntimeError, match="not fitted"):
        MacenkoNormalizer().transform(np.full((32, 32, 3), 250, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        MacenkoNormalizer().fit(np.zeros((32, 32, 3), np.float32))


def test_transform_is_uint8_and_keeps_input(he_image: np.ndarray) -> None:
    source = render(0.7 * tissue(seed=1), OTHER)
    source[:4, :4] = 0  # zeros: staintools would write 1 over them
    before = source.copy()
    out = MacenkoNormalizer().fit(he_image).transform(source)
    assert out.dtype == np.uint8 and out.shape == source.shape
    np.testing.assert_array_equal(source, before)


def staintools_float(reference: StainReference, image: np.ndarray) -> np.ndarray:
    """staintools' StainNormalizer.transform, line by line, stopped before its uint8 cast."""
    source = MacenkoStainExtractor.get_stain_matrix(image.copy())
    concentrations = get_concentrations(image.copy(), source)
    concentrations *= reference.max_concentrations / np.percentile(concentrations, 99, axis=0)
    return 255 * np.exp(-concentrations @ reference.stain_matrix).reshape(image.shape)


def test_lasso_transform_is_staintools_rounded_and_clipped(he_image: np.ndarray) -> None:
    # An eosin vector with a negative red part pushes red above 255, where staintools wraps.
    reference = StainReference(unit_rows([[0.65, 0.70, 0.29], [-0.3, 0.9, 0.3]]), [1.2, 1.0])
    source = render(tissue(seed=2), OTHER)
    expected = staintools_float(reference, source)
    assert (expected > 255.5).any()
    out = MacenkoNormalizer.from_reference(reference, solver="lasso").transform(source)
    diff = np.abs(out.astype(int) - np.clip(np.rint(expected), 0, 255))
    assert diff.max() <= 1 and diff.mean() < 0.01


@pytest.mark.parametrize("value", [255, 236, 0], ids=["white", "near-white", "black"])
def test_images_without_tissue_do_not_raise(he_image: np.ndarray, value: int) -> None:
    image = np.full((48, 64, 3), value, np.uint8)
    out = MacenkoNormalizer().fit(he_image).transform(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    if value == 255:
        assert out.min() >= 254  # blank stays blank, never rescaled into a dark stain
    elif value == 236:
        # Grey is off the stain plane: only its H&E part survives, but it stays light.
        assert out.min() >= 200


def test_white_half_stays_white(he_image: np.ndarray) -> None:
    source = render(tissue(seed=3), OTHER)
    source[:, :80] = 255
    out = MacenkoNormalizer().fit(he_image).transform(source)
    assert out[:, :80].min() >= 254
    assert np.abs(out[:, 80:].astype(int) - source[:, 80:]).mean() > 2  # tissue did change


def test_reference_stained_image_is_unchanged(he_image: np.ndarray) -> None:
    normalizer = MacenkoNormalizer().fit(he_image)
    assert np.abs(normalizer.transform(he_image).astype(int) - he_image).mean() < 1.0
    # The same tissue rendered with another lab's stains and weaker staining maps back.
    restained = render(0.6 * tissue(seed=0), OTHER)
    assert np.abs(restained.astype(int) - he_image).mean() > 10
    assert np.abs(normalizer.transform(restained).astype(int) - he_image).mean() < 3.0


def test_lstsq_close_to_staintools_on_synthetic_he(he_image: np.ndarray) -> None:
    source = render(0.7 * tissue(seed=4), OTHER)
    reference = StainNormalizer("macenko")
    reference.fit(he_image.copy())
    theirs = reference.transform(source.copy())
    ours = MacenkoNormalizer().fit(he_image).transform(source)
    assert np.abs(ours.astype(int) - theirs).mean() < 1.5


def test_pick_reference_is_the_stain_medoid() -> None:
    c = tissue(size=96, seed=5)
    tilts = [0.0, -0.08, 0.08, -0.04, 0.3]  # index 0 typical, index 4 an outlier
    images = [render(c, unit_rows(HE + [[0, 0, t], [t, 0, 0]])) for t in tilts]
    images.insert(2, np.full((96, 96, 3), 255, np.uint8))  # no tissue: ignored
    assert pick_reference(images) == 0
    with pytest.raises(ValueError, match="no image"):
        pick_reference([np.full((8, 8, 3), 255, np.uint8)])


class _LassoImages(Dataset):
    def __init__(self, reference: StainReference) -> None:
        self.reference = reference

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        normalizer = MacenkoNormalizer.from_reference(self.reference, solver="lasso")
        return torch.from_numpy(normalizer.transform(render(tissue(64, seed=index), OTHER)))


@pytest.mark.timeout(120)
def test_lasso_in_forked_worker_after_parent_spams(he_image: np.ndarray) -> None:
    staintools_normalizer = StainNormalizer("macenko")  # spams with all threads, in the parent
    staintools_normalizer.fit(he_image.copy())
    staintools_normalizer.transform(he_image.copy())
    reference = MacenkoNormalizer().fit(he_image).reference
    loader = DataLoader(_LassoImages(reference), batch_size=1, num_workers=1, timeout=60)
    assert [tuple(b.shape) for b in loader] == [(1, 64, 64, 3)] * 2


@pytest.fixture(scope="module")
def benign_reference(bach_dev: Path) -> np.ndarray:
    path = sorted((bach_dev / "Benign").iterdir())[0]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))[512:1024, 512:1024].copy()


@pytest.mark.slow
def test_close_to_staintools_on_real_tile(real_tile: np.ndarray, benign_reference) -> None:
    theirs_normalizer = StainNormalizer("macenko")
    theirs_normalizer.fit(benign_reference.copy())
    theirs = theirs_normalizer.transform(real_tile.copy())
    ours = MacenkoNormalizer().fit(benign_reference).transform(real_tile)
    assert np.abs(ours.astype(int) - theirs).mean() <= 3.0
    assert np.abs(ours.astype(int) - real_tile).mean() > 3.0  # and it did normalise


@pytest.mark.slow
def test_close_to_staintools_on_full_real_image(bach_dev: Path, benign_reference) -> None:
    with Image.open(sorted((bach_dev / "InSitu").iterdir())[0]) as im:
        image = np.asarray(im.convert("RGB"))
    theirs_normalizer = StainNormalizer("macenko")
    theirs_normalizer.fit(benign_reference.copy())
    theirs = theirs_normalizer.transform(image.copy())
    ours = MacenkoNormalizer().fit(benign_reference).transform(image)
    assert np.abs(ours.astype(int) - theirs).mean() <= 3.0
