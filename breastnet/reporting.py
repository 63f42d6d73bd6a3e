"""What a researcher reads after a run: metrics.json, plots, predictions.csv and index.html.

The evaluate and predict stages hand over one ``ImageResult`` per image and call
``write_report``; everything here is plain numpy in, files out. Figures are drawn on bare
``matplotlib.figure.Figure`` objects (no pyplot), so no GUI backend or global figure state is
involved and nothing stays open after a figure is saved.
"""

import base64
import csv
import html
import io
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from sklearn.metrics import roc_curve
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
)

from breastnet import CLASSES
from breastnet.artifacts import atomic_write, write_json, write_text

DPI = 120
TSNE_MAX_PATCHES = 2000
TSNE_MIN_PATCHES = 10
BOOTSTRAP_RESAMPLES = 1000
_BOOTSTRAP_CHUNK = 2**22  # resample x image weights held at once (32 MiB of float64)
# Normal green, Benign blue, InSitu orange, Invasive red; further classes take tab10's rest.
_TAB10 = colormaps["tab10"].colors
_PALETTE = [_TAB10[i] for i in (2, 0, 1, 3, 4, 5, 6, 7, 8, 9)]


@dataclass
class ImageResult:
    """What the pipeline produced for one image (arrays are numpy)."""

    image_id: str
    path: str
    label: int | None  # true class index, None when unknown
    probs: np.ndarray | None  # [C] image-level class probabilities; None on error
    patch_probs: np.ndarray | None  # [N, C] per-patch probabilities (grid row-major order)
    positions: np.ndarray | None  # [N, 2] (row, col) grid position of each patch
    tissue: np.ndarray | None  # [N] tissue fraction of each patch (0..1)
    features: np.ndarray | None = None  # [N, D] pooled patch features (for t-SNE)
    attention: np.ndarray | None = None  # [N] aggregator attention weights, when it has them
    error: str | None = None  # why this image has no prediction (unreadable, too small...)

    @property
    def predicted(self) -> int | None:
        """Index of the most probable class, None when the image has no prediction."""
        if self.error is not None or self.probs is None:
            return None
        return int(np.argmax(self.probs))


@dataclass
class Report:
    """Where ``write_report`` put things."""

    out_dir: Path
    metrics: dict | None  # what metrics.json holds (None when no result has a label)
    figures: dict[str, Path]  # name -> PNG path ("confusion_matrix", "heatmap/<image_id>"...)
    predictions_csv: Path
    html: Path
    misclassified: list[str]  # image ids with label != predicted


