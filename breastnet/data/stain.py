"""Macenko stain normalisation: staintools' stain matrix, a vectorised concentration solve.

staintools is the reference (docs/architecture.md, "Stain work"): its extractor is reused as
is, but its ``StainNormalizer.transform`` solves a spams lasso per pixel, wraps on the uint8 cast,
mutates its input and raises on blank images. Here the concentrations come from one matmul
with a precomputed pseudo-inverse, and the lasso stays selectable as the oracle.
"""

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import spams
from staintools.miscellaneous.exceptions import TissueMaskException
from staintools.stain_extraction.macenko_stain_extractor import MacenkoStainExtractor

SOLVERS = ("lstsq", "lasso")
# Optical density of every uint8 value, as staintools' convert_RGB_to_OD computes it.
OD_LUT = np.maximum(-np.log(np.maximum(np.arange(256), 1) / 255.0), 1e-6).astype(np.float32)
# Stain vectors closer than ~2.5 degrees cannot be told apart: the solve would be ill-posed.
_MAX_STAIN_COSINE = 0.999
# Floor for the source's 99th-percentile concentrations, so an absent stain never divides by 0.
_MIN_MAX_CONCENTRATION = 1e-6
# Stain matrix and percentiles are estimated on a pixel grid of about this many pixels: the
# extractor's sorts dominate the cost (1536x1536: 240 ms in full, 18 ms on every 3rd pixel).
_ESTIMATE_PIXELS = 512 * 512


