"""Every number a report quotes: accuracy, balanced accuracy, AUC, per-class rates,
confusion, intervals, ROC.

Plain numpy in, JSON-safe numbers out. The figures, the HTML page, W&B and the stages take
their numbers from here, so a number reads the same wherever it is shown.
"""

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_curve
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
)

from breastnet import CLASSES
from breastnet.labels import CARCINOMA_INDICES, GROUPS

BOOTSTRAP_RESAMPLES = 1000
# Fewer images than this get no interval ("too few images"): the percentile bootstrap of an
# accuracy near 0.9 covers the truth 63 % of the time at 10 images, 89 % at 20 and 94 % at
# 30 (simulated, 400 samples of 1000 resamples); below that, a sample with no error gives
# 1.000-1.000, which says nothing.
MIN_INTERVAL_IMAGES = 30
# A ROC curve (and a class's AUC on the page) needs this many images of the class and of the
# others: with k positives the curve is k steps, and one image moves its AUC by 1/k.
MIN_ROC_IMAGES = 5
_BOOTSTRAP_CHUNK = 2**22  # resample x image weights held at once (32 MiB of float64)


def _number(x: float | np.floating | torch.Tensor) -> float | None:
    """A JSON-safe float: NaN and infinities become None (JSON has no NaN).

    A float32 value keeps its shortest float32 spelling (0.9166667, not 0.9166666865348816).
    """
    if isinstance(x, torch.Tensor):
        x = x.numpy()[()]
    x = float(str(x)) if isinstance(x, np.float32) else float(x)
    return x if math.isfinite(x) else None


def accuracy(labels: np.ndarray, preds: np.ndarray, n_classes: int = len(CLASSES)) -> float | None:
    """Fraction of ``preds`` equal to ``labels`` (micro accuracy, as torchmetrics counts it
    in training); None when there is nothing to count.

    Args:
        labels: [n] true class indices.
        preds: [n] predicted class indices.
        n_classes: how many classes there are.
    """
    target = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    pred = torch.as_tensor(np.asarray(preds, dtype=np.int64))
    if target.shape != pred.shape or target.ndim != 1:
        raise ValueError("labels and preds must be 1-d arrays of one length")
    if not len(target):
        return None
    return _number(multiclass_accuracy(pred, target, num_classes=n_classes, average="micro"))


def balanced_accuracy(confusion: np.ndarray) -> float | None:
    """Macro recall: the mean over the classes that have images of the share of them found
    (scikit-learn's ``balanced_accuracy_score``, eva's BACH metric); None without images.

    Args:
        confusion: [C, C] counts, rows true, columns predicted.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(1)
    present = support > 0
    if not present.any():
        return None
    return _number(np.mean(np.diag(confusion)[present] / support[present]))


def enough_for_roc(positive: np.ndarray) -> bool:
    """Whether ``positive`` ([n] bool) holds ``MIN_ROC_IMAGES`` positives and negatives."""
    return min(int(positive.sum()), int((~positive).sum())) >= MIN_ROC_IMAGES


def roc_curves(labels: np.ndarray, probs: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest ROC curve ``(fpr, tpr)`` of each class with enough images of it and of
    the others (``MIN_ROC_IMAGES``), by class index."""
    labels = np.asarray(labels)
    curves = {}
    for c in range(probs.shape[1]):
        if enough_for_roc(labels == c):
            fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
            curves[c] = (fpr, tpr)
    return curves


