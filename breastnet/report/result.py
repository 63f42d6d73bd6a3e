"""One image's outcome: the input every part of a report reads."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from breastnet.labels import CARCINOMA_INDICES, GROUPS, group_index


@dataclass
class ImageResult:
    """What the pipeline produced for one image (arrays are numpy)."""

    image_id: str
    path: str
    label: int | None  # true class index, None when unknown (or only its group is known)
    probs: np.ndarray | None  # [C] image-level class probabilities; None on error
    # [N, C] the patch CNN's per-patch probabilities (grid row-major order); None where it
    # has none worth reading (a frozen encoder's zero head gives every class 0.25)
    patch_probs: np.ndarray | None
    positions: np.ndarray | None  # [N, 2] (row, col) grid position of each patch
    tissue: np.ndarray | None  # [N] tissue fraction of each patch (0..1)
    features: np.ndarray | None = None  # [N, D] pooled patch features (for t-SNE)
    attention: np.ndarray | None = None  # [N] aggregator attention weights, when it has them
    error: str | None = None  # why this image has no prediction (unreadable, too small...)
    label_group: int | None = None  # the 2-class label (GROUPS index) when only that is known
    mpp: float | None = None  # microns per pixel the file was read at, when known
    # [N, 2] (y, x) top-left pixel of each tile in the image as tiled (at the tiling's pixel
    # size); None: the grid positions times the stride (trim and pad do not overlap more)
    origins: np.ndarray | None = None
    # [N, C] the image model's own per-tile class probabilities (its linear head on each
    # tile's features), when it has them and the patch CNN has no probabilities: heatmaps
    tile_probs: np.ndarray | None = None
    mpp_assumed: bool = False  # whether ``mpp`` is a default (no tag or setting gave it)

    @property
    def failed(self) -> bool:
        """Whether the image has no prediction."""
        return self.error is not None or self.probs is None

    @property
    def predicted(self) -> int | None:
        """Index of the most probable class, None when the image has no prediction."""
        return None if self.failed else int(np.argmax(self.probs))

    @property
    def group(self) -> int | None:
        """The 2-class label: 1 carcinoma (InSitu, Invasive), 0 non-carcinoma, None unknown."""
        if self.label is None:
            return self.label_group
        return group_index(self.label)

    @property
    def wrong(self) -> bool:
        """Predicted, labelled and wrong: the class when it is known, else the group."""
        if self.failed or self.group is None:
            return False
        if self.label is not None:
            return self.predicted != self.label
        return group_index(self.predicted) != self.group

    @property
    def carcinoma_prob(self) -> float | None:
        """The probability of carcinoma: the sum of its classes' probabilities."""
        if self.failed:
            return None
        return float(self.probs[CARCINOMA_INDICES].sum())

    @property
    def n_patches(self) -> int | None:
        """How many patches the image gave (None when it failed before tiling)."""
        given = (self.positions, self.patch_probs, self.features)
        return next((len(a) for a in given if a is not None), None)

    def tissue_patches(self, values: np.ndarray, min_tissue: float) -> np.ndarray:
        """The rows of ``values`` ([N, ...], one per patch) whose patch has at least
        ``min_tissue`` tissue, all of them when tissue is unknown: background patches say
        nothing about the class, so patch accuracy and the t-SNE leave them out."""
        return values if self.tissue is None else values[self.tissue >= min_tissue]


def class_name(index: int | None, classes: Sequence[str]) -> str:
    """The name of a class index, "" for None (no label, or no prediction)."""
    return "" if index is None else classes[index]


def label_name(result: ImageResult, classes: Sequence[str]) -> str:
    """The true label as a name: the class, else the 2-class group, else ""."""
    if result.label is None and result.label_group is not None:
        return GROUPS[result.label_group]
    return class_name(result.label, classes)
