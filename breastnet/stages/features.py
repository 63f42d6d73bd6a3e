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
model embedded it.
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
from breastnet.data.feature_store import FeatureStore, Row
from breastnet.data.splits import SIDES
from breastnet.distributed import locked_on_rank_zero, on_rank_zero
from breastnet.inference.embedder import Embedder
from breastnet.inference.models import load_patch_model
from breastnet.inference.runner import read_part, run_parts
from breastnet.lineage import Lineage
from breastnet.models.backbone import PatchNet
from breastnet.report.metrics import accuracy

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Extract (or reuse) features of every image; returns patch-wise accuracy per split (none
    for a frozen encoder: it has no trained patch head)."""
    lineage = Lineage(cfg)
    out = lineage.features
    with locked_on_rank_zero(out):  # of two jobs with this key, one extracts
        if not FeatureStore.is_complete(out):
            _extract(cfg, lineage, out)
        else:
            log.info("features already extracted: %s", out)
    return json.loads((out / "metrics.json").read_text())


def _extract(cfg: DictConfig, lineage: Lineage, out: Path) -> None:
    datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
    datamodule.setup()
    parts = out.with_name(f"{out.name}.parts")
    embedded: dict[str, str] = {}  # image id -> the patch/<key> that embeds it
    for model, ids in _assignments(cfg, lineage, datamodule):
        dataset, ids = datamodule.inference_images(image_ids=ids)
        net = load_patch_model(cfg, model).net
        if lineage.frozen:
            _check_scale(cfg, net)
        embedder = Embedder(net, chunk_size=cfg.features.batch_size, tta=cfg.features.tta)
        name = "features" if model.inner is None else f"features (oof {model.inner[0]})"
        run_parts(cfg, embedder, dataset, ids, parts / model.patch.name, name)
        embedded |= dict.fromkeys(ids, model.patch.name)
    on_rank_zero(lambda: _save(cfg, lineage, datamodule, embedded, out, parts))


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
    embedded: dict[str, str],
    out: Path,
    parts: Path,
) -> None:
    """Write the store from the per-image ``parts``, one image in memory at a time: each
    image's file, the patch accuracy per split (``metrics.json``) and, last, the manifest;
    then drop the parts."""
    prepared = datamodule.prepared
    labels = prepared.labels
    rows, metrics, width = [], {}, 0
    for side in SIDES:
        truth, preds = [], []  # of the tissue patches, as the patch stage counts them
        for image_id in prepared.split[side]:
            if image_id not in embedded:
                continue
            record = prepared.records[image_id]
            output = read_part(parts / embedded[image_id], image_id, "features")
            tissue = torch.tensor(record["tissue"])
            counted = output["probs"].argmax(1)[tissue >= datamodule.hparams.min_tissue]
            preds.append(counted.numpy())
            truth.append(np.full(len(counted), labels[image_id]))
            arrays = {
                "features": output["features"],  # N x D
                "probs": output["probs"],  # N x C
                "positions": torch.tensor(record["positions"]),  # N x 2 (row, col)
                "tissue": tissue,
            }
            feature_store.write_image(out, image_id, arrays)
            n, width = arrays["features"].shape
            path = feature_store.image_path(image_id)
            rows.append(Row(image_id, path, n, width, embedded[image_id], side, labels[image_id]))
        if not lineage.frozen:  # a frozen encoder's head is zero: no patch accuracy to give
            found = accuracy(np.concatenate(truth), np.concatenate(preds)) if truth else None
            metrics[f"features/patch_acc_{side}"] = found or 0.0
    meta = {
        "classes": list(CLASSES),
        "tta": cfg.features.tta,
        "train_features": cfg.image.train_features,
        "frozen": lineage.frozen,
        "width": width,
    }
    feature_store.finish(out, rows, meta, metrics)
    shutil.rmtree(parts, ignore_errors=True)