def _check_rgb_uint8(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")


def rgb_to_od(image: np.ndarray) -> np.ndarray:
    """Optical density of a uint8 image by table lookup: float32, same shape, input untouched.

    cv2.LUT is ~4x faster than ``OD_LUT[image]`` and gives the same values.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"optical density needs a uint8 image, got {image.dtype}")
    return cv2.LUT(image, OD_LUT)


def _grid_sample(image: np.ndarray) -> np.ndarray:
    """A strided view of about ``_ESTIMATE_PIXELS`` pixels, for estimates that need no more."""
    step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / _ESTIMATE_PIXELS)))
    return image[::step, ::step]


def estimate_stain_matrix(
    image: np.ndarray, luminosity_threshold: float = 0.8, angular_percentile: float = 99
) -> np.ndarray | None:
    """Macenko H&E stain matrix by staintools' extractor, or None where it cannot be trusted.

    Returns:
        float [2, 3], rows H then E as unit optical-density vectors; None when the image has
        too little tissue or the two stains come out non-finite or indistinguishable.
    """
    _check_rgb_uint8(image)
    try:
        with warnings.catch_warnings():
            # A handful of tissue pixels makes np.cov warn before eigh fails; we return None.
            warnings.simplefilter("ignore", RuntimeWarning)
            # staintools' OD conversion writes into its input: give it a copy.
            matrix = MacenkoStainExtractor.get_stain_matrix(
                image.copy(),
                luminosity_threshold=luminosity_threshold,
                angular_percentile=angular_percentile,
            )
    except (TissueMaskException, np.linalg.LinAlgError):
        return None
    if not np.isfinite(matrix).all() or abs(matrix[0] @ matrix[1]) > _MAX_STAIN_COSINE:
        return None
    return matrix


def stain_concentrations(
    od: np.ndarray, stain_matrix: np.ndarray, solver: str = "lstsq"
) -> np.ndarray:
    """Per-pixel stain concentrations C with OD ~= C @ stain_matrix, non-negative.

    Args:
        od: [N, 3] optical densities.
        stain_matrix: [2, 3] stain vectors.
        solver: "lstsq" (one matmul with the pseudo-inverse, clipped at 0, fast) or "lasso"
            (staintools' spams call, slow, kept as the oracle).

    Returns:
        [N, 2] concentrations (float32 for "lstsq" on float32 input, float64 for "lasso").
    """
    if solver == "lstsq":
        pinv = np.linalg.pinv(np.asarray(stain_matrix, dtype=np.float64)).astype(od.dtype)
        concentrations = od @ pinv
        return np.maximum(concentrations, 0, out=concentrations)
    if solver == "lasso":
        # numThreads=1: DataLoader workers forked after the parent ran a multithreaded spams
        # call hang in libgomp (its thread pool does not survive fork); one thread never uses it.
        return (
            spams.lasso(
                X=np.asfortranarray(od.T, dtype=np.float64),
                D=np.asfortranarray(np.asarray(stain_matrix).T, dtype=np.float64),
                mode=2,
                lambda1=0.01,
                pos=True,
                numThreads=1,
            )
            .toarray()
            .T
        )
    raise ValueError(f"unknown solver {solver!r}, expected one of {SOLVERS}")


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value; hash by identity
class StainReference:
    """What normalisation maps every image onto; saved as JSON next to the patch cache.

    Attributes:
        stain_matrix: [2, 3] reference H and E optical-density vectors.
        max_concentrations: [2] 99th-percentile H and E concentrations of the reference image.
    """

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray

    def __post_init__(self) -> None:
        matrix = np.array(self.stain_matrix, dtype=np.float64)
        max_c = np.array(self.max_concentrations, dtype=np.float64)
        if matrix.shape != (2, 3) or max_c.shape != (2,):
            raise ValueError(f"expected shapes (2, 3) and (2,), got {matrix.shape}, {max_c.shape}")
        if not (np.isfinite(matrix).all() and np.isfinite(max_c).all()):
            raise ValueError("stain reference must be finite")
        matrix.flags.writeable = max_c.flags.writeable = False
        object.__setattr__(self, "stain_matrix", matrix)
        object.__setattr__(self, "max_concentrations", max_c)

    def to_dict(self) -> dict[str, list]:
        """JSON-friendly form (nested lists of floats)."""
        return {
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_concentrations.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StainReference":
        """Inverse of :meth:`to_dict`."""
        return cls(data["stain_matrix"], data["max_concentrations"])


def _max_concentrations(concentrations: np.ndarray) -> np.ndarray:
    """99th-percentile concentration per stain of an [H, W, 2] map, on the pixel grid sample."""
    return np.percentile(_grid_sample(concentrations).reshape(-1, 2), 99, axis=0)


class MacenkoNormalizer:
    """Map an image's H&E stains onto a reference image's (Macenko et al. 2009).

    Same algorithm as staintools' ``StainNormalizer("macenko")``, but float32 with a lookup
    table and (by default) a least-squares solve, rounded and clipped to uint8, input never
    mutated, and images without tissue pass through instead of raising. The stain matrix and
    percentiles come from a grid of about 512x512 pixels, which changes them by ~1e-2 on a
    1536x1536 image and makes the estimate >10x cheaper.
    """

    def __init__(
        self,
        solver: str = "lstsq",
        luminosity_threshold: float = 0.8,
        angular_percentile: float = 99,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}, expected one of {SOLVERS}")
        self.solver = solver
        self.luminosity_threshold = luminosity_threshold
        self.angular_percentile = angular_percentile
        self._reference: StainReference | None = None

    def _stain_matrix(self, image: np.ndarray) -> np.ndarray | None:
        return estimate_stain_matrix(
            _grid_sample(image), self.luminosity_threshold, self.angular_percentile
        )

    def _concentrations(self, image: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
        od = rgb_to_od(image).reshape(-1, 3)
        return stain_concentrations(od, stain_matrix, self.solver).reshape(*image.shape[:2], 2)

    def fit(self, target: np.ndarray) -> "MacenkoNormalizer":
        """Take the reference stains and their 99th-percentile concentrations from ``target``."""
        _check_rgb_uint8(target)
        matrix = self._stain_matrix(target)
        if matrix is None:
            raise ValueError(
                "cannot fit stain normalisation: the target image has too little tissue "
                f"(no pixel darker than luminosity {self.luminosity_threshold}) or "
                "indistinguishable stains; pick another reference image"
            )
        concentrations = self._concentrations(_grid_sample(target), matrix)
        self._reference = StainReference(matrix, _max_concentrations(concentrations))
        return self

    @property
    def reference(self) -> StainReference:
        """The fitted reference; raises if neither ``fit`` nor ``from_reference`` set one."""
        if self._reference is None:
            raise RuntimeError("MacenkoNormalizer is not fitted: call fit() or from_reference()")
        return self._reference

    @classmethod
    def from_reference(cls, reference: StainReference, **kwargs: Any) -> "MacenkoNormalizer":
        """A normaliser for a saved reference, so workers need not refit."""
        normalizer = cls(**kwargs)
        normalizer._reference = reference
        return normalizer

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Normalise a uint8 HxWx3 image to the reference stains; returns a new uint8 image.

        Source concentrations are rescaled so their 99th percentiles match the reference's. An
        image with too little tissue is decomposed with the reference stains and not rescaled
        (there is nothing to match), so a blank image comes back about unchanged.
        """
        _check_rgb_uint8(image)
        reference = self.reference
        source = self._stain_matrix(image)
        if source is None:
            concentrations = self._concentrations(image, reference.stain_matrix)
            scale = np.ones(2)
        else:
            concentrations = self._concentrations(image, source)
            max_c = np.maximum(_max_concentrations(concentrations), _MIN_MAX_CONCENTRATION)
            scale = reference.max_concentrations / max_c
        # Fold the rescale into the reference matrix: one [N, 2] @ [2, 3] product.
        recompose = (scale[:, None] * reference.stain_matrix).astype(concentrations.dtype)
        out = concentrations.reshape(-1, 2) @ recompose  # N x 3 optical density
        np.negative(out, out=out)
        np.exp(out, out=out)
        out *= 255
        out += 0.5  # round, where staintools truncates
        np.minimum(out, 255, out=out)  # clip, where staintools wraps
        return out.astype(np.uint8).reshape(image.shape)


def pick_reference(
    images: Iterable[np.ndarray], luminosity_threshold: float = 0.8, angular_percentile: float = 99
) -> int:
    """Index of the most typical image, to fit normalisation on: the stain-matrix medoid.

    A single odd reference would tint every image; the image whose stain matrix is closest to
    the element-wise median of all matrices is the least surprising one. Pass downsampled
    images: the stain matrix barely depends on resolution.

    Raises:
        ValueError: no image has enough tissue to estimate its stains.
    """
    matrices = {}
    for index, image in enumerate(images):
        matrix = estimate_stain_matrix(image, luminosity_threshold, angular_percentile)
        if matrix is not None:
            matrices[index] = matrix
    if not matrices:
        raise ValueError("no image has enough tissue to estimate a stain matrix")
    median = np.median(np.stack(list(matrices.values())), axis=0)
    return min(matrices, key=lambda index: np.linalg.norm(matrices[index] - median))
