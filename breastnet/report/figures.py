"""The report's PNG figures: confusion matrix, ROC, t-SNE, patch grid and the closest
train/test pairs of the leakage audit (the per-image heatmaps: ``breastnet.report.heatmap``).

Figures are drawn on bare ``matplotlib.figure.Figure`` objects (no pyplot), so no GUI backend
or global figure state is involved and nothing stays open after a figure is saved. Numbers
shown come from ``breastnet.report.metrics``.
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from breastnet.artifacts import atomic_write
from breastnet.data.bach import read_rgb
from breastnet.logs import plural
from breastnet.report.metrics import MIN_ROC_IMAGES
from breastnet.report.result import ImageResult, label_name

DPI = 120
TSNE_MAX_PATCHES = 2000
TSNE_MIN_PATCHES = 10
# Normal green, Benign blue, InSitu orange, Invasive red; further classes take tab10's rest.
_TAB10 = colormaps["tab10"].colors
_PALETTE = [_TAB10[i] for i in (2, 0, 1, 3, 4, 5, 6, 7, 8, 9)]


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def plot_confusion(confusion: list[list[int]], classes: Sequence[str], path: Path) -> Path:
    """The confusion matrix as counts and as row-normalised percentages, side by side."""
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


def plot_roc(
    curves: dict[int, tuple[np.ndarray, np.ndarray]],
    metrics: dict,
    classes: Sequence[str],
    path: Path,
) -> Path:
    """Each class's one-vs-rest ROC curve (``metrics.roc_curves``) with its AUC."""
    fig = Figure(figsize=(5.6, 5.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    for c, (fpr, tpr) in curves.items():
        name = classes[c]
        auc = metrics["per_class"][name]["auc"]
        ax.plot(fpr, tpr, color=_PALETTE[c % 10], lw=2, label=f"{name} (AUC {auc:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    macro = metrics["macro_auc"]
    left = [n for c, n in enumerate(classes) if c not in curves]
    note = f"\nnot drawn (< {MIN_ROC_IMAGES} images of it or of the others): " if left else ""
    ax.set_title(
        f"ROC, one-vs-rest, {metrics['n_images']} images (macro AUC {macro:.2f})"
        + (note + ", ".join(left) if left else ""),
        fontsize=10,
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_two_class_roc(curve: tuple[np.ndarray, np.ndarray], two_class: dict, path: Path) -> Path:
    """The carcinoma vs non-carcinoma ROC curve (``metrics.two_class_roc``) with its AUC."""
    fig = Figure(figsize=(5.6, 5.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    fpr, tpr = curve
    ax.plot(fpr, tpr, color=_PALETTE[3], lw=2, label=f"carcinoma (AUC {two_class['auc']:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (non-carcinoma called carcinoma)")
    ax.set_ylabel("true positive rate (carcinoma found)")
    n, positives = two_class["n_images"], two_class["n_carcinoma"]
    ax.set_title(f"ROC, carcinoma vs non-carcinoma, {n} images ({positives} carcinoma)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


class TsnePlot(NamedTuple):
    """The t-SNE figure, how many patches it marks as misclassified, what its colours are
    (``tsne_colour_key``: the title and the page's caption say the same) and its legend's
    entries."""

    path: Path
    n_misclassified: int
    colour_key: str
    legend: list[str]


def tsne_colour_key(results: Sequence[ImageResult]) -> str:
    """What a t-SNE point's colour is: its image's true class, the predicted one when no
    image is labelled, or the true class where known and the predicted one elsewhere."""
    used = [r for r in results if r.features is not None]
    known = sum(r.label is not None for r in used)
    keys = {len(used): "the true class of its image", 0: "the predicted class of its image"}
    return keys.get(known, "the true class of its image, the predicted one where unknown")


def plot_tsne(
    results: list[ImageResult], classes: Sequence[str], min_tissue: float, seed: int, path: Path
) -> TsnePlot | None:
    """t-SNE of patch features coloured by image class, misclassified patches (labelled
    images whose patch CNN gives class probabilities, so not a frozen encoder) drawn as
    crosses: where they fall shows which classes the CNN confuses. None when there are too
    few patches."""
    features, colour, wrong, used = [], [], [], []
    for r in results:
        if r.features is None:
            continue
        used.append(r)
        features.append(r.tissue_patches(np.asarray(r.features, dtype=np.float32), min_tissue))
        colour.append(np.full(len(features[-1]), r.predicted if r.label is None else r.label))
        scored = r.label is not None and r.patch_probs is not None
        wrong.append(
            r.tissue_patches(np.argmax(r.patch_probs, axis=1), min_tissue) != r.label
            if scored
            else np.zeros(len(features[-1]), bool)
        )
    if not features:
        return None
    x, y, wrong = np.concatenate(features), np.concatenate(colour), np.concatenate(wrong)
    if len(x) < TSNE_MIN_PATCHES:
        return None
    if len(x) > TSNE_MAX_PATCHES:
        pick = np.sort(np.random.default_rng(seed).choice(len(x), TSNE_MAX_PATCHES, replace=False))
        x, y, wrong = x[pick], y[pick], wrong[pick]

    perplexity = min(30.0, (len(x) - 1) / 3)
    embedded = TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig = Figure(figsize=(6.4, 6), layout="constrained")
    ax = fig.subplots()
    for c, name in enumerate(classes):
        mine = y == c
        if mine.any():
            colour = _PALETTE[c % 10]
            label = f"{name} ({int(mine.sum())})"
            ax.scatter(*embedded[mine & ~wrong].T, s=10, alpha=0.7, color=colour, label=label)
            ax.scatter(*embedded[mine & wrong].T, s=14, alpha=0.9, color=colour, marker="x")
    n_wrong = int(wrong.sum())
    if n_wrong:  # one legend entry for the crosses of every class
        label = f"misclassified patch ({n_wrong})"
        ax.scatter([], [], s=14, color="grey", marker="x", label=label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    key = tsne_colour_key(used)
    ax.set_title(f"t-SNE of {len(x)} patch features\n(colour: {key})")
    legend = ax.legend(title="class (patches)", markerscale=2, loc="best")
    entries = [t.get_text() for t in legend.get_texts()]
    return TsnePlot(_save(fig, path), n_wrong, key, entries)


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


class TileCache:
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


def _thumbnail(path: str | Path, size: int) -> tuple[np.ndarray, int]:
    """An image file read from disk, shrunk by striding to about ``size`` px (for display),
    and the stride (file pixels per thumbnail pixel)."""
    image = read_rgb(path)[0]
    step = max(1, max(image.shape[:2]) // size)
    return image[::step, ::step], step


def _headline(r: ImageResult, classes: Sequence[str]) -> str:
    truth = f"true {label_name(r, classes)}, " if r.group is not None else ""
    return f"{r.image_id}: {truth}predicted {classes[r.predicted]} ({r.probs[r.predicted]:.2f})"


def plot_patch_grid(r: ImageResult, tiles: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """One image's patches at their grid positions, numbered in row-major order."""
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
    ax.set_title(f"{_headline(r, classes)}\n{plural(len(positions), 'patch')} in grid order")
    return _save(fig, path)


def plot_pairs(pairs: Sequence[dict], path: Path, size: int = 256) -> Path:
    """Each evaluated image beside its most similar training image (``breastnet.audit``),
    one pair per row, the cosine similarity in the title and near-duplicates in red."""
    fig = Figure(figsize=(6, 3 * len(pairs)))
    for row, pair in enumerate(pairs):
        for col, (key, side) in enumerate((("image", pair["side"]), ("train", "train"))):
            ax = fig.add_subplot(len(pairs), 2, 2 * row + col + 1)
            ax.imshow(_thumbnail(pair[f"{key}_path"], size)[0])
            ax.set_xticks([])
            ax.set_yticks([])
            name = pair["image_id"] if key == "image" else pair["train_id"]
            ax.set_title(f"{side}: {name}", fontsize=8)
        flagged = pair["near_duplicates"] > 0
        fig.axes[-1].set_title(
            f"train: {pair['train_id']}\ncosine {pair['similarity']:.3f}"
            + (" (near-duplicate)" if flagged else ""),
            fontsize=8,
            color="red" if flagged else "black",
        )
    fig.tight_layout()
    return _save(fig, path)
