"""select.inner_folds: inner folds of whole source groups, and an objective computed on the
training side alone, whatever the val and test images hold."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from breastnet.data.bach import DataError
from breastnet.errors import ConfigError
from breastnet.selection import inner_splits
from breastnet.stages.image import SELECT_METRIC, inner_cv_metrics, inner_folds

from conftest import compose_config
from feature_sides import C, FeatureSides, Untouchable, images, pooled, relabelled

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 2019
FOLDS = 3
TRAIN, TRAIN_GROUPS = images(48, seed=0, prefix="tr", signal=1.5)
VAL, VAL_GROUPS = images(12, seed=1, prefix="va", signal=1.5)
GROUPS = TRAIN_GROUPS | VAL_GROUPS
TEST, _ = images(24, seed=2, prefix="te", signal=1.5)
# Each image model as a small, quick config: a 7-value grid for the probe, 10 epochs for
# the learned aggregator, the fixed rule as it is.
MODELS = {
    "linear_probe": ["image_model.aggregator.n_c=7"],
    "mean_features": [
        "image.max_epochs=10",
        "image.batch_size=8",
        "image_model.optimizer.lr=0.03",
    ],
    "mean_probs": [],
}


def objective(tmp_path: Path, name: str, sides: dict) -> tuple[float, list[float]]:
    """The inner-CV objective of ``image_model=name`` on these sides."""
    cfg = compose_config(
        tmp_path, f"image_model={name}", *MODELS[name], "trainer=cpu", "logger=none"
    )
    metrics, scores = inner_cv_metrics(cfg, FeatureSides(sides, GROUPS), FOLDS)
    return metrics[SELECT_METRIC], scores


def test_inner_folds_keep_sources_whole_and_spread_the_classes() -> None:
    labels = np.array([s["y"] for s in TRAIN])
    groups = np.array([GROUPS[s["image_id"]] for s in TRAIN])
    splits = inner_splits(labels, groups, FOLDS, SEED, "select.inner_folds")
    held = np.concatenate([h for _, h in splits])
    assert sorted(held.tolist()) == list(range(len(TRAIN)))  # each image held out once
    for train, out in splits:
        assert not set(groups[train]) & set(groups[out])  # no source on both sides
        assert set(labels[out].tolist()) == set(range(C))  # 6 sources per class: all in each
    again = inner_splits(labels, groups, FOLDS, SEED, "select.inner_folds")
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    with pytest.raises(DataError, match="select.inner_folds=30: .* 24 source group"):
        inner_splits(labels, groups, 30, SEED, "select.inner_folds")


def test_the_setting_is_off_by_default_and_checked(tmp_path: Path) -> None:
    assert inner_folds(compose_config(tmp_path)) == 0
    chosen = compose_config(tmp_path, "select=inner_cv")
    assert inner_folds(chosen) == 5 and chosen.optimized_metric == SELECT_METRIC
    with pytest.raises(ConfigError, match="select.inner_folds must be 0 .* got 1"):
        inner_folds(compose_config(tmp_path, "select.inner_folds=1"))


@pytest.mark.parametrize("name", list(MODELS))
def test_the_objective_reads_the_training_side_alone(tmp_path: Path, name: str) -> None:
    """The same number, fold for fold, with the test labels permuted, and with a test side
    that fails when read."""
    found, scores = objective(tmp_path, name, {"train": TRAIN, "val": VAL, "test": TEST})
    assert found == pytest.approx(np.mean(scores)) and len(scores) == FOLDS
    permuted = {"train": TRAIN, "val": VAL, "test": relabelled(TEST, seed=3)}
    assert objective(tmp_path, name, permuted) == (found, scores)
    blind = {"train": TRAIN, "val": VAL, "test": Untouchable()}
    assert objective(tmp_path, name, blind) == (found, scores)


@pytest.mark.parametrize("name", ["linear_probe", "mean_features"])
def test_features_that_only_make_the_test_images_easy_cannot_win(
    tmp_path: Path, name: str
) -> None:
    """Two feature sets alike on the training images; in the second the test images carry
    their class in dimensions no training image has (their codes are zero there), so anything
    that looked at them would separate them perfectly. The objective gives both the same
    score, while it does tell learnable training labels from shuffled ones."""
    code = np.eye(C)
    marked = [s | {"x": _with_code(s["x"], code[s["y"]])} for s in TEST]
    plain = [s | {"x": _with_code(s["x"], np.zeros(C))} for s in TEST]
    learnable, _ = images(48, seed=0, prefix="tr", signal=3.0)  # TRAIN's images and sources
    train = [s | {"x": _with_code(s["x"], np.zeros(C))} for s in learnable]
    val = [s | {"x": _with_code(s["x"], np.zeros(C))} for s in VAL]
    x_marked, y_test = pooled(marked)
    separable = LogisticRegression(max_iter=1000)
    assert cross_val_score(separable, x_marked[:, -C:], y_test, cv=3).min() == 1.0

    honest = objective(tmp_path, name, {"train": train, "val": val, "test": plain})
    memorised = objective(tmp_path, name, {"train": train, "val": val, "test": marked})
    assert memorised == honest
    shuffled_side = {"train": relabelled(train, seed=5), "val": relabelled(val, seed=6)}
    shuffled, _ = objective(tmp_path, name, shuffled_side | {"test": plain})
    assert honest[0] > 0.7 and shuffled < 0.45


def _with_code(x: torch.Tensor, code: np.ndarray) -> torch.Tensor:
    """Features with ``code`` appended to every patch (D + C wide)."""
    tail = torch.tensor(code, dtype=x.dtype).expand(len(x), -1)
    return torch.cat([x, tail], 1)


def test_inner_fits_print_nothing_of_their_own(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """No val loader and a fit to max_epochs are what an inner fold is: no line says so."""
    with caplog.at_level(logging.INFO):
        objective(tmp_path, "mean_features", {"train": TRAIN, "val": VAL, "test": TEST})
    assert not [w for w in recwarn if "val_dataloader" in str(w.message)]
    assert "max_epochs" not in caplog.text and "select: inner 3-fold" in caplog.text
