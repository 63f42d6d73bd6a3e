"""New image files for predict: found, labelled, and made ready for the models.

A new image goes through exactly the steps a training image went through (prepare's pixel
size, Macenko reference and tiling), in DataLoader workers. An image that holds no whole tile
at the models' pixel size is refused, as training refuses it, unless ``predict.fit=pad``
pads it with white (``breastnet.inference.checks.warn_about_small_images`` says how much).
"""

import copy
import logging
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from breastnet.data.bach import DataError, find_images, find_label_csv, read_label_csv, read_rgb
from breastnet.data.datasets import to_tensor
from breastnet.data.resolution import scale_factor, scaled_size
from breastnet.data.stain import MacenkoNormalizer
from breastnet.data.store import StainSettings, Tiling, normalise_and_tile, tissue_fraction
from breastnet.distributed import rank
from breastnet.labels import LabelMap, csv_label, label_names, unlabelled_folder

log = logging.getLogger(__name__)


def find_inputs(source: Path) -> tuple[Path, list[Path]]:
    """The folder labels are relative to, and the image files: one file or a whole tree."""
    if source.is_file():
        return source.parent, [source]
    if not source.is_dir():
        raise FileNotFoundError(f"predict.input={source} does not exist")
    files = find_images(source)
    if not files:
        raise DataError(f"{source}: no images found")
    return source, files


def labels_for(
    root: Path, files: list[Path], labels_csv: str | None, label_map: LabelMap
) -> dict[Path, str | None]:
    """Each file's class or 2-class group from its folder or the label CSV, None when it has
    none. A map key that matches no folder or CSV label is an error (``LabelMap.check_keys``);
    label names that nothing maps are logged by name with their count of files (those files
    are predicted, unlabelled)."""
    csv_path = find_label_csv(root, labels_csv)
    from_csv = read_label_csv(csv_path) if csv_path else {}
    label_map.check_keys(label_names(files, root, from_csv))
    labels: dict[Path, str | None] = {}
    unknown: Counter = Counter()
    for f in files:
        raw = csv_label(from_csv, f, root)
        labels[f] = label_map.folder(f, root) or (label_map(raw) if raw is not None else None)
        if labels[f] is None and (name := raw if raw is not None else unlabelled_folder(f, root)):
            unknown[name] += 1
    if unknown and rank() == 0:  # every rank labels the files; one says so
        log.warning(
            "%s; these files are predicted without a label", label_map.unknown_report(unknown)
        )
    return labels


def _scaled(height: int, width: int, mpp: float | None, tiling: Tiling) -> tuple[int, int]:
    """(height, width) of an image at ``mpp`` µm/px once rescaled to the tiling's."""
    width, height = scaled_size(width, height, scale_factor(mpp, tiling.mpp))
    return height, width


def tiled_size(path: Path, mpp: float | None, tiling: Tiling) -> tuple[int, int]:
    """(height, width) of an image file at ``mpp`` µm/px (None: the tiling's) as it is tiled,
    from its header alone."""
    with Image.open(path) as im:
        width, height = im.size
    return _scaled(height, width, mpp, tiling)


def holds_a_tile(height: int, width: int, tiling: Tiling) -> bool:
    """Whether an image of this size (at the tiling's pixel size) holds one whole tile."""
    return min(height, width) >= tiling.tile_size


class ImageFiles(Dataset):
    """Image files rescaled, stain-normalised and tiled (in DataLoader workers), for predict.

    ``mpps`` is each file's pixel size (None: already at ``tiling.mpp``). A file that cannot
    be used yields no patches and its ``error``; the others go on.
    """

    def __init__(
        self,
        files: list[Path],
        root: Path,
        tiling: Tiling,
        stain: StainSettings,
        mpps: Sequence[float | None] | None = None,
    ) -> None:
        self.files, self.tiling, self.stain = files, tiling, stain
        self.mpps = list(mpps) if mpps is not None else [None] * len(files)
        self.image_ids = [f.relative_to(root).with_suffix("").as_posix() for f in files]

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def normalizer(self) -> MacenkoNormalizer | None:
        """Prepare's Macenko reference as a normaliser, made once per process."""
        return self.stain.normalizer()

    def restained(self, stain: StainSettings) -> "ImageFiles":
        """The same files normalised to another stain reference (another model's)."""
        other = copy.copy(self)
        other.stain = stain
        other.__dict__.pop("normalizer", None)  # the cached one of this reference
        return other

    def pixel_size(self, i: int) -> float:
        """The pixel size file ``i`` is taken to have (``tiling.mpp`` when unknown)."""
        return float(self.mpps[i] or self.tiling.mpp)

    def smaller_than_a_tile(self, i: int) -> bool:
        """Whether file ``i`` holds no whole tile at the tiling's pixel size (from its header;
        False for a file whose header does not read: its error is another)."""
        try:
            return not holds_a_tile(
                *tiled_size(self.files[i], self.mpps[i], self.tiling), self.tiling
            )
        except OSError:
            return False

    def tile(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised patches [N, S, S, 3] uint8 and grid positions [N, 2] of file ``i``.

        Raises:
            DataError: the image holds no whole tile and ``fit`` is not ``pad``: refused, as
                training refuses it, rather than tiled mostly white.
        """
        image = read_rgb(self.files[i])[0]
        if self.tiling.fit != "pad":
            self._refuse_small(i, *image.shape[:2])
        return normalise_and_tile(image, self.tiling, self.normalizer, self.mpps[i])

    def _refuse_small(self, i: int, height: int, width: int) -> None:
        tiling, mpp = self.tiling, self.mpps[i]
        tiled_h, tiled_w = _scaled(height, width, mpp, tiling)
        if holds_a_tile(tiled_h, tiled_w, tiling):
            return
        size = f"{width}x{height} px"
        if (tiled_h, tiled_w) != (height, width):
            models = f"{tiling.mpp:g} µm/px"
            size += f" at {mpp:g} µm/px is {tiled_w}x{tiled_h} px at the models' {models}"
        side = tiling.tile_size
        raise DataError(
            f"{self.files[i]}: {size}, smaller than one {side}x{side} px tile: refused, as "
            "training refuses it (predict.fit=pad tiles it, padded with white)"
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "image_id": self.image_ids[i],
            "y": -1,
            "mpp": self.pixel_size(i),
        }
        try:
            patches, positions = self.tile(i)
        except (DataError, ValueError) as e:
            path = self.files[i]
            sample["error"] = str(e) if str(path) in str(e) else f"{path}: {e}"
            size = self.tiling.patch_size
            patches, positions = np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 2), int)
        sample["x"] = to_tensor(patches)
        sample["pos"] = torch.as_tensor(positions)
        sample["tissue"] = torch.as_tensor(tissue_fraction(patches) if len(patches) else [])
        return sample