def _number(x: float | np.floating | torch.Tensor) -> float | None:
    """A JSON-safe float: NaN and infinities become None (JSON has no NaN).

    A float32 value keeps its shortest float32 spelling (0.9166667, not 0.9166666865348816).
    """
    if isinstance(x, torch.Tensor):
        x = x.numpy()[()]
    x = float(str(x)) if isinstance(x, np.float32) else float(x)
    return x if math.isfinite(x) else None


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
) -> tuple[list[float], list[float] | None]:
    """Percentile-bootstrap intervals of image accuracy and macro AUC, resampling images.

    Args:
        labels: [n] true class indices.
        probs: [n, C] class probabilities.
        auc_classes: the classes whose AUC enters the macro mean (those defined on the full
            sample); a resample averages those it holds both positives and negatives of.
        resamples: bootstrap resamples (draws of n images with replacement).
        seed: the resampling seed: the same inputs and seed give the same intervals.
        level: the interval's coverage.

    Returns:
        ``([low, high] accuracy, [low, high] macro AUC or None without auc_classes)``.
    """
    n = len(labels)
    correct = (probs.argmax(1) == labels).astype(float)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    accuracy, auc = [], []
    for rows in np.array_split(draws, max(1, resamples * n // _BOOTSTRAP_CHUNK)):
        offsets = rows + n * np.arange(len(rows))[:, None]
        weights = np.bincount(offsets.ravel(), minlength=rows.size).reshape(rows.shape)
        accuracy.append(weights @ correct / n)
        if auc_classes:
            per_class = [_weighted_auc(probs[:, c], labels == c, weights) for c in auc_classes]
            auc.append(np.stack(per_class))
    tails = [50 * (1 - level), 50 * (1 + level)]
    accuracy_ci = [_number(x) for x in np.percentile(np.concatenate(accuracy), tails)]
    if not auc:
        return accuracy_ci, None
    per_resample = np.concatenate(auc, axis=1)  # classes x resamples
    defined = ~np.isnan(per_resample).all(0)
    macro = np.nanmean(per_resample[:, defined], axis=0)
    return accuracy_ci, [_number(x) for x in np.percentile(macro, tails)]


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
        A JSON-serialisable dict with DESIGN.md's ``metrics.json`` keys plus ``n_images``,
        ``n_patches``, and 95 % percentile-bootstrap intervals over images
        (``bootstrap_intervals``), ``image_accuracy_ci`` and ``macro_auc_ci``: ``[low, high]``.
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
    accuracy = multiclass_accuracy(scores, target, num_classes=n_classes, average="micro")
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
    accuracy_ci, auc_ci = bootstrap_intervals(labels, probs, with_auc, seed=seed)

    patch_accuracy = n_patches = None
    if patch_labels is not None and patch_preds is not None:
        patch_target = torch.as_tensor(np.asarray(patch_labels, dtype=np.int64))
        patch_pred = torch.as_tensor(np.asarray(patch_preds, dtype=np.int64))
        if patch_target.shape != patch_pred.shape or patch_target.ndim != 1:
            raise ValueError("patch_labels and patch_preds must be 1-d arrays of one length")
        n_patches = len(patch_target)
        if n_patches:
            patch_accuracy = _number(
                multiclass_accuracy(
                    patch_pred, patch_target, num_classes=n_classes, average="micro"
                )
            )
    return {
        "image_accuracy": _number(accuracy),
        "image_accuracy_ci": accuracy_ci,
        "patch_accuracy": patch_accuracy,
        "macro_auc": _number(np.mean(present)) if present else None,
        "macro_auc_ci": auc_ci,
        "per_class": per_class,
        "confusion_matrix": confusion.astype(int).tolist(),
        "n_images": n,
        "n_patches": n_patches,
    }


def _failed(r: ImageResult) -> bool:
    return r.error is not None or r.probs is None


def _report_metrics(
    labelled: list[ImageResult], classes: Sequence[str], min_tissue: float, n_errors: int
) -> dict:
    """Metrics of the labelled results; patches below ``min_tissue`` are left out."""
    patch_labels, patch_preds = [], []
    for r in labelled:
        if r.patch_probs is None:
            continue
        keep = np.ones(len(r.patch_probs), bool) if r.tissue is None else r.tissue >= min_tissue
        patch_preds.append(np.argmax(r.patch_probs[keep], axis=1))
        patch_labels.append(np.full(int(keep.sum()), r.label))
    metrics = classification_metrics(
        np.array([r.label for r in labelled]),
        np.stack([r.probs for r in labelled]),
        np.concatenate(patch_labels) if patch_labels else None,
        np.concatenate(patch_preds) if patch_preds else None,
        classes,
    )
    return metrics | {"n_errors": n_errors}


def _class_name(index: int | None, classes: Sequence[str]) -> str:
    return "" if index is None else classes[index]


def _write_predictions(path: Path, results: list[ImageResult], classes: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["image_id", "path", "label", "predicted", *(f"prob_{c}" for c in classes), "error"]
    writer.writerow(header)
    for r in results:
        probs = [""] * len(classes) if _failed(r) else [f"{p:.4f}" for p in r.probs]
        label, predicted = _class_name(r.label, classes), _class_name(r.predicted, classes)
        writer.writerow([r.image_id, r.path, label, predicted, *probs, r.error or ""])
    write_text(path, buffer.getvalue())


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def _plot_confusion(confusion: list[list[int]], classes: Sequence[str], path: Path) -> Path:
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    percent = np.divide(100 * counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    size = 1.0 + 0.9 * len(classes)
    fig = Figure(figsize=(2 * size + 1.5, size + 0.6), layout="constrained")
    panels = (
        (counts, "counts", lambda v: f"{v:.0f}", counts.max() or 1.0),
        (percent, "row-normalised (%)", lambda v: f"{v:.0f}%", 100.0),
    )
    for ax, (values, title, fmt, vmax) in zip(fig.subplots(1, 2), panels, strict=True):
        ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        for (i, j), v in np.ndenumerate(values):
            text = "n/a" if np.isnan(v) else fmt(v)
            dark = not np.isnan(v) and v > 0.55 * vmax
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black")
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=30, ha="right")
        ax.set_yticks(ticks, classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.suptitle(f"Confusion matrix ({int(counts.sum())} images)")
    return _save(fig, path)


def _plot_roc(
    labels: np.ndarray, probs: np.ndarray, metrics: dict, classes: Sequence[str], path: Path
) -> Path:
    fig = Figure(figsize=(5.6, 5.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for c, name in enumerate(classes):
        auc = metrics["per_class"][name]["auc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
        ax.plot(fpr, tpr, color=_PALETTE[c % 10], lw=2, label=f"{name} (AUC {auc:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    macro = metrics["macro_auc"]
    ax.set_title(f"ROC, one-vs-rest, {len(labels)} images (macro AUC {macro:.2f})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_tsne(
    results: list[ImageResult], classes: Sequence[str], min_tissue: float, seed: int, path: Path
) -> Path | None:
    """t-SNE of patch features coloured by image class; None when too few patches."""
    features, colour, used = [], [], []
    for r in results:
        if r.features is None:
            continue
        used.append(r)
        keep = np.ones(len(r.features), bool) if r.tissue is None else r.tissue >= min_tissue
        features.append(np.asarray(r.features, dtype=np.float32)[keep])
        colour.append(np.full(int(keep.sum()), r.predicted if r.label is None else r.label))
    if not features:
        return None
    x, y = np.concatenate(features), np.concatenate(colour)
    if len(x) < TSNE_MIN_PATCHES:
        return None
    if len(x) > TSNE_MAX_PATCHES:
        pick = np.sort(np.random.default_rng(seed).choice(len(x), TSNE_MAX_PATCHES, replace=False))
        x, y = x[pick], y[pick]

    perplexity = min(30.0, (len(x) - 1) / 3)
    embedded = TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig = Figure(figsize=(6.4, 6), layout="constrained")
    ax = fig.subplots()
    for c, name in enumerate(classes):
        mine = y == c
        if mine.any():
            ax.scatter(
                *embedded[mine].T,
                s=10,
                alpha=0.7,
                color=_PALETTE[c % 10],
                label=f"{name} ({int(mine.sum())})",
            )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    known = sum(r.label is not None for r in used)
    keys = {len(used): "true class", 0: "predicted class"}
    key = keys.get(known, "true class, predicted where unknown")
    ax.set_title(f"t-SNE of {len(x)} patch features\n(colour: {key})")
    ax.legend(title="class (patches)", markerscale=2, loc="best")
    return _save(fig, path)


def _montage(
    tiles: np.ndarray, positions: np.ndarray, max_side: int, gap: float = 0.0
) -> tuple[np.ndarray, tuple[int, int]]:
    """Tiles laid out at their (row, col) grid positions on white, at most ``max_side`` px.

    Tiles are shrunk by striding (this is for display); ``gap`` is a fraction of a tile.
    Returns the canvas and the (height, width) of one grid cell, tile plus gap, in its pixels.
    """
    rows, cols = positions.max(axis=0) + 1
    step = max(1, math.ceil(max(tiles.shape[1] * rows, tiles.shape[2] * cols) / max_side))
    tiles = tiles[:, ::step, ::step]
    h, w = tiles.shape[1:3]
    space = max(2, round(gap * h)) if gap else 0
    cell_h, cell_w = h + space, w + space
    canvas = np.full((rows * cell_h - space, cols * cell_w - space, 3), 255, np.uint8)
    for tile, (r, c) in zip(tiles, positions, strict=True):
        canvas[r * cell_h : r * cell_h + h, c * cell_w : c * cell_w + w] = tile
    return canvas, (cell_h, cell_w)


class _TileCache:
    """``patches`` checked against each result's grid, each image loaded once."""

    def __init__(self, patches: Callable[[str], np.ndarray]) -> None:
        self.patches = patches
        self.loaded: dict[str, np.ndarray] = {}

    def __call__(self, r: ImageResult) -> np.ndarray:
        if r.image_id not in self.loaded:
            tiles = np.asarray(self.patches(r.image_id))
            if tiles.ndim != 4 or len(tiles) != len(r.positions):
                raise ValueError(
                    f"{r.image_id}: expected {len(r.positions)} patches [N, S, S, 3], "
                    f"got {tiles.shape}"
                )
            self.loaded[r.image_id] = tiles
        return self.loaded[r.image_id]


def _headline(r: ImageResult, classes: Sequence[str]) -> str:
    truth = "" if r.label is None else f"true {classes[r.label]}, "
    return f"{r.image_id}: {truth}predicted {classes[r.predicted]} ({r.probs[r.predicted]:.2f})"


def _plot_patch_grid(
    r: ImageResult, tiles: np.ndarray, classes: Sequence[str], path: Path
) -> Path:
    positions = np.asarray(r.positions, dtype=int)
    canvas, (cell_h, cell_w) = _montage(tiles, positions, max_side=1600, gap=0.04)
    fig = Figure(figsize=(8, 8 * canvas.shape[0] / canvas.shape[1] + 0.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(canvas)
    order = np.lexsort((positions[:, 1], positions[:, 0]))  # row-major numbering
    for number, i in enumerate(order, start=1):
        row, col = positions[i]
        x, y = col * cell_w + 3, row * cell_h + 3
        ax.text(
            x,
            y,
            str(number),
            ha="left",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
        )
    ax.set_axis_off()
    ax.set_title(f"{_headline(r, classes)}\n{len(positions)} patches in grid order")
    return _save(fig, path)


def _grid_values(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    rows, cols = positions.max(axis=0) + 1
    grid = np.full((rows, cols), np.nan)
    grid[positions[:, 0], positions[:, 1]] = values
    return grid


def _plot_heatmap(r: ImageResult, tiles: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """The image beside one per-class patch-probability overlay (and attention, if any)."""
    positions = np.asarray(r.positions, dtype=int)
    image, _ = _montage(tiles, positions, max_side=480)
    # Overlays go on a grey copy: the colour scale then reads without the stain's pinks.
    grey = image @ np.array([0.299, 0.587, 0.114])
    extent = (0, image.shape[1], image.shape[0], 0)
    n_panels = 1 + len(classes) + (r.attention is not None)
    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    width = 3.0 * ncols + 1.0
    height = 3.0 * nrows * image.shape[0] / image.shape[1] + 0.4 * nrows + 0.9
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols)).ravel())
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title("the patches, as tiled\n ")

    def overlay(ax: Axes, values: np.ndarray, vmax: float, cmap: str):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        return ax.imshow(
            _grid_values(values, positions),
            extent=extent,
            cmap=cmap,
            vmin=0,
            vmax=vmax,
            alpha=0.6,
            interpolation="nearest",
        )

    class_axes = axes[1 : 1 + len(classes)]
    for c, (ax, name) in enumerate(zip(class_axes, classes, strict=True)):
        shown = overlay(ax, r.patch_probs[:, c], 1.0, "inferno")
        tags = [t for t, k in (("true", r.label), ("predicted", r.predicted)) if k == c]
        colour = "black"
        if tags:
            colour = "tab:green" if r.label in (None, r.predicted) or c == r.label else "tab:red"
        marker = f"\u25c6 {' & '.join(tags)}" if tags else " "
        ax.set_title(
            f"{name}: image p={r.probs[c]:.2f}\n{marker}",
            color=colour,
            fontweight="bold" if tags else "normal",
        )
    fig.colorbar(
        shown, ax=axes, location="bottom", shrink=0.5, aspect=40, label="patch probability"
    )
    if r.attention is not None:
        attention = np.asarray(r.attention, dtype=float)
        ax = axes[1 + len(classes)]
        shown = overlay(ax, attention, float(attention.max()) or 1.0, "viridis")
        ax.set_title("attention weight\n ")
        fig.colorbar(shown, ax=ax, shrink=0.8)
    fig.suptitle(_headline(r, classes))
    return _save(fig, path)


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
) -> Report:
    """Write metrics.json (when labelled), predictions.csv, PNG figures and index.html.

    Args:
        out_dir: where the files go (created if needed).
        results: one per image, failed ones (``error`` set) included.
        patches: image_id -> uint8 [N, S, S, 3] stain-normalised patches in the order of
            ``positions``; None draws no image figures (patch grid, heatmaps).
        classes: class names, in index order.
        title: the page title.
        min_tissue: patches with less tissue are left out of patch accuracy and t-SNE.
        n_examples: how many heatmaps to draw, misclassified images first.
        seed: for the t-SNE and its subsample.
    """
    out_dir = Path(out_dir)
    ok = [r for r in results if not _failed(r)]
    labelled = [r for r in ok if r.label is not None]
    n_errors = len(results) - len(ok)

    metrics = _report_metrics(labelled, classes, min_tissue, n_errors) if labelled else None
    if metrics is not None:
        write_json(out_dir / "metrics.json", metrics)
    predictions_csv = out_dir / "predictions.csv"
    _write_predictions(predictions_csv, results, classes)

    figures: dict[str, Path] = {}
    if metrics is not None:
        figures["confusion_matrix"] = _plot_confusion(
            metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png"
        )
        if metrics["macro_auc"] is not None:
            labels = np.array([r.label for r in labelled])
            probs = np.stack([r.probs for r in labelled])
            figures["roc"] = _plot_roc(labels, probs, metrics, classes, out_dir / "roc.png")
    tsne = _plot_tsne(ok, classes, min_tissue, seed, out_dir / "tsne.png")
    if tsne is not None:
        figures["tsne"] = tsne

    misclassified = [r for r in labelled if r.predicted != r.label]
    heatmaps: dict[str, Path] = {}
    if patches is not None:
        tiles = _TileCache(patches)  # predict re-tiles an image per call: load each once
        gridded = [r for r in ok if r.patch_probs is not None and r.positions is not None]
        first = next((r for r in gridded if r.label is not None), gridded[0] if gridded else None)
        if first is not None:
            figures["patch_grid"] = _plot_patch_grid(
                first, tiles(first), classes, out_dir / "patch_grid.png"
            )
        wrong = {r.image_id for r in misclassified}
        chosen = [r for r in gridded if r.image_id in wrong]
        chosen += [r for r in gridded if r.image_id not in wrong]
        taken: set[str] = set()
        for r in chosen[:n_examples]:
            path = out_dir / f"heatmap_{_safe_name(r.image_id, taken)}.png"
            heatmaps[r.image_id] = _plot_heatmap(r, tiles(r), classes, path)
            figures[f"heatmap/{r.image_id}"] = heatmaps[r.image_id]

    page = _render_html(title, results, metrics, figures, heatmaps, misclassified, classes)
    html_path = out_dir / "index.html"
    write_text(html_path, page)
    return Report(
        out_dir=out_dir,
        metrics=metrics,
        figures=figures,
        predictions_csv=predictions_csv,
        html=html_path,
        misclassified=[r.image_id for r in misclassified],
    )


# --- index.html -----------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 1em 1em 0; display: inline-block; vertical-align: top; }
figure.half { width: calc(50% - 1em); }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
.muted { color: #777; }
.error { color: #b00; }
"""

# Counts the figures that really decoded, for a headless-browser check of the page.
_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var loaded = 0;
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    if (img.complete && img.naturalWidth > 0) loaded++;
  }
  document.body.dataset.imagesLoaded = String(loaded);
});
</script>
"""

_CAPTIONS = {
    "confusion_matrix": "Confusion matrix: rows true class, columns predicted class.",
    "roc": "One-vs-rest ROC curve of each class present in the labels.",
    "tsne": "t-SNE of patch features, coloured by the class of their image.",
    "patch_grid": "The patches of one image at their grid positions, numbered row by row.",
}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_ci(interval: list[float] | None) -> str:
    return "n/a" if interval is None else f"{interval[0]:.3f}–{interval[1]:.3f}"


def _esc(x: object) -> str:
    return html.escape(str(x))


def _table(header: Sequence[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are already escaped."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, caption: str, half: bool = False) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    css = ' class="half"' if half else ""
    return (
        f'<figure{css}><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _metrics_html(metrics: dict, classes: Sequence[str]) -> str:
    summary = _table(
        [
            "image accuracy",
            "95 % CI",
            "patch accuracy",
            "macro AUC",
            "95 % CI",
            "images",
            "patches",
        ],
        [
            [
                _fmt(metrics["image_accuracy"]),
                _fmt_ci(metrics["image_accuracy_ci"]),
                _fmt(metrics["patch_accuracy"]),
                _fmt(metrics["macro_auc"]),
                _fmt_ci(metrics["macro_auc_ci"]),
                str(metrics["n_images"]),
                "n/a" if metrics["n_patches"] is None else str(metrics["n_patches"]),
            ]
        ],
        numeric=set(range(7)),
    )
    per_class = _table(
        ["class", "sensitivity", "specificity", "AUC", "n"],
        [
            [_esc(name), *(_fmt(m[k]) for k in ("sensitivity", "specificity", "auc")), str(m["n"])]
            for name, m in ((c, metrics["per_class"][c]) for c in classes)
        ],
        numeric={1, 2, 3, 4},
    )
    return f"<h2>Metrics</h2>{summary}<h3>Per class</h3>{per_class}"


def _predictions_html(results: list[ImageResult], classes: Sequence[str]) -> str:
    rows = [
        [
            _esc(r.image_id),
            _esc(r.path),
            _esc(_class_name(r.label, classes)),
            _esc(classes[r.predicted]),
            _fmt(float(r.probs[r.predicted])),
        ]
        for r in results
        if not _failed(r)
    ]
    return _table(["image", "path", "true", "predicted", "probability"], rows, numeric={4})


def _render_html(
    title: str,
    results: list[ImageResult],
    metrics: dict | None,
    figures: dict[str, Path],
    heatmaps: dict[str, Path],
    misclassified: list[ImageResult],
    classes: Sequence[str],
) -> str:
    failed = [r for r in results if _failed(r)]
    parts = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="muted">{len(results)} images, {len(failed)} failed. Files: '
        + ('<a href="metrics.json">metrics.json</a>, ' if metrics is not None else "")
        + '<a href="predictions.csv">predictions.csv</a>.</p>',
    ]
    if metrics is not None:
        parts.append(_metrics_html(metrics, classes))
    else:
        parts.append("<h2>Predictions</h2><p>No labels: no metrics.</p>")
        parts.append(_predictions_html(results, classes))

    overview = [
        _img(figures[k], _CAPTIONS[k], half=k in ("roc", "tsne"))
        for k in _CAPTIONS
        if k in figures
    ]
    if overview:
        parts.append("<h2>Figures</h2>" + "".join(overview))

    if metrics is not None:
        parts.append(f"<h2>Misclassified images ({len(misclassified)})</h2>")
        if misclassified:
            rows = [
                [
                    _esc(r.image_id),
                    _esc(r.path),
                    _esc(classes[r.label]),
                    _esc(classes[r.predicted]),
                    _fmt(float(r.probs[r.predicted])),
                    _fmt(float(r.probs[r.label])),
                ]
                for r in misclassified
            ]
            header = ["image", "path", "true", "predicted", "p(predicted)", "p(true)"]
            parts.append(_table(header, rows, numeric={4, 5}))
            parts.extend(
                _img(heatmaps[r.image_id], f"{r.image_id}: per-class patch probabilities")
                for r in misclassified
                if r.image_id in heatmaps
            )
        else:
            parts.append("<p>None.</p>")
    wrong = {r.image_id for r in misclassified}
    others = [(i, p) for i, p in heatmaps.items() if i not in wrong]
    if others:
        parts.append("<h2>Example heatmaps</h2>")
        parts.extend(_img(p, f"{i}: per-class patch probabilities") for i, p in others)

    if metrics is not None:
        parts.append("<details><summary>All predictions</summary>")
        parts.append(_predictions_html(results, classes) + "</details>")

    parts.append(f"<h2>Failed files ({len(failed)})</h2>")
    if failed:
        rows = [
            [_esc(r.image_id), _esc(r.path), f'<span class="error">{_esc(r.error or "")}</span>']
            for r in failed
        ]
        parts.append(_table(["image", "path", "error"], rows))
    else:
        parts.append("<p>None.</p>")

    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n{_SCRIPT}</body>\n</html>\n"
    )
