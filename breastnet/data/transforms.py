"""Patch augmentation: H&E concentration jitter with the fixed reference stains, rot90 + flips.

Patches are stain-normalised before they are cached, so they all share the reference stain
matrix: the jitter reuses it instead of re-estimating stains per patch as albumentations'
``HEStain(method="macenko")`` does (~80 patches/s against >500/s here; docs/architecture.md,
"Stain work").
"""

from typing import Any

import albumentations as A
import numpy as np

from breastnet.data.stain import rgb_to_od


class HEJitter(A.ImageOnlyTransform):
    """Scale the H and E concentrations by independent U(scale) factors (Yan et al. 2018).

    Only the stain part of the optical density changes, OD' = OD + C diag(s - 1) M, so what
    the two stains do not explain is kept; in intensities that is I' = I exp(-C diag(s - 1) M),
    which leaves the image exactly unchanged when s = 1.

    Args:
        stain_matrix: [2, 3] H and E optical-density vectors the patches were normalised to.
        scale: range of the uniform factor per stain.
        p: probability of applying the transform.
    """

    def __init__(
        self, stain_matrix: np.ndarray, scale: tuple[float, float] = (0.7, 1.3), p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        matrix = np.asarray(stain_matrix, dtype=np.float64)
        if matrix.shape != (2, 3) or not np.isfinite(matrix).all():
            raise ValueError(f"stain_matrix must be a finite 2x3 array, got {matrix.shape}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {scale}")
        self.stain_matrix = matrix
        self.scale = (float(scale[0]), float(scale[1]))
        self._pinv = np.linalg.pinv(matrix).astype(np.float32)  # 3 x 2

    def get_params(self) -> dict[str, Any]:
        """Draw the two factors from albumentations' RNG, so ``Compose(seed=...)`` repeats."""
        return {"factors": self.random_generator.uniform(*self.scale, size=2)}

    def apply(self, img: np.ndarray, factors: np.ndarray, **params: Any) -> np.ndarray:
        """Jitter one uint8 HxWx3 patch; returns a new uint8 patch."""
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"HEJitter expects uint8 HxWx3, got {img.dtype} {img.shape}")
        concentrations = rgb_to_od(img).reshape(-1, 3) @ self._pinv  # N x 2
        np.maximum(concentrations, 0, out=concentrations)
        delta = ((factors - 1)[:, None] * self.stain_matrix).astype(np.float32)  # 2 x 3
        out = concentrations @ delta  # N x 3, change of optical density
        np.negative(out, out=out)
        np.exp(out, out=out)
        out *= img.reshape(-1, 3)
        out += 0.5  # round
        np.minimum(out, 255, out=out)
        return out.astype(np.uint8).reshape(img.shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments that ``repr`` and serialisation show."""
        return ("stain_matrix", "scale")


def build_transforms(
    is_training: bool,
    stain_matrix: np.ndarray | None,
    he_jitter: tuple[float, float] | None = (0.7, 1.3),
    rot90: bool = True,
    flip: bool = True,
    seed: int | None = None,
) -> A.Compose:
    """Patch transforms; output stays uint8 HWC (models normalise on the device).

    Training: H&E jitter (when a stain matrix and a range are given), then a random 90-degree
    rotation and a horizontal flip, which together give the 8 rotations/flips equally often.
    Evaluation: identity.
    """
    transforms: list[A.BasicTransform] = []
    if is_training:
        if stain_matrix is not None and he_jitter is not None:
            transforms.append(HEJitter(stain_matrix, scale=he_jitter))
        if rot90:
            transforms.append(A.RandomRotate90(p=1.0))
        if flip:
            transforms.append(A.HorizontalFlip(p=0.5))
    return A.Compose(transforms, seed=seed)
