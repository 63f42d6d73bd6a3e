"""Pixel size: what a file says it is, and rescaling an image to the tiling's.

A tile of ``tile_size`` px covers ``tile_size * mpp`` microns only when the image is at the
tiling's ``mpp``; an image scanned at another magnification is rescaled first, so its tiles
hold the same amount of tissue as the training tiles did.
"""

import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

BACH_MPP = 0.42  # µm per pixel of the BACH microscopy images (the challenge's description)
TOLERANCE = 0.02  # pixel sizes within 2 % count as equal: rescaling would only blur
PLAUSIBLE_MPP = (0.05, 20.0)  # microscopy; 72/96/300 dpi from ordinary software is far outside
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+)")  # "...|AppMag = 20|MPP = 0.499|"
_DESCRIPTION, _X_RESOLUTION, _RESOLUTION_UNIT = 270, 282, 296


def read_mpp(path: str | Path) -> float | None:
    """Microns per pixel from a TIFF's tags (header only, no decode); None when unknown.

    Aperio's ``MPP = ...`` in the ImageDescription comes first, then XResolution with its
    ResolutionUnit (inch by default, as the TIFF standard says). A value outside
    ``PLAUSIBLE_MPP`` is a screen or print resolution, not the microscope's, and is ignored;
    so are files that are not TIFFs or cannot be opened (reading the image reports those).
    """
    try:
        with Image.open(path) as im:
            if im.format != "TIFF":
                return None
            tags = im.tag_v2
            candidates = []
            if match := _APERIO_MPP.search(str(tags.get(_DESCRIPTION, ""))):
                candidates.append(float(match.group(1)))
            xres, unit = tags.get(_X_RESOLUTION), tags.get(_RESOLUTION_UNIT, 2)
            if xres and float(xres) > 0 and unit in _UM_PER_UNIT:
                candidates.append(_UM_PER_UNIT[unit] / float(xres))
    except OSError:
        return None
    low, high = PLAUSIBLE_MPP
    return next((round(m, 6) for m in candidates if low <= m <= high), None)


def assumed_pixel_size(untagged: int, total: int, mpp: float, setting: str) -> str:
    """The warning for files without a pixel size, taken to be at ``data.mpp`` (said once,
    with their count): a folder of mixed magnifications or another scanner's files would be
    tiled at the wrong scale without a word otherwise. ``setting`` is what sets theirs."""
    return (
        f"{untagged} of {total} file(s) carry no pixel size (no TIFF resolution tags or Aperio "
        f"MPP): taken as data.mpp={mpp:g} µm/px. If they were scanned at another "
        f"magnification, set {setting}=<µm/px> (README: Pixel size; a folder of mixed "
        "magnifications needs one run per magnification)"
    )


def scale_factor(mpp: float | None, target: float) -> float:
    """How much an image at ``mpp`` µm/px is enlarged (>1) or shrunk (<1) to be at ``target``:
    1 when its pixel size is unknown (None or 0) or within ``TOLERANCE`` of the target."""
    if not mpp or abs(mpp / target - 1) <= TOLERANCE:
        return 1.0
    return mpp / target


def scaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """(width, height) of an image rescaled by ``factor`` (what ``rescale`` makes)."""
    return max(1, round(width * factor)), max(1, round(height * factor))


def rescale(image: np.ndarray, mpp: float | None, target: float) -> np.ndarray:
    """An RGB uint8 image at ``mpp`` µm/px resampled to ``target`` µm/px (unchanged within
    ``TOLERANCE``). Area averaging when shrinking (no aliasing), bicubic when enlarging; cv2
    saturates uint8 results, so bicubic overshoot is clipped to 0..255."""
    factor = scale_factor(mpp, target)
    if factor == 1.0:
        return image
    height, width = image.shape[:2]
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, scaled_size(width, height, factor), interpolation=interpolation)
