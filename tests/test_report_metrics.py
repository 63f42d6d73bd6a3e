"""Report metrics: they agree with scikit-learn, and the bootstrap intervals behave."""

import json

import numpy as np
import pytest
from sklearn import metrics as sk
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    recall_score,
    roc_auc_score,
)

from breastnet import CLASSES
from breastnet.report import write_report
from breastnet.report.metrics import (
    MIN_INTERVAL_IMAGES,
    MIN_ROC_IMAGES,
    accuracy,
    bootstrap_intervals,
    classification_metrics,
    roc_curves,
    two_class_metrics,
    two_class_roc,
)

from conftest import noisy_probs, synthetic_results

C = len(CLASSES)


def sklearn_specificity(labels: np.ndarray, preds: np.ndarray, c: int) -> float:
    cm = confusion_matrix(labels, preds, labels=range(C))
    fp = cm[:, c].sum() - cm[c, c]
    tn = cm.sum() - cm[c].sum() - fp
    return tn / (tn + fp)


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, size=80)
    probs = noisy_probs(labels, rng)
    patch_labels = rng.integers(0, C, size=300)
    patch_preds = np.where(rng.random(300) < 0.6, patch_labels, rng.integers(0, C, size=300))
    m = classification_metrics(labels, probs, patch_labels, patch_preds)
    preds = probs.argmax(axis=1)

    assert m["image_accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6)
    assert m["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, preds), abs=1e-9
    )
    assert m["patch_accuracy"] == pytest.approx(
        accuracy_score(patch_labels, patch_preds), abs=1e-6
    )
    assert m["macro_auc"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-6
    )
    assert m["confusion_matrix"] == confusion_matrix(labels, preds, labels=range(C)).tolist()
    assert (m["n_images"], m["n_patches"]) == (80, 300)
    recall = recall_score(labels, preds, labels=range(C), average=None)
    for c, name in enumerate(CLASSES):
        got = m["per_class"][name]
        assert got["auc"] == pytest.approx(roc_auc_score(labels == c, probs[:, c]), abs=1e-6)
        assert got["sensitivity"] == pytest.approx(recall[c], abs=1e-6)
        assert got["specificity"] == pytest.approx(sklearn_specificity(labels, preds, c), abs=1e-6)
        assert got["n"] == int((labels == c).sum())
    json.dumps(m, allow_nan=False)  # plain JSON: no NaN, no numpy types


def test_absent_class_has_no_auc_and_is_left_out_of_the_macro_mean() -> None:
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 3], size=40)  # no InSitu
    probs = noisy_probs(labels, rng, signal=1.0)
    m = classification_metrics(labels, probs)
    insitu = m["per_class"]["InSitu"]
    assert insitu["auc"] is None and insitu["sensitivity"] is None and insitu["n"] == 0
    preds = probs.argmax(axis=1)
    assert insitu["specificity"] == pytest.approx(1 - (preds == 2).mean(), abs=1e-6)
    per_class = [roc_auc_score(labels == c, probs[:, c]) for c in (0, 1, 3)]
    for c, auc in zip((0, 1, 3), per_class, strict=True):
        assert m["per_class"][CLASSES[c]]["auc"] == pytest.approx(auc, abs=1e-6)
    assert m["macro_auc"] == pytest.approx(np.mean(per_class), abs=1e-6)
    # the absent class is left out of the macro recall, as scikit-learn leaves it out
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))
    assert m["patch_accuracy"] is None and m["n_patches"] is None
    json.dumps(m, allow_nan=False)


def test_perfect_predictions() -> None:
    labels = np.repeat(np.arange(C), 3)
    probs = np.eye(C)[labels] * 0.9 + 0.1 / C
    m = classification_metrics(labels, probs, labels, labels)
    assert m["image_accuracy"] == m["patch_accuracy"] == m["macro_auc"] == 1.0
    assert m["confusion_matrix"] == (np.eye(C, dtype=int) * 3).tolist()
    for name in CLASSES:
        assert m["per_class"][name] == {"sensitivity": 1.0, "specificity": 1.0, "auc": 1.0, "n": 3}


def test_bootstrap_intervals_match_a_resample_by_resample_computation() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, C, size=30)
    probs = np.round(noisy_probs(labels, rng, signal=1.0), 1)  # with ties, which count half
    intervals = bootstrap_intervals(labels, probs, range(C), resamples=300, seed=9)
    # The same draws, scored one resample at a time by scikit-learn.
    draws = np.random.default_rng(9).integers(0, 30, size=(300, 30))
    accuracies, balanced, aucs = [], [], []
    for rows in draws:
        y, p = labels[rows], probs[rows]
        accuracies.append(accuracy_score(y, p.argmax(1)))
        balanced.append(balanced_accuracy_score(y, p.argmax(1)))
        aucs.append(
            np.mean([roc_auc_score(y == c, p[:, c]) for c in range(C) if 0 < (y == c).sum() < 30])
        )
    percentiles = {
        "accuracy": np.percentile(accuracies, [2.5, 97.5]),
        "balanced_accuracy": np.percentile(balanced, [2.5, 97.5]),
        "macro_auc": np.percentile(aucs, [2.5, 97.5]),
    }
    for key, expected in percentiles.items():
        assert intervals[key] == pytest.approx(expected, abs=1e-9), key


