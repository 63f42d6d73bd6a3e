"""The report's per-image heatmaps: the file as read, its patches at their positions, one
overlay per class of the per-tile values (the patch CNN's probabilities, else the image
model's own per-tile ones) and the attention, with scale bars.

Drawn like the other figures (``breastnet.report.figures``) on bare ``Figure`` objects.
"""

import math
from collections.abc import Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from breastnet.data.bach import DataError
from breastnet.data.store import Tiling
from breastnet.report.figures import _headline, _montage, _save, _thumbnail
from breastnet.report.result import ImageResult


def _placed(
    tiles: np.ndarray, origins: np.ndarray, tile_size: int, max_side: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Tiles drawn at their true pixel positions on white (overlapping ones over the
    earlier ones, as the file has that tissue once), at most ``max_side`` px.

    Args:
        tiles: [N, S, S, 3] patches, each covering ``tile_size`` px of the tiled image.
        origins: [N, 2] (y, x) top-left of each tile in the tiled image's pixels.

    Returns:
        The canvas, each tile's (y, x) on it and a tile's side on it, in canvas pixels.
    """
    scale = tiles.shape[1] / tile_size  # canvas pixels (before striding) per image pixel
    extent = (origins.max(axis=0) + tile_size) * scale
    step = max(1, math.ceil(float(extent.max()) / max_side))
    tiles = tiles[:, ::step, ::step]
    side = tiles.shape[1]
    corners = np.round(origins * scale / step).astype(int)
    height, width = (corners.max(axis=0) + side).tolist()
    canvas = np.full((height, width, 3), 255, np.uint8)
    for tile, (y, x) in zip(tiles, corners, strict=True):
        canvas[y : y + side, x : x + side] = tile
    return canvas, corners, side


def _painted(values: np.ndarray, corners: np.ndarray, side: int, shape: tuple) -> np.ndarray:
    """Each tile's value over its area of a ``_placed`` canvas (NaN where no tile is)."""
    painted = np.full(shape[:2], np.nan)
    for value, (y, x) in zip(values, corners, strict=True):
        painted[y : y + side, x : x + side] = value
    return painted


def _scale_bar(ax: Axes, um_per_px: float, width_px: int) -> None:
    """A scale bar of a round length (about a quarter of the panel) in the lower left."""
    target = width_px * um_per_px / 4
    length = max(
        (n for n in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000) if n <= target),
        default=1,
    )
    bar = length / um_per_px
    height = ax.get_ylim()[0]
    y = height * 0.94
    for color, lw in (("black", 4), ("white", 1.5)):  # a white bar outlined in black
        x = [width_px * 0.04, width_px * 0.04 + bar]
        ax.plot(x, [y, y], color=color, lw=lw, solid_capstyle="butt")
    ax.text(
        width_px * 0.04,
        y - height * 0.03,
        f"{length:g} µm",
        color="black",
        fontsize=8,
        va="bottom",
        bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1},
    )


