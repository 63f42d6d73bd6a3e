"""Fit the linear probe (``image_model=linear_probe``): multinomial logistic regression on each
image's standardised mean patch feature, its L2 penalty C chosen by inner cross-validation on
the training images alone, then refitted on all of them and exported into the linear head of
``breastnet.models.aggregators.LinearProbe``.

The solver is scikit-learn's ``LogisticRegression`` (L-BFGS, float64): a convex fit, the same
estimator the frozen-feature baselines use (``experiments/bach_cpu/baseline_frozen.py``), so
its answer is the reference's, not an approximation of it. The grid follows DINOv2's
logistic-regression probe (log-spaced C, 4 values per decade, scored by mean per-class
accuracy, ties to the smaller C); on standardised features 1e-4..1e2 spans near-constant to
separable. UNI's probe fixes C = D x classes / 100 on raw features instead: on ~130 images
the inner CV is what decides.
"""

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from breastnet.data.bach import DataError
from breastnet.models.aggregators import LinearProbe
from breastnet.selection import TrainingSide, cross_validate, inner_splits, training_side

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe: the head on raw pooled features (standardisation folded in), the chosen
    C and its mean inner balanced accuracy, and that score for every C of the grid."""

    weight: np.ndarray  # num_classes x D
    bias: np.ndarray  # num_classes
    C: float
    inner_balanced_accuracy: float
    scores: dict[float, float]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted classes of pooled features n x D."""
        return (x @ self.weight.T + self.bias).argmax(1)


def c_grid(c_min: float, c_max: float, n_c: int) -> np.ndarray:
    """``n_c`` log-spaced values of C from ``c_min`` to ``c_max``, ascending."""
    return np.logspace(np.log10(c_min), np.log10(c_max), n_c)


def logistic(C: float, max_iter: int) -> Pipeline:
    """Standardisation (fitted on the images it is fitted on), then multinomial logistic
    regression with L2 penalty C."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def export(pipeline: Pipeline) -> tuple[np.ndarray, np.ndarray]:
    """The fitted pipeline as one linear map of raw features: W' = W / sigma,
    b' = b - W' mu, so ``x W'^T + b'`` are its decision values (softmax: ``predict_proba``)."""
    scaler, model = pipeline[0], pipeline[-1]
    weight = model.coef_ / scaler.scale_  # C x D
    return weight, model.intercept_ - weight @ scaler.mean_


def fit_linear_probe(
    x: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    grid: np.ndarray,
    folds: int,
    seed: int,
    max_iter: int,
    num_classes: int,
) -> ProbeFit:
    """Choose C on ``folds`` grouped, stratified, seeded inner folds of these images (mean
    balanced accuracy; ties to the smaller C), then refit on all of them with it.

    Raises:
        DataError: a class without training images (the head needs every class), or fewer
            source groups than folds.
    """
    if missing := sorted(set(range(num_classes)) - set(labels.tolist())):
        raise DataError(
            f"image_model=linear_probe needs training images of every class; class(es) "
            f"{missing} have none among the {len(labels)} images it is fitted on (an inner "
            "fold of a class with one source group has none: use finer data.groups or fewer "
            "select.inner_folds)"
        )
    splits = inner_splits(labels, groups, folds, seed, "image_model.aggregator.folds")
    # Fits this small run faster on one BLAS thread (a fit of 107 x 1280 on 2 busy cores:
    # 25 ms, against 1 s on two threads).
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the final fit's is logged below
        scores = {}
        for c in grid:
            found = cross_validate(
                lambda train, held, c=c: (
                    logistic(c, max_iter).fit(x[train], labels[train]).predict(x[held])
                ),
                labels,
                splits,
                num_classes,
            )
            scores[float(c)] = float(np.mean(found))
        best = max(scores, key=scores.__getitem__)  # the first (smallest) C of the best
        final = logistic(best, max_iter).fit(x, labels)
    if final[-1].n_iter_.max() >= max_iter:
        log.warning(
            "linear probe: L-BFGS stopped at max_iter=%d before converging (C=%g): raise "
            "image_model.aggregator.max_iter",
            max_iter,
            best,
        )
    weight, bias = export(final)
    return ProbeFit(weight, bias, best, scores[best], scores)


def fit_on_side(probe: LinearProbe, side: TrainingSide, seed: int) -> ProbeFit:
    """``fit_linear_probe`` with the probe's settings on the training side's pooled features."""
    return fit_linear_probe(
        side.pooled,
        side.labels,
        side.groups,
        c_grid(probe.c_min, probe.c_max, probe.n_c),
        probe.folds,
        seed,
        probe.max_iter,
        probe.num_classes,
    )


def fit_probe(probe: LinearProbe, datamodule: Any, seed: int) -> dict[str, float]:
    """Fit ``probe`` in place on the DataModule's training side (train and val; nothing of the
    test side is read); returns the image-stage metrics ``image/probe_C`` and
    ``image/probe_inner_balanced_accuracy``."""
    fit = fit_on_side(probe, training_side(datamodule, pooled=True), seed)
    probe.load_fit(
        torch.from_numpy(fit.weight),
        torch.from_numpy(fit.bias),
        fit.C,
        fit.inner_balanced_accuracy,
    )
    curve = ", ".join(f"{c:.2g}: {s:.3f}" for c, s in fit.scores.items())
    log.info(
        "linear probe: C=%g, inner %d-fold balanced accuracy %.4f (per C: %s)",
        fit.C,
        probe.folds,
        fit.inner_balanced_accuracy,
        curve,
    )
    return {
        "image/probe_C": fit.C,
        "image/probe_inner_balanced_accuracy": fit.inner_balanced_accuracy,
    }
