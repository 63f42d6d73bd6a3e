"""Stage ``features``: pooled CNN features and class probabilities of every patch, once.

With the best patch checkpoint, every image of every split gets its ``[N, D]`` feature
sequence (row-major grid order), grid positions and patch probabilities, saved in
``work_dir/features/<hash>.pt``: the image model and the plots read them without the CNN.
Every rank embeds its share of the images (``Trainer.predict``); each image is kept as soon as
it is done, so an interrupted stage resumes with the images it had not finished. With
``image.train_features=oof`` each training image is embedded by the out-of-fold patch
model that did not train on it, and each image records which patch model embedded it.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet import CLASSES
from breastnet.artifacts import atomic_write, write_json
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.splits import SIDES
from breastnet.distributed import locked_on_rank_zero, on_rank_zero
from breastnet.inference import load_patch_model
from breastnet.lineage import Lineage
from breastnet.models.embedding import Embedder
from breastnet.prediction import predict_images
from breastnet.report.metrics import accuracy

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Extract (or reuse) features of every image; returns patch-wise accuracy per split."""
    lineage = Lineage(cfg)
    out, summary = lineage.features, lineage.features.with_suffix(".json")
    with locked_on_rank_zero(out):  # of two jobs with this key, one extracts
        if not (out.is_file() and summary.is_file()):
            _extract(cfg, lineage, out)
        else:
            log.info("features already extracted: %s", out)
    return json.loads(summary.read_text())


def _extract(cfg: DictConfig, lineage: Lineage, out: Path) -> None:
    datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
    datamodule.setup()
    parts = out.with_suffix(".parts")
    outputs: dict[str, dict] = {}
    for model, ids in _assignments(cfg, lineage, datamodule):
        dataset, ids = datamodule.inference_images(image_ids=ids)
        embedder = Embedder(
            load_patch_model(cfg, model).net,
            chunk_size=cfg.features.batch_size,
            tta=cfg.features.tta,
        )
        name = "features" if model.inner is None else f"features (oof {model.inner[0]})"
        found = predict_images(cfg, embedder, dataset, ids, parts / model.patch.name, name)
        outputs.update({i: {**o, "patch_model": model.patch.name} for i, o in found.items()})
    on_rank_zero(lambda: _save(cfg, datamodule, outputs, out, parts))


def _assignments(
    cfg: DictConfig, lineage: Lineage, datamodule: BreastDataModule
) -> list[tuple[Lineage, list[str]]]:
    """Which patch model embeds which images: the full one every image (in-sample), or the
    val/test images, with each training image embedded by the out-of-fold model whose
    inner split held it out (``oof``)."""
    split = datamodule.split
    inner = lineage.inner_models()
    if not inner:
        return [(lineage, [i for side in SIDES for i in split[side]])]
    plan = [(lineage, [*split["val"], *split["test"]])]
    for model in inner:
        held = json.loads(model.split.read_text())["test"]
        plan.append((model, held))
    return plan


def _save(
    cfg: DictConfig, datamodule: BreastDataModule, outputs: dict[str, dict], out: Path, parts: Path
) -> None:
    """Write the features file and its patch accuracy per split (``<hash>.json``), then drop
    the per-image ``parts`` they were made from."""
    labels = {e.image_id: e.label_index for e in datamodule.entries}
    images, metrics = {}, {}
    for side in SIDES:
        truth, preds = [], []  # of the tissue patches, as the patch stage counts them
        for image_id in datamodule.split[side]:
            if image_id not in outputs:
                continue
            record, output = datamodule.records[image_id], outputs[image_id]
            tissue = torch.tensor(record["tissue"])
            counted = output["probs"].argmax(1)[tissue >= datamodule.hparams.min_tissue]
            preds.append(counted.numpy())
            truth.append(np.full(len(counted), labels[image_id]))
            images[image_id] = {
                "features": output["features"],  # N x D
                "probs": output["probs"],  # N x C
                "positions": torch.tensor(record["positions"]),  # N x 2 (row, col)
                "tissue": tissue,
                "label": labels[image_id],
                "split": side,
                "patch_model": output["patch_model"],  # the patch/<key> that embedded it
            }
        found = accuracy(np.concatenate(truth), np.concatenate(preds)) if truth else None
        metrics[f"features/patch_acc_{side}"] = found or 0.0
    saved = {
        "classes": list(CLASSES),
        "tta": cfg.features.tta,
        "train_features": cfg.image.train_features,
        "images": images,
    }
    atomic_write(out, lambda f: torch.save(saved, f))
    write_json(out.with_suffix(".json"), metrics)
    shutil.rmtree(parts, ignore_errors=True)
