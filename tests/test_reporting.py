"""Reporting: metrics agree with scikit-learn, and the report files hold what they claim."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, roc_auc_score

from breastnet import CLASSES
from breastnet.reporting import bootstrap_intervals, classification_metrics, write_report

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
    accuracy_ci, auc_ci = bootstrap_intervals(labels, probs, range(C), resamples=300, seed=9)
    # The same draws, scored one resample at a time by scikit-learn.
    draws = np.random.default_rng(9).integers(0, 30, size=(300, 30))
    accuracies, aucs = [], []
    for rows in draws:
        y, p = labels[rows], probs[rows]
        accuracies.append(accuracy_score(y, p.argmax(1)))
        aucs.append(
            np.mean([roc_auc_score(y == c, p[:, c]) for c in range(C) if 0 < (y == c).sum() < 30])
        )
    assert accuracy_ci == pytest.approx(np.percentile(accuracies, [2.5, 97.5]), abs=1e-9)
    assert auc_ci == pytest.approx(np.percentile(aucs, [2.5, 97.5]), abs=1e-9)


def test_metrics_carry_bootstrap_intervals() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (40, 640):
        labels = rng.integers(0, C, size=n)
        probs = noisy_probs(labels, rng)
        m = classification_metrics(labels, probs)
        for key in ("image_accuracy", "macro_auc"):
            low, high = m[f"{key}_ci"]
            assert low <= m[key] <= high and low < high
        widths.append(m["image_accuracy_ci"][1] - m["image_accuracy_ci"][0])
        assert classification_metrics(labels, probs) == m  # seeded
        assert classification_metrics(labels, probs, seed=1)["macro_auc_ci"] != m["macro_auc_ci"]
        json.dumps(m, allow_nan=False)
    # A binomial proportion's interval narrows as 1/sqrt(n): 16x the images, about 1/4 as wide.
    assert 0.15 < widths[1] / widths[0] < 0.4


def test_intervals_of_degenerate_samples() -> None:
    labels = np.zeros(6, dtype=int)  # one class only: no AUC, so no AUC interval
    m = classification_metrics(labels, np.eye(C)[labels])
    assert m["image_accuracy_ci"] == [1.0, 1.0] and m["macro_auc_ci"] is None
    labels = np.repeat(np.arange(C), 3)
    m = classification_metrics(labels, np.eye(C)[labels] * 0.9 + 0.1 / C)
    assert m["image_accuracy_ci"] == m["macro_auc_ci"] == [1.0, 1.0]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    results, store = synthetic_results()
    out = tmp_path_factory.mktemp("report")
    return write_report(out, results, patches=store.__getitem__, n_examples=3), results


def test_report_metrics_equal_classification_metrics(report) -> None:
    rep, results = report
    ok = [r for r in results if r.error is None]
    patch_labels = np.concatenate([np.full((r.tissue >= 0.05).sum(), r.label) for r in ok])
    patch_preds = np.concatenate([r.patch_probs[r.tissue >= 0.05].argmax(axis=1) for r in ok])
    expected = classification_metrics(
        np.array([r.label for r in ok]), np.stack([r.probs for r in ok]), patch_labels, patch_preds
    )
    saved = json.loads((rep.out_dir / "metrics.json").read_text())
    assert saved == rep.metrics == expected | {"n_errors": 1}
    assert saved["n_images"] == 12 and saved["n_patches"] == 12 * 8
    assert rep.misclassified == [r.image_id for r in ok if r.predicted != r.label]


def test_predictions_csv(report) -> None:
    rep, results = report
    with rep.predictions_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "image_id", "path", "label", "predicted",
        "prob_Normal", "prob_Benign", "prob_InSitu", "prob_Invasive", "error",
    ]  # fmt: skip
    assert [row["image_id"] for row in rows] == [r.image_id for r in results]
    first = results[0]
    assert rows[0]["label"] == "Normal" and rows[0]["predicted"] == CLASSES[first.predicted]
    assert rows[0]["prob_Invasive"] == f"{first.probs[3]:.4f}" and rows[0]["error"] == ""
    assert rows[-1]["error"] == "unreadable: truncated TIFF"
    assert rows[-1]["label"] == "Benign" and rows[-1]["predicted"] == rows[-1]["prob_Normal"] == ""


def test_figures_are_real_pngs(report) -> None:
    rep, results = report
    ok = [r for r in results if r.error is None]
    wrong = [r.image_id for r in ok if r.predicted != r.label]
    heatmap_ids = (wrong + [r.image_id for r in ok if r.image_id not in wrong])[:3]
    assert set(rep.figures) == {"confusion_matrix", "roc", "tsne", "patch_grid"} | {
        f"heatmap/{i}" for i in heatmap_ids
    }
    assert rep.figures["roc"] == rep.out_dir / "roc.png"
    assert rep.figures[f"heatmap/{heatmap_ids[0]}"].name.startswith("heatmap_")
    for path in rep.figures.values():
        assert path.parent == rep.out_dir
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300
            im.load()


def test_html_is_self_contained(report) -> None:
    rep, _ = report
    page = rep.html.read_text()
    accuracy = f"{rep.metrics['image_accuracy']:.3f}"
    assert f'<td class="num">{accuracy}</td>' in page
    low, high = rep.metrics["image_accuracy_ci"]
    assert f'<td class="num">{low:.3f}\u2013{high:.3f}</td>' in page and "95 % CI" in page
    assert "Benign/broken" in page and "unreadable: truncated TIFF" in page
    assert page.count("data:image/png;base64,") == len(rep.figures)
    assert len(re.findall(r"<img ", page)) == len(rep.figures)
    assert 'src="http' not in page and 'href="http' not in page and "<link" not in page
    assert "imagesLoaded" in page


def test_html_escapes_text(tmp_path: Path) -> None:
    results, _ = synthetic_results(n=4)
    results[-1].error = "<script>alert(1)</script>"
    page = write_report(tmp_path, results).html.read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page


def test_no_labels_gives_predictions_but_no_metrics(tmp_path: Path) -> None:
    results, store = synthetic_results(n=4, labelled=False)
    loads = []
    rep = write_report(
        tmp_path, results, patches=lambda i: loads.append(i) or store[i], n_examples=1
    )
    assert loads == [results[0].image_id]  # patch grid and heatmap share one load
    assert rep.metrics is None and not (tmp_path / "metrics.json").exists()
    assert rep.misclassified == []
    assert set(rep.figures) == {"tsne", "patch_grid", f"heatmap/{results[0].image_id}"}
    with rep.predictions_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(row["label"] == "" for row in rows)
    assert rows[0]["predicted"] == CLASSES[results[0].predicted]
    page = rep.html.read_text()
    assert "No labels" in page and "Misclassified" not in page and results[0].image_id in page