def _grid_values(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    rows, cols = positions.max(axis=0) + 1
    grid = np.full((rows, cols), np.nan)
    grid[positions[:, 0], positions[:, 1]] = values
    return grid


def tile_values(r: ImageResult) -> tuple[np.ndarray, str] | None:
    """The per-tile class values a heatmap draws and what they are: the patch CNN's
    probabilities, else the image model's own per-tile ones (a frozen encoder's patch
    probabilities are all 0.25); None when there are neither."""
    if r.patch_probs is not None:
        return r.patch_probs, "patch probability"
    if r.tile_probs is not None:
        return r.tile_probs, "tile probability (image model's head)"
    return None


def file_title(r: ImageResult) -> str:
    """The title of a heatmap's picture of the file: its pixel size, which its scale bar
    uses, said to be assumed where no tag or setting gave it."""
    if not r.mpp:
        return "the file, as read"
    return f"the file, as read\n({r.mpp:g} µm/px{', assumed' if r.mpp_assumed else ''})"


def tag_colour(r: ImageResult, c: int) -> str:
    """The colour of class ``c``'s panel title when it is the true or the predicted class:
    green true (and predicted, when right), red predicted and wrong, blue predicted without
    a label to judge it by."""
    if c == r.label or (r.label is None and r.group is not None and not r.wrong):
        return "tab:green"
    return "tab:blue" if r.group is None else "tab:red"


def tag_legend(r: ImageResult) -> str:
    """What the colours of ``tag_colour`` mean for this image, as the figure says it."""
    if r.label is not None:
        return "\u25c6 green: the true class (and predicted, when right); red: predicted, wrong"
    if r.group is not None:
        return "\u25c6 green: predicted, in the true group; red: predicted, wrong group"
    return "\u25c6 blue: the predicted class (no label to judge it by)"


def plot_heatmap(
    r: ImageResult,
    tiles: np.ndarray,
    classes: Sequence[str],
    path: Path,
    tiling: Tiling | None = None,
) -> Path:
    """The file as read from disk (when it still reads, so a stain-normalisation artefact
    can be told from tissue), its patches as tiled, one overlay per class of ``tile_values``
    (when there are any) and attention (if any).

    With ``tiling``, tiles are drawn at their true positions (``r.origins``, else grid
    position times stride), so overlapping tiles overlap as in the file, and the pictures
    get scale bars (the file's says when its pixel size is assumed); without it, edge to
    edge in grid order."""
    positions = np.asarray(r.positions, dtype=int)
    if tiling is None:
        image, _ = _montage(tiles, positions, max_side=480)
        values = partial(_grid_values, positions=positions)
    else:
        origins = positions * tiling.stride if r.origins is None else np.asarray(r.origins)
        image, corners, side = _placed(tiles, origins, tiling.tile_size, max_side=480)
        values = partial(_painted, corners=corners, side=side, shape=image.shape)
    # Overlays go on a grey copy: the colour scale then reads without the stain's pinks.
    grey = image @ np.array([0.299, 0.587, 0.114])
    extent = (0, image.shape[1], image.shape[0], 0)
    bars: dict[int, float] = {}  # picture index -> µm per displayed pixel (scale bar)
    if tiling is None:
        pictures = [(image, "the patches, as tiled")]
    else:
        pictures = [(image, f"the patches at their positions\n(tiled at {tiling.mpp:g} µm/px)")]
        bars[0] = tiling.tile_um / side
    with suppress(DataError):  # moved or deleted since: the rest of the figure still holds
        thumbnail, step = _thumbnail(r.path, 480)
        pictures.insert(0, (thumbnail, file_title(r)))
        bars = {i + 1: um for i, um in bars.items()}
        if r.mpp:
            bars[0] = r.mpp * step
    per_class = tile_values(r)
    shown_classes = classes if per_class is not None else ()
    n_panels = len(pictures) + len(shown_classes) + (r.attention is not None)
    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    width = 3.0 * ncols + 1.0
    height = 3.0 * nrows * image.shape[0] / image.shape[1] + 0.4 * nrows + 0.9
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols)).ravel())
    for ax in axes:
        ax.set_axis_off()
    for i, (ax, (picture, title)) in enumerate(zip(axes, pictures, strict=False)):
        ax.imshow(picture)
        if i in bars:
            _scale_bar(ax, bars[i], picture.shape[1])
        ax.set_title(title if "\n" in title else f"{title}\n ")

    def overlay(ax: Axes, shown_values: np.ndarray, vmax: float, cmap: str):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        return ax.imshow(
            values(shown_values),
            extent=extent,
            cmap=cmap,
            vmin=0,
            vmax=vmax,
            alpha=0.6,
            interpolation="nearest",
        )

    if per_class is not None:
        class_values, what = per_class
        class_axes = axes[len(pictures) : len(pictures) + len(classes)]
        for c, (ax, name) in enumerate(zip(class_axes, classes, strict=True)):
            shown = overlay(ax, class_values[:, c], 1.0, "inferno")
            tags = [t for t, k in (("true", r.label), ("predicted", r.predicted)) if k == c]
            marker = f"\u25c6 {' & '.join(tags)}" if tags else " "
            ax.set_title(
                f"{name}: image p={r.probs[c]:.2f}\n{marker}",
                color=tag_colour(r, c) if tags else "black",
                fontweight="bold" if tags else "normal",
            )
        fig.colorbar(shown, ax=axes, location="bottom", shrink=0.5, aspect=40, label=what)
    if r.attention is not None:
        attention = np.asarray(r.attention, dtype=float)
        ax = axes[len(pictures) + len(shown_classes)]
        shown = overlay(ax, attention, float(attention.max()) or 1.0, "viridis")
        ax.set_title("attention weight\n ")
        fig.colorbar(shown, ax=ax, shrink=0.8)
    legend = f"\n{tag_legend(r)}" if per_class is not None else ""
    fig.suptitle(_headline(r, classes) + legend)
    return _save(fig, path)
