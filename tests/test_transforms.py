"""H&E jitter and the patch pipeline: the right factors, reproducible, safe in forked workers."""

import albumentations as A
import numpy as np
import pytest
import torch
from staintools import StainNormalizer
from torch.utils.data import DataLoader, Dataset

from breastnet.data.stain import rgb_to_od, stain_concentrations
from breastnet.data.transforms import HEJitter, build_transforms

HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
HE /= np.linalg.norm(HE, axis=1, keepdims=True)


def he_patch(size: int = 48, seed: int = 0) -> np.ndarray:
    """A patch rendered from known, moderate H and E concentrations (no clipping at 0 or 255)."""
    concentrations = np.random.default_rng(seed).uniform(0.3, 1.0, (size, size, 2))
    return np.rint(255 * np.exp(-concentrations @ HE)).astype(np.uint8)


def random_patch(size: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def recovered_factors(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per-stain median ratio of output to input concentrations."""
    c_before = stain_concentrations(rgb_to_od(before).reshape(-1, 3), HE)
    c_after = stain_concentrations(rgb_to_od(after).reshape(-1, 3), HE)
    return np.median(c_after / c_before, axis=0)


def test_jitter_factors_lie_in_range_and_spread() -> None:
    patch = he_patch()
    jitter = A.Compose([HEJitter(HE, scale=(0.7, 1.3))], seed=0)
    factors = np.array(
        [recovered_factors(patch, jitter(image=patch)["image"]) for _ in range(300)]
    )
    assert factors.min() >= 0.69 and factors.max() <= 1.31
    for stain in (0, 1):  # both ends of the range are reached, for each stain
        assert factors[:, stain].min() < 0.73 and factors[:, stain].max() > 1.27
        assert abs(factors[:, stain].mean() - 1.0) < 0.04
    assert abs(np.corrcoef(factors.T)[0, 1]) < 0.2  # H and E drawn independently


def test_same_seed_same_output() -> None:
    patches = [random_patch(seed=s) for s in range(6)]
    first, second, other = (build_transforms(True, HE, seed=s) for s in (7, 7, 8))
    a = [first(image=p)["image"] for p in patches]
    b = [second(image=p)["image"] for p in patches]
    c = [other(image=p)["image"] for p in patches]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_unit_scale_is_identity() -> None:
    patch = random_patch()
    out = HEJitter(HE, scale=(1.0, 1.0))(image=patch)["image"]
    np.testing.assert_array_equal(out, patch)


def test_jitter_clips_instead_of_wrapping() -> None:
    patch = random_patch(seed=1)
    before = patch.copy()
    out = HEJitter(HE, scale=(0.4, 0.4))(image=patch)["image"]
    np.testing.assert_array_equal(patch, before)
    # Expected in float64: I * exp(-C diag(s - 1) M); lightening pushes some pixels past 255.
    c = stain_concentrations(rgb_to_od(patch).reshape(-1, 3).astype(np.float64), HE)
    expected = (patch.reshape(-1, 3) * np.exp(0.6 * c @ HE)).reshape(patch.shape)
    assert (expected > 255.5).any()
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.clip(np.rint(expected), 0, 255)).max() <= 1


def test_jitter_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2x3"):
        HEJitter(HE[:1])
    with pytest.raises(ValueError, match="scale"):
        HEJitter(HE, scale=(1.3, 0.7))
    with pytest.raises(ValueError, match="uint8"):
        HEJitter(HE)(image=random_patch().astype(np.float32))


def test_eval_and_disabled_training_are_identity() -> None:
    patch = random_patch()
    for transform in (
        build_transforms(False, HE),
        build_transforms(True, HE, he_jitter=None, rot90=False, flip=False),
        build_transforms(True, None, rot90=False, flip=False),
    ):
        np.testing.assert_array_equal(transform(image=patch)["image"], patch)


def test_training_visits_all_eight_orientations() -> None:
    patch = random_patch(size=8)
    variants = [np.rot90(f, k) for f in (patch, patch[:, ::-1]) for k in range(4)]
    transform = build_transforms(True, None, seed=0)
    counts = np.zeros(8, int)
    for _ in range(400):
        out = transform(image=patch)["image"]
        assert out.dtype == np.uint8
        counts[[np.array_equal(out, v) for v in variants].index(True)] += 1
    assert counts.min() >= 25  # 50 expected each


class _Patches(Dataset):
    def __init__(self) -> None:
        self.transform = build_transforms(True, HE)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.transform(image=random_patch(64, seed=index))["image"])


@pytest.mark.timeout(120)
def test_dataloader_workers_after_staintools_in_parent() -> None:
    normalizer = StainNormalizer("macenko")  # multithreaded spams in the parent, before fork
    image = he_patch(96)
    normalizer.fit(image.copy())
    normalizer.transform(image.copy())
    loader = DataLoader(_Patches(), batch_size=4, num_workers=2, timeout=60)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(4, 64, 64, 3)] * 2
    assert all(b.dtype == torch.uint8 for b in batches)
