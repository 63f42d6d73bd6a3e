"""Small in-memory feature sets for the image stage's fits on the training side (the linear
probe, the inner-CV objective): what a features DataModule serves, without a store on disk."""

from types import SimpleNamespace

import numpy as np
import torch

D, C = 12, 4
"""Feature width and classes of the generated images."""


class Untouchable:
    """A split side that must not be read: any access fails the test."""

    def __len__(self) -> int:
        raise AssertionError("a test image was read")

    def __getitem__(self, key: object) -> dict:
        raise AssertionError("a test image was read")


class FeatureSides:
    """What the image stage reads of a set-up features DataModule: ``datasets`` per side (lists
    of the samples ``FeatureDataset`` yields), the split's source groups
    (``prepared.split_spec.groups_of``) and ``feature_dim`` (the training images')."""

    def __init__(self, sides: dict, groups: dict[str, str] | None = None) -> None:
        self.datasets = sides
        self.feature_dim = sides["train"][0]["x"].shape[1]
        spec = SimpleNamespace(groups_of=lambda entries: groups)
        self.prepared = SimpleNamespace(split_spec=spec, entries=[])


def images(
    n: int, seed: int, prefix: str, signal: float = 1.0, per_group: int = 2
) -> tuple[list[dict], dict[str, str]]:
    """``n`` images, classes in turn, each 2-6 patches of D-wide features whose first C
    dimensions lean towards its class by ``signal``; every ``per_group`` images of a class
    share a source (a patient offset). Returns the samples and image_id -> group."""
    rng = np.random.default_rng(seed)
    samples, groups = [], {}
    for i in range(n):
        label, k = i % C, i // C
        group = f"{prefix}-c{label}-g{k // per_group}"
        offset = np.random.default_rng([seed, label, k // per_group]).normal(0, 0.5, D)
        x = rng.normal(size=(int(rng.integers(2, 7)), D)) + offset
        x[:, label] += signal
        image_id = f"{prefix}{i:03d}"
        samples.append(sample(image_id, x, label))
        groups[image_id] = group
    return samples, groups


def sample(image_id: str, x: np.ndarray, label: int) -> dict:
    """One image as ``FeatureDataset`` yields it: features, probs, grid positions, label."""
    n = len(x)
    return {
        "x": torch.tensor(x, dtype=torch.float32),
        "probs": torch.full((n, C), 1.0 / C),
        "pos": torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1),
        "y": label,
        "image_id": image_id,
    }


def relabelled(samples: list[dict], seed: int) -> list[dict]:
    """The same images with their labels permuted."""
    labels = np.random.default_rng(seed).permutation([s["y"] for s in samples])
    return [s | {"y": int(y)} for s, y in zip(samples, labels, strict=True)]


def pooled(samples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Each image's mean feature (float64 n x D) and its label, computed here on their own."""
    x = np.stack([s["x"].double().mean(0).numpy() for s in samples])
    return x, np.array([s["y"] for s in samples])
