"""The report's view of inference outputs, and what a predict run says about its scores."""

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from breastnet import CLASSES
from breastnet.data.resolution import scale_factor, scaled_size
from breastnet.data.store import Tiling
from breastnet.data.tiling import tile_origins
from breastnet.labels import GROUPS
from breastnet.report import ImageResult


def image_result(
    output: dict[str, Any], path: str, label: int | None, positions=None, tissue=None
) -> ImageResult:
    """The report's view of one image's ``Embedder`` output (positions and tissue from the
    output unless given, as prepare's records give them)."""
    if output.get("error"):
        return ImageResult(
            output["image_id"], path, label, None, None, None, None, error=output["error"]
        )
    attention = output.get("attention")
    return ImageResult(
        image_id=output["image_id"],
        path=path,
        label=label,
        probs=output["image_probs"].numpy(),
        patch_probs=output["probs"].numpy(),
        positions=np.asarray(output["pos"] if positions is None else positions),
        tissue=np.asarray(output["tissue"] if tissue is None else tissue),
        features=output["features"].numpy(),
        attention=None if attention is None else attention.numpy(),
    )


def outcome_lines(
    results: list[ImageResult], root: Path, metrics: dict[str, float], left_out: int
) -> list[str]:
    """What a run says about the scores: one file's class, else each view's accuracy, and
    plainly when the view scores only part of the folder (unlabelled or training images
    left out) or only some of its classes: then it is not an accuracy of the folder."""
    lines = []
    ok = [r for r in results if not r.failed]
    if len(results) == 1 and ok:
        r = ok[0]
        probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(CLASSES, r.probs, strict=True))
        lines.append(
            f"{r.path}: {CLASSES[r.predicted]} ({probs}; carcinoma {r.carcinoma_prob:.3f}) "
            f"from {r.n_patches} patches"
        )
    views = (
        ("4-class", "image_accuracy", [r.label for r in ok], CLASSES),
        ("2-class", "carcinoma_accuracy", [r.group for r in ok], GROUPS),
    )
    for view, accuracy, labels, names in views:
        if f"predict/{accuracy}" not in metrics:
            continue
        scored = [x for x in labels if x is not None]
        present = sorted(set(scored))
        score = f"{metrics[f'predict/{accuracy}']:.3f}"
        unlabelled = len(ok) - left_out - len(scored)
        notes = []
        if len(present) < len(names):
            notes.append(f"only {', '.join(names[i] for i in present)} among them")
        if unlabelled > 0:
            notes.append(f"{unlabelled} image(s) without a label for this view")
        if left_out:
            notes.append(f"{left_out} training image(s) left out")
        if unlabelled > 0 or left_out:
            lines.append(
                f"{view} image accuracy on {len(scored)} of the {len(ok)} images of {root}: "
                f"{score} ({'; '.join(notes)}): not an accuracy of the folder"
            )
        else:
            note = f"; {notes[0]}" if notes else ""
            lines.append(f"{view} image accuracy on {root}: {score} ({len(scored)} images{note})")
    return lines


def file_result(
    output: dict[str, Any], path: Path, mpp: float, tiling: Tiling, label: str | None
) -> ImageResult:
    """One predicted file's result: read at pixel size ``mpp``, its tiles' origins in the
    image as tiled, and ``label`` (a class or a 2-class group; None: not scored)."""
    result = image_result(output, str(path), None)
    result.mpp = mpp
    if not result.failed:
        with Image.open(path) as im:  # header only: the tiled image's size
            width, height = im.size
        tiled_w, tiled_h = scaled_size(width, height, scale_factor(mpp, tiling.mpp))
        result.origins = tile_origins(
            tiled_h, tiled_w, tiling.tile_size, tiling.stride, tiling.fit
        )
    if label in CLASSES:
        result.label = CLASSES.index(label)
    elif label in GROUPS:
        result.label_group = GROUPS.index(label)
    return result
