"""H&E rendering: a class layout through a Beer-Lambert stain model with per-image stain
variation, so that stain normalisation and the patch CNN both have real work to do."""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from breastnet import CLASSES
from breastnet.synthetic.tissue import LAYOUTS, ellipse_mask, fine_noise

#: Reference optical-density vectors of haematoxylin and eosin (rows), Ruifrok & Johnston's.
STAIN_REF = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
STAIN_REF = STAIN_REF / np.linalg.norm(STAIN_REF, axis=1, keepdims=True)


class Rendered(NamedTuple):
    """One rendered image with the stain it was rendered with (ground truth for stain tests).

    Attributes:
        image: uint8 [H, W, 3] RGB.
        stain: float [2, 3] unit optical-density vectors, rows haematoxylin and eosin.
    """

    image: np.ndarray
    stain: np.ndarray


def sample_stain(rng: np.random.Generator) -> np.ndarray:
    """Per-image H and E optical-density vectors, jittered around ``STAIN_REF`` and unit length.

    Staining differs between labs, batches and scanners; jittering the vectors is what makes
    stain normalisation necessary on these images.
    """
    stain = np.abs(STAIN_REF + np.clip(rng.normal(0, 0.09, STAIN_REF.shape), -0.2, 0.2))
    return stain / np.linalg.norm(stain, axis=1, keepdims=True)


def render_with_stain(label: int, width: int, height: int, rng: np.random.Generator) -> Rendered:
    """Render one image of class ``label`` and return it with its true stain vectors."""
    if label not in range(len(CLASSES)):
        raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")
    h, w = height, width
    stain = sample_stain(rng)
    layout = LAYOUTS[label](h, w, rng)
    hm, em, nuclei = layout.tissue.h, layout.tissue.e, layout.nuclei
    # Epithelium: purple-pink cytoplasm over the whole gland, white lumen inside.
    if len(layout.glands):
        epi = ellipse_mask(h, w, layout.glands, 1.0)
        lumen = ellipse_mask(h, w, layout.glands, layout.lumen_rel)
        if len(layout.holes):
            lumen = np.maximum(lumen, ellipse_mask(h, w, layout.holes, 1.0))
        cyto_e, cyto_h = rng.uniform(0.22, 0.32), rng.uniform(0.1, 0.16)
        em = em * (1 - epi) + epi * (cyto_e * (1 - lumen) + 0.03 * lumen)
        hm = hm * (1 - epi) + epi * (cyto_h * (1 - lumen) + 0.01 * lumen)
    else:
        lumen = np.zeros((h, w), np.float32)
    if layout.cells:  # tumour-cell cytoplasm around each nucleus
        cyto = cv2.GaussianBlur((nuclei.draw(h, w, scale=1.9) > 0).astype(np.float32), (0, 0), 1)
        em = em * (1 - cyto) + cyto * 0.3
        hm = hm * (1 - cyto) + cyto * 0.13
    nuc = nuclei.draw(h, w) * (1 - lumen)
    chromatin = 1 + 0.22 * fine_noise(h, w, 0.8, rng)
    hm = np.maximum(hm, nuc * chromatin * rng.uniform(0.9, 1.2))
    # Optics: slight defocus, grain in concentration, per-image stain intensity.
    grain = fine_noise(h, w, 0.6, rng)
    hm = cv2.GaussianBlur(hm, (0, 0), 0.7) * (1 + 0.05 * grain)
    em = cv2.GaussianBlur(em, (0, 0), 0.7) * (1 + 0.05 * grain)
    gain = rng.uniform(0.85, 1.15)
    hm = np.clip(hm * gain * rng.uniform(0.75, 1.25), 0, None) + 0.01
    em = np.clip(em * gain * rng.uniform(0.75, 1.25), 0, None) + 0.02
    od = hm[..., None] * stain[0].astype(np.float32) + em[..., None] * stain[1].astype(np.float32)
    od += rng.normal(0, 0.006, od.shape).astype(np.float32)
    rgb = 255 * np.exp(-np.clip(od, 0, None))
    return Rendered(np.clip(np.round(rgb), 0, 255).astype(np.uint8), stain)


def render_image(label: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Render one H&E-like uint8 [height, width, 3] RGB image of class ``label``."""
    return render_with_stain(label, width, height, rng).image
