"""Writes a report folder: metrics.json, predictions.csv, the PNG figures and index.html."""

import csv
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breastnet import CLASSES
from breastnet.artifacts import write_json, write_text
from breastnet.data.store import Tiling
from breastnet.labels import GROUPS
from breastnet.report.figures import (
    TileCache,
    plot_confusion,
    plot_pairs,
    plot_patch_grid,
    plot_roc,
    plot_tsne,
    plot_two_class_roc,
)
from breastnet.report.heatmap import plot_heatmap, tile_values
from breastnet.report.html import render_html
from breastnet.report.metrics import (
    below_chance,
    classification_metrics,
    roc_curves,
    two_class_metrics,
    two_class_roc,
)
from breastnet.report.result import ImageResult, class_name, label_name

NO_HEATMAPS = (
    "No heatmaps: the patch CNN gives no class probabilities (a frozen encoder's head is "
    "zero, every class 0.25), and this image model gives neither attention weights nor "
    "per-tile class scores (mean_features and attention do)."
)

# metrics.json's 4-class keys when the labels are only the 2-class groups (no 4-class view:
# n_images None, not 0; n_images_by_view counts what each view scored)
_NO_FOUR_CLASS = dict.fromkeys(
    (
        "image_accuracy",
        "image_accuracy_ci",
        "balanced_accuracy",
        "balanced_accuracy_ci",
        "patch_accuracy",
        "macro_auc",
        "macro_auc_ci",
    )
) | {"per_class": None, "confusion_matrix": None, "n_images": None, "n_patches": None}


@dataclass
class Report:
    """Where ``write_report`` put things, and the ROC curves it drew (for W&B)."""

    out_dir: Path
    metrics: dict | None  # what metrics.json holds (None when no result has a label)
    figures: dict[str, Path]  # name -> PNG path ("confusion_matrix", "heatmap/<image_id>"...)
    predictions_csv: Path
    html: Path
    # image ids predicted wrong (the group, when only it is known), most confident first
    misclassified: list[str]
    roc_curves: dict[int, tuple[np.ndarray, np.ndarray]]  # class -> (fpr, tpr), when labelled


