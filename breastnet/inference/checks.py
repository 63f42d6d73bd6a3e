"""What the inputs are to the model, said rather than assumed.

Files without a pixel size, images smaller than one tile, files that are the model's own
training or val images (by content hash), a model trained on generated images, and inputs
whose features lie farther from the training images than those lie from each other.
"""

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from breastnet.data.feature_store import FeatureStore
from breastnet.data.resolution import assumed_pixel_size, read_mpp
from breastnet.data.store import Tiling
from breastnet.distributed import rank
from breastnet.lineage import Lineage

log = logging.getLogger(__name__)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def seen_in_training(lineages: Sequence[Lineage], files: list[Path]) -> dict[Path, str]:
    """Input files that are training or val images of any of the models (the same content
    hash as in the data set's index): file -> ``train`` (any model trained on it) or ``val``.

    An ensemble counts an image any member saw: its average is no test of that image.
    """
    side: dict[str, str] = {}
    for lineage in lineages:
        split = json.loads(lineage.outer_split.read_text())
        for image_id in split["val"]:
            side.setdefault(image_id, "val")
        side |= dict.fromkeys(split["train"], "train")
    by_hash = {e.sha1: e.image_id for e in lineages[0].entries if e.sha1 and e.image_id in side}
    found = {}
    for f in files:
        if (image_id := by_hash.get(_sha1(f))) is not None:
            found[f] = side[image_id]
    return found


def _image_vectors(features: list[torch.Tensor | np.ndarray]) -> np.ndarray:
    """One unit vector per image: the mean of its patch features, L2-normalised."""
    means = np.stack([np.asarray(f, dtype=np.float64).mean(0) for f in features])
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def _nearest(a: np.ndarray, b: np.ndarray, same: bool = False) -> np.ndarray:
    """Each row of ``a``'s Euclidean distance to its nearest row of ``b`` (not itself)."""
    distances = np.sqrt(np.maximum(2 - 2 * a @ b.T, 0))  # unit vectors
    if same:
        np.fill_diagonal(distances, np.inf)
    return distances.min(1)


def feature_shift(cfg: DictConfig, lineage: Lineage, outputs: dict[str, dict]) -> dict | None:
    """How far the inputs lie from the training images in the model's feature space.

    An input is *far* when its nearest training image is farther than any training image's
    nearest other one: nothing in training was that isolated, so the model extrapolates.
    Returns the share of far inputs, the threshold and the median distances; None where
    the training features are not comparable (end to end: another CNN) or too few.
    """
    if cfg.image.end_to_end or not FeatureStore.is_complete(lineage.features):
        return None
    store = FeatureStore(lineage.features)
    # this model's training images by its split (a frozen encoder's store serves every split)
    trained = json.loads(lineage.split.read_text())["train"]
    train = [
        store.load(image_id)["features"]
        for image_id in trained
        if image_id in store.rows and store.rows[image_id].encoder == lineage.patch.name
    ]
    inputs = [o["features"] for o in outputs.values() if not o.get("error") and len(o["features"])]
    if len(train) < 2 or not inputs:
        return None
    reference, points = _image_vectors(train), _image_vectors(inputs)
    within = _nearest(reference, reference, same=True)
    distances = _nearest(points, reference)
    threshold = float(within.max())
    return {
        "far_share": float((distances > threshold).mean()),
        "n_far": int((distances > threshold).sum()),
        "n_images": len(inputs),
        "threshold": threshold,
        "median_distance": float(np.median(distances)),
        "median_training_distance": float(np.median(within)),
    }


def farthest_shift(shifts: Sequence[dict | None]) -> dict | None:
    """The feature shift of several models (an ensemble's members, each measured against its
    own training images): the one with the largest share of far inputs."""
    found = [s for s in shifts if s is not None]
    return max(found, key=lambda s: s["far_share"], default=None)


def pixel_sizes(cfg: DictConfig, files: list[Path], mpp: float) -> list[float | None]:
    """Each file's pixel size: ``predict.mpp``, else its TIFF tags; None where neither says
    (taken as the models' ``mpp``, which rank 0 warns about once)."""
    found = [cfg.predict.mpp or read_mpp(f) for f in files]
    untagged = sum(m is None for m in found)
    if untagged and rank() == 0:
        log.warning("%s", assumed_pixel_size(untagged, len(files), mpp, "predict.mpp"))
    return found


def warn_about_inputs(
    cfg: DictConfig, facts: dict, seen: dict[Path, str], shift: dict | None
) -> None:
    """The warnings on what the inputs are to this model (rank 0 says them once)."""
    if facts["generated"]:
        log.warning(
            "the model was trained on generated images (%s): its probabilities on real "
            "tissue mean nothing, however confident",
            facts["training_data"],
        )
    if seen:
        sides = Counter(seen.values())
        counts = ", ".join(f"{n} {side}" for side, n in sides.items())
        kept = "scored anyway (predict.include_training=true)"
        left = "left out of the scores; predict.include_training=true scores them"
        log.warning(
            "%d input file(s) are images the model was trained or selected on (%s; same "
            "content as in the index of %s, e.g. %s): %s",
            len(seen),
            counts,
            facts["training_data"],
            next(iter(seen)),
            kept if cfg.predict.include_training else left,
        )
    if shift and shift["n_far"]:
        log.warning(
            "%d of %d input image(s) (%.0f %%) lie farther from every training image, in the "
            "model's features, than any training image lies from its nearest other one: the "
            "model extrapolates on them",
            shift["n_far"],
            shift["n_images"],
            100 * shift["far_share"],
        )


def warn_about_small_images(
    tiling: Tiling, n_files: int, tissue: Sequence[np.ndarray | None]
) -> None:
    """One warning each on the images smaller than one tile at the models' pixel size:
    refused (``tissue`` None: their error is in predictions.csv) or, with ``predict.fit=pad``,
    padded with white (``tissue``: their tiles' tissue fractions), saying how much of those
    tiles is tissue, since the rest is background the model never learnt from."""
    size = f"smaller than one {tiling.tile_size} px tile at the models' {tiling.mpp:g} µm/px"
    if refused := sum(t is None for t in tissue):
        log.warning(
            "%d of %d input image(s) are %s: refused, as training refuses them (the error "
            "column of predictions.csv); predict.fit=pad tiles them, padded with white",
            refused,
            n_files,
            size,
        )
    if padded := [t for t in tissue if t is not None]:
        fractions = np.concatenate(padded)
        log.warning(
            "predict.fit=pad: %d of %d input image(s) are %s and were padded with white: their "
            "%d tile(s) are %.0f %% tissue on average (the least %.0f %%)",
            len(padded),
            n_files,
            size,
            len(fractions),
            100 * fractions.mean(),
            100 * fractions.min(),
        )
