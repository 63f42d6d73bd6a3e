"""The report folder: metrics.json, predictions.csv and figures hold what they claim."""

import csv
import html
import json
from pathlib import Path

import numpy as np
from PIL import Image

from breastnet import CLASSES
from breastnet.report import write_report
from breastnet.report.metrics import classification_metrics, two_class_metrics
from breastnet.report.writer import NO_HEATMAPS
from breastnet.stages.common import publish_report

from conftest import compose_config, synthetic_results


def test_report_metrics_equal_classification_metrics(report) -> None:
    rep, results = report
    ok = [r for r in results if r.error is None]
    patch_labels = np.concatenate([np.full((r.tissue >= 0.05).sum(), r.label) for r in ok])
    patch_preds = np.concatenate([r.patch_probs[r.tissue >= 0.05].argmax(axis=1) for r in ok])
    expected = classification_metrics(
        np.array([r.label for r in ok]), np.stack([r.probs for r in ok]), patch_labels, patch_preds
    )
    groups = np.array([r.label in (2, 3) for r in ok], dtype=int)
    expected["two_class"] = two_class_metrics(groups, np.stack([r.probs for r in ok]))
    saved = json.loads((rep.out_dir / "metrics.json").read_text())
    views = {"n_images_by_view": {"4-class": 40, "2-class": 40}}
    extra = {"n_errors": 1, "below_chance": []} | views
    assert saved == rep.metrics == expected | extra
    assert saved["n_images"] == 40 and saved["n_patches"] == 40 * 8
    wrong = sorted((r for r in ok if r.predicted != r.label), key=lambda r: -r.probs.max())
    assert rep.misclassified == [r.image_id for r in wrong]


def test_predictions_csv(report) -> None:
    rep, results = report
    with rep.predictions_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "image_id", "path", "label", "predicted",
        "prob_Normal", "prob_Benign", "prob_InSitu", "prob_Invasive", "prob_carcinoma",
        "n_patches", "mpp", "error",
    ]  # fmt: skip
    assert [row["image_id"] for row in rows] == [r.image_id for r in results]
    first = results[0]
    assert rows[0]["label"] == "Normal" and rows[0]["predicted"] == CLASSES[first.predicted]
    assert rows[0]["prob_Invasive"] == f"{first.probs[3]:.4f}" and rows[0]["error"] == ""
    assert rows[0]["prob_carcinoma"] == f"{first.probs[2] + first.probs[3]:.4f}"
    assert rows[0]["n_patches"] == "9" and rows[0]["mpp"] == ""
    assert rows[-1]["error"] == "unreadable: truncated TIFF"
    assert rows[-1]["label"] == "Benign" and rows[-1]["predicted"] == rows[-1]["prob_Normal"] == ""


def test_figures_are_real_pngs(report) -> None:
    rep, results = report
    ok = [r for r in results if r.error is None]
    wrong = rep.misclassified
    heatmap_ids = (wrong + [r.image_id for r in ok if r.image_id not in wrong])[:3]
    overview = {"confusion_matrix", "roc", "tsne", "patch_grid", "confusion_2class", "roc_2class"}
    assert set(rep.figures) == overview | {f"heatmap/{i}" for i in heatmap_ids}
    assert rep.figures["roc"] == rep.out_dir / "roc.png"
    assert rep.figures[f"heatmap/{heatmap_ids[0]}"].name.startswith("heatmap_")
    for path in rep.figures.values():
        assert path.parent == rep.out_dir
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300
            im.load()


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


def test_most_confident_errors_get_heatmaps_first(tmp_path: Path) -> None:
    results, store = synthetic_results(n=8)
    wrong = {1: 0.5, 4: 0.6, 7: 0.95}  # image -> p(its wrong prediction); the surest last
    for i, r in enumerate(results[:-1]):
        predicted, p = ((r.label + 1) % 4, wrong[i]) if i in wrong else (r.label, 0.7)
        r.probs = np.full(4, (1 - p) / 3)
        r.probs[predicted] = p
    rep = write_report(tmp_path, results, patches=store.__getitem__, n_examples=4)
    expected = [results[i].image_id for i in (7, 4, 1, 0)]
    drawn = [name.removeprefix("heatmap/") for name in rep.figures if name.startswith("heatmap/")]
    assert drawn == expected and rep.misclassified == expected[:3]
    page = rep.html.read_text()
    captions = [page.index(f"{i}: per-class patch probabilities") for i in expected]
    assert captions == sorted(captions)


def test_a_frozen_encoders_report_has_no_patch_accuracy(tmp_path: Path) -> None:
    """No patch probabilities (a frozen encoder): no patch accuracy in metrics.json or on the
    page; heatmaps of the image model's per-tile probabilities where it has them."""
    results, store = synthetic_results(n=8)
    rng = np.random.default_rng(1)
    for i, r in enumerate(results[:-1]):
        r.patch_probs, r.attention = None, None
        r.tile_probs = rng.dirichlet(np.ones(4), len(r.positions)) if i < 2 else None
    rep = write_report(tmp_path / "tiles", results, patches=store.__getitem__, n_examples=3)
    assert "patch_accuracy" not in rep.metrics and "n_patches" not in rep.metrics
    saved = json.loads((rep.out_dir / "metrics.json").read_text())
    assert "patch_accuracy" not in saved and saved["image_accuracy"] is not None
    drawn = sorted(k.removeprefix("heatmap/") for k in rep.figures if k.startswith("heatmap/"))
    assert drawn == sorted(r.image_id for r in results[:2])  # only those with tile values
    page = rep.html.read_text()
    assert "patch accuracy" not in page and "tile probabilities of the image model" in page
    rows = list(csv.DictReader(rep.predictions_csv.open(newline="")))
    assert rows[0]["n_patches"] == "9"  # the tiles still count
    for r in results[:2]:
        r.tile_probs = None
    rep = write_report(tmp_path / "none", results, patches=store.__getitem__)
    assert not [k for k in rep.figures if k.startswith("heatmap/")] and "patch_grid" in rep.figures
    assert html.escape(NO_HEATMAPS) in rep.html.read_text()


def test_below_chance_is_said_in_metrics_json_the_page_and_a_warning(
    tmp_path: Path, caplog
) -> None:
    """Each image's probabilities moved one class on: the model is surely wrong, its
    accuracy under the commonest class's share and its AUC under 0.5."""
    results, store = synthetic_results(n=12)
    for r in results[:-1]:
        r.probs = np.roll(r.probs, 1)
    cfg = compose_config(tmp_path, "logger=none", "evaluate.examples=0")
    rep, _ = publish_report(
        cfg, tmp_path / "out", results, store.__getitem__, "t", 0.05, "eval", tmp_path / "parts"
    )
    remarks = rep.metrics["below_chance"]
    assert remarks[0].startswith("4-class AUC ") and "below chance (0.5)" in remarks[0]
    assert remarks[1].startswith(f"4-class accuracy {rep.metrics['image_accuracy']:.3f} is")
    assert "below the share of the commonest class, Normal (0.250)" in remarks[1]
    saved = json.loads((rep.out_dir / "metrics.json").read_text())
    assert saved["below_chance"] == remarks
    assert f"Below chance: {remarks[0]}" in rep.html.read_text()
    assert f"below chance: {remarks[0]} ({rep.html})" in caplog.text
