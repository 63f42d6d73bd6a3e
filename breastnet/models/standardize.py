"""Per-dimension standardisation of cached patch features, fitted on the training images.

A frozen ImageNet encoder's feature dimensions differ in scale by orders of magnitude, so a
head trained on them raw leans on the few loud ones. z-scoring each dimension by the training
patches' mean and std first is what a linear probe does (scikit-learn's ``StandardScaler``);
measured on bach-dev in ``experiments/bach_cpu/RESULTS.md``. The statistics are buffers, so a
checkpoint carries them to evaluate and predict.
"""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

MIN_STD = 1e-6
"""A dimension whose std is below this is constant on the training patches: centred, not scaled."""


class FeatureScaler(nn.Module):
    """``(x - mean) / std`` per feature dimension; the identity until ``fit``."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))

    @torch.no_grad()
    def fit(self, samples: Iterable[dict[str, Any]]) -> None:
        """Mean and std over every patch of ``samples`` (dicts whose ``x`` is N x D)."""
        total = squares = torch.zeros_like(self.mean, dtype=torch.float64)
        count = 0
        for sample in samples:
            x = sample["x"].to(torch.float64)  # N x D
            total, squares, count = total + x.sum(0), squares + x.square().sum(0), count + len(x)
        if count == 0:
            raise ValueError("no training patches to standardise the features with")
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std < MIN_STD, torch.ones_like(std), std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Standardized(nn.Module):
    """An aggregator that reads z-scored features: its signature, outputs and attributes."""

    def __init__(self, aggregator: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.scaler, self.aggregator = FeatureScaler(feature_dim), aggregator
        self.trainable, self.num_classes = aggregator.trainable, aggregator.num_classes

    def forward(self, features: Tensor, mask: Tensor, pos: Tensor, probs: Tensor) -> dict:
        return self.aggregator(self.scaler(features), mask, pos, probs)