def test_metrics_carry_bootstrap_intervals() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (40, 640):
        labels = rng.integers(0, C, size=n)
        probs = noisy_probs(labels, rng)
        m = classification_metrics(labels, probs)
        for key in ("image_accuracy", "balanced_accuracy", "macro_auc"):
            low, high = m[f"{key}_ci"]
            assert low <= m[key] <= high and low < high
        widths.append(m["image_accuracy_ci"][1] - m["image_accuracy_ci"][0])
        assert classification_metrics(labels, probs) == m  # seeded
        assert classification_metrics(labels, probs, seed=1)["macro_auc_ci"] != m["macro_auc_ci"]
        json.dumps(m, allow_nan=False)
    # A binomial proportion's interval narrows as 1/sqrt(n): 16x the images, about 1/4 as wide.
    assert 0.15 < widths[1] / widths[0] < 0.4


def test_intervals_of_degenerate_samples() -> None:
    labels = np.zeros(40, dtype=int)  # one class only: no AUC, so no AUC interval
    m = classification_metrics(labels, np.eye(C)[labels])
    assert m["image_accuracy_ci"] == [1.0, 1.0] and m["macro_auc_ci"] is None
    labels = np.repeat(np.arange(C), 10)
    m = classification_metrics(labels, np.eye(C)[labels] * 0.9 + 0.1 / C)
    assert m["image_accuracy_ci"] == m["macro_auc_ci"] == [1.0, 1.0]


@pytest.mark.parametrize("n", [4, MIN_INTERVAL_IMAGES - 1])
def test_too_few_images_get_no_interval(n: int, tmp_path) -> None:
    """4 images all right: the bootstrap says 1.000-1.000; the report says too few images."""
    labels = np.arange(n) % C
    m = classification_metrics(labels, np.eye(C)[labels] * 0.9 + 0.1 / C)
    assert m["image_accuracy"] == 1.0 and m["too_few_for_intervals"]
    assert m["image_accuracy_ci"] is None and m["macro_auc_ci"] is None
    two = two_class_metrics((labels >= 2).astype(int), np.eye(C)[labels])
    assert two["accuracy_ci"] is None and two["auc_ci"] is None and two["too_few_for_intervals"]
    enough = np.arange(MIN_INTERVAL_IMAGES) % C
    assert classification_metrics(enough, np.eye(C)[enough])["image_accuracy_ci"] == [1.0, 1.0]
    results, _ = synthetic_results(n, labelled=True)
    page = write_report(tmp_path, results).html.read_text()
    assert "too few images" in page and "1.000\u20131.000" not in page


def test_roc_only_for_classes_with_enough_images_on_both_sides() -> None:
    labels = np.array([0] * MIN_ROC_IMAGES + [1] * (MIN_ROC_IMAGES - 1) + [2] * 10)
    probs = np.eye(C)[labels]
    assert set(roc_curves(labels, probs)) == {0, 2}  # 1: too few positives; 3: none
    groups = (labels >= 2).astype(int)
    assert two_class_roc(groups, probs) is not None
    assert two_class_roc(groups[MIN_ROC_IMAGES:], probs[MIN_ROC_IMAGES:]) is None  # 4 negatives


def test_accuracy_counts_like_torchmetrics() -> None:
    labels = np.repeat(np.arange(C), 3)
    preds = labels.copy()
    preds[0] = 1
    assert accuracy(labels, preds) == 0.9166667  # float32, its shortest spelling
    assert accuracy(labels[:0], preds[:0]) is None
    with pytest.raises(ValueError, match="one length"):
        accuracy(labels, preds[:-1])


def test_roc_curves_are_those_of_the_classes_with_an_auc() -> None:
    rng = np.random.default_rng(4)
    labels = rng.choice([0, 1, 3], size=40)  # no InSitu: no curve
    probs = noisy_probs(labels, rng, signal=1.0)
    m = classification_metrics(labels, probs)
    curves = roc_curves(labels, probs)
    assert sorted(curves) == [0, 1, 3]
    for c, (fpr, tpr) in curves.items():
        assert sk.auc(fpr, tpr) == pytest.approx(m["per_class"][CLASSES[c]]["auc"], abs=1e-6)
    assert roc_curves(np.zeros(5, dtype=int), np.eye(C)[np.zeros(5, dtype=int)]) == {}
