"""The image model's feature z-scoring: fitted on the training features, kept in checkpoints."""

import pytest
import torch

from breastnet.inference.embedder import Embedder
from breastnet.models.aggregators import MeanFeatures
from breastnet.models.image_classifier import ImageClassifier
from breastnet.models.standardize import FeatureScaler


def samples(generator: torch.Generator, scale: torch.Tensor, shift: torch.Tensor) -> list[dict]:
    """Images of 1-5 patches whose 3 feature dimensions have very different scales."""
    sizes = torch.randint(1, 6, (20,), generator=generator).tolist()
    return [{"x": torch.randn(n, 3, generator=generator) * scale + shift} for n in sizes]


def test_fitted_scaler_gives_training_patches_zero_mean_unit_std() -> None:
    data = samples(torch.Generator().manual_seed(0), torch.tensor([1e-3, 1.0, 50.0]), 7.0)
    scaler = FeatureScaler(3)
    scaler.fit(data)
    patches = scaler(torch.cat([s["x"] for s in data]))
    torch.testing.assert_close(patches.mean(0), torch.zeros(3), atol=1e-3, rtol=0)  # float32 input
    torch.testing.assert_close(patches.std(0, correction=0), torch.ones(3), atol=1e-3, rtol=0)


def test_constant_dimension_is_centred_not_blown_up() -> None:
    data = [{"x": torch.tensor([[2.0, 1.0], [2.0, 3.0]])}]
    scaler = FeatureScaler(2)
    scaler.fit(data)
    assert scaler(data[0]["x"])[:, 0].tolist() == [0.0, 0.0]
    assert scaler.std.tolist() == [1.0, 1.0]  # the second: std 1 exactly


def test_no_training_patches_is_an_error() -> None:
    with pytest.raises(ValueError, match="no training patches"):
        FeatureScaler(4).fit([])


def test_standardised_model_is_blind_to_each_dimension_s_scale_and_offset() -> None:
    """Same weights, features rescaled and shifted per dimension, scaler refitted: the same
    image probabilities, read as evaluate and predict read them (the aggregator alone)."""
    generator = torch.Generator().manual_seed(1)
    data = samples(generator, torch.ones(3), torch.zeros(3))
    scale, shift = torch.tensor([1e-3, 2.0, 40.0]), torch.tensor([5.0, -1.0, 0.0])
    moved = [{"x": s["x"] * scale + shift} for s in data]
    probs = []
    for features in (data, moved):
        torch.manual_seed(0)
        model = ImageClassifier(
            MeanFeatures(3), lambda p: torch.optim.SGD(p, lr=0.1), standardize=True, feature_dim=3
        ).eval()
        model.scaler.fit(features)
        batch = {
            "x": torch.stack([f["x"][:1] for f in features]),  # 20 images x 1 patch x 3
            "probs": torch.zeros(20, 1, 4),
            "mask": torch.ones(20, 1, dtype=torch.bool),
            "pos": torch.zeros(20, 1, 2, dtype=torch.long),
            "image_id": [f"i{k}" for k in range(20)],
        }
        images = Embedder(None, model.aggregator).predict_step(batch, 0)
        probs.append(torch.stack([image["image_probs"] for image in images]))
    torch.testing.assert_close(probs[0], probs[1], atol=1e-4, rtol=1e-4)
    assert probs[0].std(0).min() > 0  # the images' probabilities differ: the test can fail
    assert {"aggregator.scaler.mean", "aggregator.scaler.std"} <= set(model.state_dict())


def test_standardize_needs_cached_features_of_known_width() -> None:
    with pytest.raises(ValueError, match="standardize needs cached features"):
        ImageClassifier(MeanFeatures(3), lambda p: torch.optim.SGD(p, lr=0.1), standardize=True)
