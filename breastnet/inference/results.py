"""The report's view of inference outputs, and what a predict run says about its scores."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from breastnet import CLASSES
from breastnet.data.store import Tiling
from breastnet.data.tiling import tile_origins
from breastnet.inference.files import tiled_size
from breastnet.labels import GROUPS
from breastnet.logs import plural
from breastnet.models.aggregators import Attention, LinearProbe, MeanFeatures
from breastnet.report import ImageResult


def tile_probs(aggregators: Sequence[nn.Module], features: Sequence[Tensor]) -> np.ndarray | None:
    """The image model's own class probabilities of each tile: its linear head on the tile's
    features, where the image's logits are a mean of those per-tile logits (``MeanFeatures``:
    plain, ``Attention``: attention-weighted), so the tiles show what the image's class is
    made of. An ensemble's (one aggregator and features [N, D] per member) is the members'
    mean. None for the other aggregators (a BiLSTM has no per-tile logits).
    """
    if not all(isinstance(a, MeanFeatures | Attention | LinearProbe) for a in aggregators):
        return None
    with torch.no_grad():
        per_member = [
            a.fc(f.to(a.fc.weight.device, a.fc.weight.dtype)).softmax(-1).float().cpu()
            for a, f in zip(aggregators, features, strict=True)
        ]
    return torch.stack(per_member).mean(0).numpy()


def add_tile_probs(
    result: ImageResult, aggregators: Sequence[nn.Module], features: Sequence[Tensor]
) -> None:
    """Give a frozen encoder's result (no patch probabilities) the image model's per-tile
    probabilities (``tile_probs``) for its heatmap, where there is one feature row per tile
    (not with ``features.view=whole``, whose one row is the whole image; with ``both`` each
    tile's row holds the whole image's features beside its own)."""
    if result.positions is None or any(len(f) != len(result.positions) for f in features):
        return
    result.tile_probs = tile_probs(aggregators, features)


def image_result(
    output: dict[str, Any],
    path: str,
    label: int | None,
    positions=None,
    tissue=None,
    frozen: bool = False,
) -> ImageResult:
    """The report's view of one image's ``Embedder`` output (positions and tissue from the
    output unless given, as prepare's records give them). ``frozen``: the patch network is a
    fixed encoder, whose zero head's probabilities (0.25 each) are no patch predictions."""
    if output.get("error"):
        return ImageResult(
            output["image_id"], path, label, None, None, None, None, error=output["error"]
        )
    attention = output.get("attention")
    features = output["features"].numpy()
    positions = output.get("pos") if positions is None else positions
    tissue = output.get("tissue") if tissue is None else tissue
    if positions is None or len(positions) != len(features):  # features.view=whole: one row,
        positions, tissue = None, output.get("tissue")  # the image's, on no tile of the grid
    return ImageResult(
        image_id=output["image_id"],
        path=path,
        label=label,
        probs=output["image_probs"].numpy(),
        patch_probs=None if frozen else output["probs"].numpy(),
        positions=None if positions is None else np.asarray(positions),
        tissue=None if tissue is None else np.asarray(tissue),
        features=features,
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
            f"from {plural(r.n_patches, 'patch')}"
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
    output: dict[str, Any],
    path: Path,
    mpp: float | None,
    tiling: Tiling,
    label: str | None,
    frozen: bool = False,
) -> ImageResult:
    """One predicted file's result: read at pixel size ``mpp`` (None: unknown, taken as the
    tiling's), its tiles' origins in the image as tiled, and ``label`` (a class or a 2-class
    group; None: not scored); ``frozen`` as ``image_result``."""
    result = image_result(output, str(path), None, frozen=frozen)
    result.mpp, result.mpp_assumed = mpp or tiling.mpp, mpp is None
    if not result.failed:
        tiled_h, tiled_w = tiled_size(path, mpp, tiling)
        result.origins = tile_origins(
            tiled_h, tiled_w, tiling.tile_size, tiling.stride, tiling.fit
        )
    if label in CLASSES:
        result.label = CLASSES.index(label)
    elif label in GROUPS:
        result.label_group = GROUPS.index(label)
    return result