def two_class_roc(groups: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The carcinoma ROC curve ``(fpr, tpr)`` ranked by the summed carcinoma probability;
    None without ``MIN_ROC_IMAGES`` images of each group."""
    groups = np.asarray(groups) == 1
    if not enough_for_roc(groups):
        return None
    fpr, tpr, _ = roc_curve(groups, np.asarray(probs)[:, CARCINOMA_INDICES].sum(1))
    return fpr, tpr


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC (ties count half) with each row of ``weights`` counting the images.

    Args:
        scores: [n] one class's scores.
        positive: [n] bool, the images of that class.
        weights: [B, n] how often each image is drawn in each resample.

    Returns:
        [B] AUCs, NaN where a resample has no positive or no negative image.
    """
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # one per distinct score
    pos = np.add.reduceat((weights * positive)[:, order], starts, axis=1)  # B x levels
    neg = np.add.reduceat((weights * ~positive)[:, order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored lower than each level
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    auc_classes: Sequence[int],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    preds: np.ndarray | None = None,
) -> dict[str, list[float] | None]:
    """Percentile-bootstrap intervals of image accuracy, balanced accuracy and macro AUC,
    resampling images.

    Args:
        labels: [n] true class indices.
        probs: [n, C] class probabilities.
        auc_classes: the classes whose AUC enters the macro mean (those defined on the full
            sample); a resample averages those it holds both positives and negatives of.
        resamples: bootstrap resamples (draws of n images with replacement).
        seed: the resampling seed: the same inputs and seed give the same intervals.
        level: the interval's coverage.
        preds: [n] the predicted class of each image (default: the argmax of ``probs``).

    Returns:
        ``{"accuracy": [low, high], "balanced_accuracy": [low, high], "macro_auc": [low,
        high] or None without auc_classes}``; a resample's balanced accuracy averages the
        recall of the classes it holds. All None with fewer than ``MIN_INTERVAL_IMAGES``
        images.
    """
    n = len(labels)
    if n < MIN_INTERVAL_IMAGES:
        return dict.fromkeys(("accuracy", "balanced_accuracy", "macro_auc"))
    correct = ((probs.argmax(1) if preds is None else preds) == labels).astype(float)
    members = [labels == c for c in np.unique(labels)]
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    accuracies, balanced, auc = [], [], []
    for rows in np.array_split(draws, max(1, resamples * n // _BOOTSTRAP_CHUNK)):
        offsets = rows + n * np.arange(len(rows))[:, None]
        weights = np.bincount(offsets.ravel(), minlength=rows.size).reshape(rows.shape)
        accuracies.append(weights @ correct / n)
        drawn = np.stack([weights[:, m].sum(1) for m in members])  # classes x resamples
        found = np.stack([weights[:, m] @ correct[m] for m in members])
        with np.errstate(invalid="ignore", divide="ignore"):
            balanced.append(np.nanmean(found / np.where(drawn > 0, drawn, np.nan), axis=0))
        if auc_classes:
            per_class = [_weighted_auc(probs[:, c], labels == c, weights) for c in auc_classes]
            auc.append(np.stack(per_class))
    tails = [50 * (1 - level), 50 * (1 + level)]

    def interval(values: np.ndarray) -> list[float]:
        return [_number(x) for x in np.percentile(values, tails)]

    out = {
        "accuracy": interval(np.concatenate(accuracies)),
        "balanced_accuracy": interval(np.concatenate(balanced)),
        "macro_auc": None,
    }
    if auc:
        per_resample = np.concatenate(auc, axis=1)  # classes x resamples
        defined = ~np.isnan(per_resample).all(0)
        out["macro_auc"] = interval(np.nanmean(per_resample[:, defined], axis=0))
    return out


def classification_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    patch_labels: np.ndarray | None = None,
    patch_preds: np.ndarray | None = None,
    classes: Sequence[str] = CLASSES,
    seed: int = 0,
) -> dict:
    """Image (and patch) accuracy, AUROC, per-class sensitivity/specificity, confusion matrix.

    Args:
        labels: [n] true class indices.
        probs: [n, C] class probabilities; the prediction is their argmax.
        patch_labels, patch_preds: [P] true and predicted class of each patch (optional).
        classes: class names, in index order.
        seed: seed of the bootstrap intervals.

    Returns:
        A JSON-serialisable dict with ``metrics.json``'s keys: ``image_accuracy``,
        ``balanced_accuracy`` (macro recall), ``patch_accuracy``, ``macro_auc``, ``n_images``,
        ``n_patches``, and 95 % percentile-bootstrap intervals over images
        (``bootstrap_intervals``), ``image_accuracy_ci``, ``balanced_accuracy_ci`` and
        ``macro_auc_ci``: ``[low, high]``, None below ``MIN_INTERVAL_IMAGES`` images
        (``too_few_for_intervals``).
        A class's one-vs-rest AUC is None when ``labels`` has no image of it (or nothing but
        it): the ROC is undefined there. ``macro_auc`` is the mean over the classes
        that have an AUC, so absent classes are left out rather than counted as 0 or 0.5.
        Sensitivity is None for an absent class, specificity None when every image is of it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-d array, got shape {labels.shape}")
    if probs.shape != (len(labels), n_classes):
        raise ValueError(f"probs must have shape {(len(labels), n_classes)}, got {probs.shape}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    target, scores = torch.from_numpy(labels), torch.from_numpy(probs)
    confusion = multiclass_confusion_matrix(scores, target, num_classes=n_classes).numpy()
    with warnings.catch_warnings():
        # An absent class makes torchmetrics warn and return 0; it is set to None below.
        warnings.filterwarnings("ignore", message="No (positive|negative) samples")
        aucs = multiclass_auroc(scores, target, num_classes=n_classes, average=None).numpy()

    n = len(labels)
    per_class = {}
    for c, name in enumerate(classes):
        positives = int(confusion[c].sum())
        negatives = n - positives
        true_pos = int(confusion[c, c])
        false_pos = int(confusion[:, c].sum()) - true_pos
        defined = positives > 0 and negatives > 0
        per_class[name] = {
            "sensitivity": true_pos / positives if positives else None,
            "specificity": (negatives - false_pos) / negatives if negatives else None,
            "auc": _number(aucs[c]) if defined else None,
            "n": positives,
        }
    present = [m["auc"] for m in per_class.values() if m["auc"] is not None]
    with_auc = [c for c, name in enumerate(classes) if per_class[name]["auc"] is not None]
    intervals = bootstrap_intervals(labels, probs, with_auc, seed=seed)

    patch_accuracy = n_patches = None
    if patch_labels is not None and patch_preds is not None:
        n_patches = len(patch_labels)
        patch_accuracy = accuracy(patch_labels, patch_preds, n_classes)
    return {
        "image_accuracy": accuracy(labels, probs.argmax(1), n_classes),
        "image_accuracy_ci": intervals["accuracy"],
        "balanced_accuracy": balanced_accuracy(confusion),
        "balanced_accuracy_ci": intervals["balanced_accuracy"],
        "patch_accuracy": patch_accuracy,
        "macro_auc": _number(np.mean(present)) if present else None,
        "macro_auc_ci": intervals["macro_auc"],
        "per_class": per_class,
        "confusion_matrix": confusion.astype(int).tolist(),
        "n_images": n,
        "n_patches": n_patches,
        "too_few_for_intervals": n < MIN_INTERVAL_IMAGES,
    }


def two_class_metrics(groups: np.ndarray, probs: np.ndarray, seed: int = 0) -> dict:
    """BACH's 2-class view, carcinoma (InSitu + Invasive) against non-carcinoma.

    The predicted group is that of the predicted class (the 4-class argmax), as BACH scores
    it, so it agrees with predictions.csv; the AUC ranks images by the summed probability of
    the carcinoma classes.

    Args:
        groups: [n] true groups, 1 carcinoma, 0 non-carcinoma.
        probs: [n, 4] class probabilities in ``CLASSES`` order.
        seed: seed of the bootstrap intervals.

    Returns:
        ``accuracy``, ``sensitivity`` (carcinoma found), ``specificity``, ``auc`` (None unless
        both groups occur; sensitivity/specificity None without positives/negatives), their
        95 % bootstrap intervals ``accuracy_ci``/``auc_ci``, ``confusion_matrix`` (rows true,
        columns predicted, non-carcinoma first), ``n_images`` and ``n_carcinoma``.
    """
    groups = np.asarray(groups, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    score = probs[:, CARCINOMA_INDICES].sum(1)
    predicted = np.isin(probs.argmax(1), CARCINOMA_INDICES).astype(np.int64)
    confusion = np.zeros((2, 2), dtype=int)
    np.add.at(confusion, (groups, predicted), 1)
    (true_neg, false_pos), (false_neg, true_pos) = confusion
    positives, negatives = true_pos + false_neg, true_neg + false_pos
    both = positives > 0 and negatives > 0
    auc = binary_auroc(torch.from_numpy(score), torch.from_numpy(groups)) if both else None
    intervals = bootstrap_intervals(
        groups, np.stack([1 - score, score], 1), [1] if both else [], seed=seed, preds=predicted
    )
    return {
        "accuracy": _number((true_pos + true_neg) / len(groups)),
        "accuracy_ci": intervals["accuracy"],
        "sensitivity": _number(true_pos / positives) if positives else None,
        "specificity": _number(true_neg / negatives) if negatives else None,
        "auc": None if auc is None else _number(auc),
        "auc_ci": intervals["macro_auc"],
        "confusion_matrix": confusion.tolist(),
        "n_images": len(groups),
        "n_carcinoma": int(positives),
        "too_few_for_intervals": len(groups) < MIN_INTERVAL_IMAGES,
    }


def headline(metrics: dict) -> dict[str, float]:
    """The scalars a run's summary (W&B, Hydra sweeps) carries from a report's metrics:
    the 4-class numbers and the 2-class ones as ``carcinoma_<name>``."""
    keys = ("image_accuracy", "balanced_accuracy", "patch_accuracy", "macro_auc", "n_images")
    out = {k: metrics[k] for k in keys if metrics.get(k) is not None}
    two = metrics.get("two_class") or {}
    keys = ("accuracy", "sensitivity", "specificity", "auc", "n_images")
    out |= {f"carcinoma_{k}": two[k] for k in keys if two.get(k) is not None}
    return out


def below_chance(metrics: dict) -> list[str]:
    """What a report's numbers do worse than guessing, one remark each, for the 4-class and
    the 2-class view: an AUC under 0.5 (ranking worse than a coin), an accuracy under the
    share of the commonest class or group (what always answering it scores). [] when none.

    Args:
        metrics: ``write_report``'s metrics (``classification_metrics`` keys, ``two_class``).
    """
    views = []
    if metrics.get("per_class"):
        counts = {name: m["n"] for name, m in metrics["per_class"].items()}
        views.append(("4-class", "class", metrics["image_accuracy"], metrics["macro_auc"], counts))
    if two := metrics.get("two_class"):
        n, positives = two["n_images"], two["n_carcinoma"]
        counts = {GROUPS[0]: n - positives, GROUPS[1]: positives}
        views.append(("2-class", "group", two["accuracy"], two["auc"], counts))
    remarks = []
    for view, kind, accuracy, auc, counts in views:
        if auc is not None and auc < 0.5:
            remarks.append(
                f"{view} AUC {auc:.3f} is below chance (0.5): the model ranks the images "
                "worse than a coin"
            )
        name, n = max(counts.items(), key=lambda item: item[1])
        share = n / sum(counts.values())
        if accuracy is not None and accuracy < share:
            remarks.append(
                f"{view} accuracy {accuracy:.3f} is below the share of the commonest {kind}, "
                f"{name} ({share:.3f}): always answering {name} would score more"
            )
    return remarks
