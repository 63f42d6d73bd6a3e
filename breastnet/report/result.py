"""One image's outcome: the input every part of a report reads."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
    def failed(self) -> bool:
        """Whether the image has no prediction."""
        return self.error is not None or self.probs is None

    @property
    def predicted(self) -> int | None:
        """Index of the most probable class, None when the image has no prediction."""
        return None if self.failed else int(np.argmax(self.probs))

    def tissue_patches(self, values: np.ndarray, min_tissue: float) -> np.ndarray:
        """The rows of ``values`` ([N, ...], one per patch) whose patch has at least
        ``min_tissue`` tissue, all of them when tissue is unknown: background patches say
        nothing about the class, so patch accuracy and the t-SNE leave them out."""
        return values if self.tissue is None else values[self.tissue >= min_tissue]


def class_name(index: int | None, classes: Sequence[str]) -> str:
    """The name of a class index, "" for None (no label, or no prediction)."""
    return "" if index is None else classes[index]
