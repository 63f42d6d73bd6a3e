"""Stage ``features``: pooled features and class probabilities of every patch, once.

With the best patch checkpoint, or a frozen encoder's weights (``patch_model.freeze=true``),
every image of every split gets its ``[N, D]`` feature sequence (row-major grid order), grid
positions and patch probabilities, in the store ``work_dir/features/<hash>/``
(``breastnet.data.feature_store``: one file per image and a manifest): the image model and
the plots read them one image at a time, without the CNN. Every rank embeds its share of the
images (``Trainer.predict``) and keeps each image as soon as it is done, so an interrupted
stage resumes with the images it had not finished; rank 0 alone then writes the store, one
image in memory at a time. With ``image.train_features=oof`` each training image is embedded
by the out-of-fold patch model that did not train on it, and each image records which patch
model embedded it. The store holds no label and no side, and each image records the content it
was embedded from: a rerun embeds only the images that are new or changed (a frozen encoder's
store serves every split and every labelling of the same images). ``features.view`` says what
the rows embed (``breastnet.inference.embedder``): the tiles, the whole image (one row) or both
(each tile's features beside the whole image's).
"""

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet import CLASSES
from breastnet.data import feature_store
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.feature_store import Row, open_store
from breastnet.data.splits import SIDES
from breastnet.distributed import locked_on_rank_zero, on_rank_zero
from breastnet.inference.embedder import Embedder, view_settings
from breastnet.inference.models import load_patch_model
from breastnet.inference.runner import read_part, run_parts
from breastnet.lineage import Lineage
from breastnet.models.backbone import PatchNet
from breastnet.report.metrics import accuracy

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Extract the features of every image the store lacks or holds from other content (or
    reuse them all); returns patch-wise accuracy per split (none for a frozen encoder: it has
    no trained patch head)."""
    lineage = Lineage(cfg)
    out = lineage.features
    with locked_on_rank_zero(out):  # of two jobs with this key, one extracts
        datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
        datamodule.setup()
        records = datamodule.prepared.records  # images that failed to tile have none
        plan = [
            (model, [i for i in ids if i in records])
            for model, ids in _assignments(cfg, lineage, datamodule)
        ]
        contents = datamodule.prepared.contents()
        encoders = {i: model.patch.name for model, ids in plan for i in ids}
        sha1s = {i: contents[i] for i in encoders}
        store = open_store(out)
        todo = set(store.stale(sha1s, encoders) if store else sha1s)
        if todo:
            _extract(cfg, lineage, datamodule, plan, todo, out)
            on_rank_zero(lambda: _save(cfg, lineage, datamodule, sha1s, encoders, todo, out))
        else:
            log.info("features already extracted: %s", out)
    return json.loads((out / "metrics.json").read_text())


def _extract(
    cfg: DictConfig,
    lineage: Lineage,
    datamodule: BreastDataModule,
    plan: list[tuple[Lineage, list[str]]],
    todo: set[str],
    out: Path,
) -> None:
    """Embed the ``todo`` images, each by the patch model ``plan`` gives it, into per-image
    parts beside the store (resumable)."""
    if len(todo) < sum(len(ids) for _, ids in plan):
        log.info("features: %d image(s) new or changed since %s was written", len(todo), out)
    for model, ids in plan:
        dataset, ids = datamodule.inference_images(image_ids=[i for i in ids if i in todo])
        if not ids:
            continue
        net = load_patch_model(cfg, model).net
        if lineage.frozen:
            _check_scale(cfg, net)
        views = view_settings(cfg)
        embedder = Embedder(net, chunk_size=cfg.features.batch_size, tta=cfg.features.tta, **views)
        name = "features" if model.inner is None else f"features (oof {model.inner[0]})"
        run_parts(cfg, embedder, dataset, ids, _parts(out) / model.patch.name, name)


def _parts(out: Path) -> Path:
    """Where an interrupted extraction keeps the images it finished."""
    return out.with_name(f"{out.name}.parts")


def _check_scale(cfg: DictConfig, net: PatchNet) -> None:
    """Warn when a frozen encoder meets tiles at another pixel size or input size than its
    weights learnt at (``experiment=foundation`` sets both from the entry)."""
    net.check_input_size(cfg.data.patch_size)
    native = getattr(net, "mpp", None)
    tile_mpp = cfg.data.mpp * cfg.data.tile_size / cfg.data.patch_size  # after the resize
    if native is not None and not np.isclose(native, tile_mpp, rtol=0.05):
        warnings.warn(
            f"{net.name} learnt at {native} µm/px, but its patches are at {tile_mpp:.3g} "
            f"(data.mpp={cfg.data.mpp}, tile {cfg.data.tile_size} px resized to "
            f"{cfg.data.patch_size}): data.mpp={native} and data.tile_size=data.patch_size "
            "match (experiment=foundation)",
            stacklevel=2,
        )


def _assignments(
    cfg: DictConfig, lineage: Lineage, datamodule: BreastDataModule
) -> list[tuple[Lineage, list[str]]]:
    """Which patch model embeds which images: the full one every image (in-sample), or the
    val/test images, with each training image embedded by the out-of-fold model whose
    inner split held it out (``oof``)."""
    split = datamodule.prepared.split
    inner = lineage.inner_models()
    if not inner:
        return [(lineage, [i for side in SIDES for i in split[side]])]
    plan = [(lineage, [*split["val"], *split["test"]])]
    for model in inner:
        held = json.loads(model.split.read_text())["test"]
        plan.append((model, held))
    return plan


def _save(
    cfg: DictConfig,
    lineage: Lineage,
    datamodule: BreastDataModule,
    sha1s: dict[str, str],
    encoders: dict[str, str],
    todo: set[str],
    out: Path,
) -> None:
    """Write the ``todo`` images' files from their parts, one image in memory at a time, keep
    the store's other rows, then the patch accuracy per split (``metrics.json``) and, last,
    the manifest; then drop the parts."""
    prepared = datamodule.prepared
    store = open_store(out)
    rows = dict(store.rows) if store else {}
    for image_id in sorted(todo):
        record = prepared.records[image_id]
        output = read_part(_parts(out) / encoders[image_id], image_id, "features")
        positions, tissue = torch.tensor(record["positions"]), torch.tensor(record["tissue"])
        if cfg.features.view == "whole":  # one row: the whole image, at the grid's origin
            positions, tissue = torch.zeros((1, 2), dtype=positions.dtype), tissue.mean(0, True)
        arrays = {
            "features": output["features"],  # N x D (1 x D: whole; N x 2D: both)
            "probs": output["probs"],  # N x C
            "positions": positions,  # N x 2 (row, col)
            "tissue": tissue,
        }
        feature_store.write_image(out, image_id, arrays)
        n, width = arrays["features"].shape
        path = feature_store.image_path(image_id)
        rows[image_id] = Row(image_id, path, n, width, encoders[image_id], sha1s[image_id])
    # a frozen encoder's head is zero: no patch accuracy to give
    metrics = {} if lineage.frozen else _patch_accuracy(out, rows, datamodule)
    meta = {
        "classes": list(CLASSES),
        "tta": cfg.features.tta,
        "view": cfg.features.view,
        "train_features": cfg.image.train_features,
        "frozen": lineage.frozen,
        "width": next(iter(rows.values())).width,
    }
    feature_store.finish(out, rows.values(), meta, metrics)
    shutil.rmtree(_parts(out), ignore_errors=True)


def _patch_accuracy(
    out: Path, rows: dict[str, Row], datamodule: BreastDataModule
) -> dict[str, float]:
    """Patch-wise accuracy of the stored probabilities on each split side, of the tissue
    patches as the patch stage counts them, against the current labels."""
    prepared, metrics = datamodule.prepared, {}
    for side in SIDES:
        truth, preds = [], []
        for image_id in (i for i in prepared.split[side] if i in rows):
            image = torch.load(out / rows[image_id].path, weights_only=True)
            counted = image["probs"].argmax(1)[image["tissue"] >= datamodule.hparams.min_tissue]
            preds.append(counted.numpy())
            truth.append(np.full(len(counted), prepared.labels[image_id]))
        found = accuracy(np.concatenate(truth), np.concatenate(preds)) if truth else None
        metrics[f"features/patch_acc_{side}"] = found or 0.0
    return metrics