def _patch_predictions(
    labelled: list[ImageResult], min_tissue: float
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """True and predicted class of the patches with at least ``min_tissue`` tissue (None,
    None when no result has patches): what patch accuracy counts."""
    patch_labels, patch_preds = [], []
    for r in labelled:
        if r.patch_probs is None:
            continue
        patch_preds.append(np.argmax(r.tissue_patches(r.patch_probs, min_tissue), axis=1))
        patch_labels.append(np.full(len(patch_preds[-1]), r.label))
    if not patch_labels:
        return None, None
    return np.concatenate(patch_labels), np.concatenate(patch_preds)


def _write_predictions(path: Path, results: list[ImageResult], classes: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    probs = [f"prob_{c}" for c in classes]
    header = ["image_id", "path", "label", "predicted", *probs, "prob_carcinoma", "n_patches"]
    writer.writerow([*header, "mpp", "error"])
    for r in results:
        probs = [""] * len(classes) if r.failed else [f"{p:.4f}" for p in r.probs]
        carcinoma = "" if r.failed else f"{r.carcinoma_prob:.4f}"
        label, predicted = label_name(r, classes), class_name(r.predicted, classes)
        counts = ["" if x is None else x for x in (r.n_patches, r.mpp)]
        writer.writerow(
            [r.image_id, r.path, label, predicted, *probs, carcinoma, *counts, r.error or ""]
        )
    write_text(path, buffer.getvalue())


def _safe_name(image_id: str, taken: set[str]) -> str:
    """A file-name-safe, unique version of an image id (ids look like ``Benign/b001``)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "image"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def write_report(
    out_dir: Path,
    results: list[ImageResult],
    patches: Callable[[str], np.ndarray] | None = None,
    classes: Sequence[str] = CLASSES,
    title: str = "breastnet report",
    min_tissue: float = 0.05,
    n_examples: int = 4,
    seed: int = 0,
    split: dict | None = None,
    provenance: dict | None = None,
    inputs: dict | None = None,
    tiling: Tiling | None = None,
) -> Report:
    """Write metrics.json (when labelled), predictions.csv, PNG figures and index.html, and
    provenance.json when given.

    metrics.json has no ``patch_accuracy`` and ``n_patches`` when no result has patch
    probabilities (a frozen encoder), and says in ``below_chance`` (a list of remarks)
    where the numbers are worse than guessing (``breastnet.report.metrics.below_chance``).

    Args:
        out_dir: where the files go (created if needed).
        results: one per image, failed ones (``error`` set) included.
        patches: image_id -> uint8 [N, S, S, 3] stain-normalised patches in the order of
            ``positions``; None draws no image figures (patch grid, heatmaps).
        classes: class names, in index order.
        title: the page title.
        min_tissue: patches with less tissue are left out of patch accuracy and t-SNE.
        n_examples: how many heatmaps to draw: the misclassified images, most confident
            first (the errors a reader should see first), then the others in input order;
            only of images with per-tile values (``heatmap.tile_values``) or attention.
        seed: for the t-SNE and its subsample.
        split: what was evaluated (``breastnet.stages.evaluate``): ``text`` (sides, images
            and source groups), counts, ``near_duplicates`` and the audit's closest ``pairs``
            (with ``image_path``/``train_path``); kept in metrics.json and shown on the page.
        provenance: where the numbers came from (``breastnet.provenance``); kept in
            provenance.json and metrics.json and shown on the page.
        inputs: what was scored against what the model was trained on (training data and
            split, pixel size, label map, training images among the inputs, feature
            shift: ``breastnet.inference.checks``); kept in metrics.json, shown on the page.
        tiling: how the patches were cut: heatmaps then draw tiles at their true positions
            (overlapping ones too, with ``ImageResult.origins``) and a scale bar.
    """
    out_dir = Path(out_dir)
    ok = [r for r in results if not r.failed]
    labelled = [r for r in ok if r.label is not None]
    grouped = [r for r in ok if r.group is not None]  # 4-class labels count in 2-class too

    metrics, curves = None, {}
    if grouped:
        metrics = dict(_NO_FOUR_CLASS)
        if labelled:
            labels = np.array([r.label for r in labelled])
            probs = np.stack([r.probs for r in labelled])
            patch_labels, patch_preds = _patch_predictions(labelled, min_tissue)
            metrics = classification_metrics(labels, probs, patch_labels, patch_preds, classes)
            curves = roc_curves(labels, probs)
        groups, group_probs = (
            np.array([r.group for r in grouped]),
            np.stack([r.probs for r in grouped]),
        )
        metrics["two_class"] = two_class_metrics(groups, group_probs)
        if not any(r.patch_probs is not None for r in ok):  # a frozen encoder: none to score
            for key in ("patch_accuracy", "n_patches"):
                metrics.pop(key)
        metrics["below_chance"] = below_chance(metrics)
        metrics["n_images_by_view"] = {"4-class": len(labelled), "2-class": len(grouped)}
        metrics["n_errors"] = len(results) - len(ok)
        if inputs is not None:
            metrics["inputs"] = inputs
        if split is not None:
            metrics["split"] = {k: v for k, v in split.items() if k != "pairs"}
        if provenance is not None:
            metrics["provenance"] = provenance
        write_json(out_dir / "metrics.json", metrics)
    if provenance is not None:
        write_json(out_dir / "provenance.json", provenance)
    predictions_csv = out_dir / "predictions.csv"
    _write_predictions(predictions_csv, results, classes)

    figures: dict[str, Path] = {}
    if labelled:
        figures["confusion_matrix"] = plot_confusion(
            metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png"
        )
        if curves:
            figures["roc"] = plot_roc(curves, metrics, classes, out_dir / "roc.png")
    if grouped:
        two = metrics["two_class"]
        figures["confusion_2class"] = plot_confusion(
            two["confusion_matrix"], GROUPS, out_dir / "confusion_2class.png"
        )
        if (curve := two_class_roc(groups, group_probs)) is not None:
            figures["roc_2class"] = plot_two_class_roc(curve, two, out_dir / "roc_2class.png")
    if split is not None and split.get("pairs"):
        figures["audit_pairs"] = plot_pairs(split["pairs"], out_dir / "audit_pairs.png")
    tsne = plot_tsne(ok, classes, min_tissue, seed, out_dir / "tsne.png")
    if tsne is not None:
        figures["tsne"] = tsne.path

    misclassified = sorted((r for r in ok if r.wrong), key=lambda r: -r.probs[r.predicted])
    heatmaps: dict[str, Path] = {}
    heatmap_note = None
    if patches is not None:
        tiles = TileCache(patches)  # predict re-tiles an image per call: load each once
        gridded = [r for r in ok if r.positions is not None]
        first = next((r for r in gridded if r.label is not None), gridded[0] if gridded else None)
        if first is not None:
            figures["patch_grid"] = plot_patch_grid(
                first, tiles(first), classes, out_dir / "patch_grid.png"
            )
        rank = {r.image_id: i for i, r in enumerate(misclassified)}
        drawable = [r for r in gridded if tile_values(r) is not None or r.attention is not None]
        if gridded and not drawable:
            heatmap_note = NO_HEATMAPS
        chosen = sorted(drawable, key=lambda r: rank.get(r.image_id, len(rank)))
        for stale in out_dir.glob("heatmap_*.png"):  # of an earlier report in this folder
            stale.unlink()
        taken: set[str] = set()
        for r in chosen[:n_examples]:
            path = out_dir / f"heatmap_{_safe_name(r.image_id, taken)}.png"
            heatmaps[r.image_id] = plot_heatmap(r, tiles(r), classes, path, tiling)
            figures[f"heatmap/{r.image_id}"] = heatmaps[r.image_id]

    page = render_html(
        title,
        results,
        metrics,
        figures,
        heatmaps,
        misclassified,
        classes,
        split,
        provenance,
        inputs,
        tsne,
        heatmap_note,
    )
    html_path = out_dir / "index.html"
    write_text(html_path, page)
    return Report(
        out_dir=out_dir,
        metrics=metrics,
        figures=figures,
        predictions_csv=predictions_csv,
        html=html_path,
        misclassified=[r.image_id for r in misclassified],
        roc_curves=curves,
    )
