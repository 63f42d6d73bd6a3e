"""Stage ``features``: pooled CNN features and class probabilities of every patch, once.

With the best patch checkpoint, every image of every split gets its ``[N, D]`` feature
sequence (row-major grid order), grid positions and patch probabilities, saved in
``work_dir/features/<hash>.pt``: the image model and the plots read them without the CNN.
Every rank embeds its share of the images (``Trainer.predict``); each image is kept as soon as
it is done, so an interrupted stage resumes with the images it had not finished.
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet import CLASSES
from breastnet.artifacts import atomic_write, write_json
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.splits import SIDES
from breastnet.distributed import on_rank_zero
from breastnet.inference import load_patch_model
from breastnet.lineage import Lineage
from breastnet.models.embedding import Embedder
from breastnet.prediction import predict_images

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Extract (or reuse) features of every image; returns patch-wise accuracy per split."""
    lineage = Lineage(cfg)
    out, summary = lineage.features, lineage.features.with_suffix(".json")
    if not (out.is_file() and summary.is_file()):
        datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
        datamodule.setup()
        model = load_patch_model(cfg, lineage)
        dataset, ids = datamodule.inference_images()
        embedder = Embedder(model.net, chunk_size=cfg.features.batch_size, tta=cfg.features.tta)
        parts = out.with_suffix(".parts")
        outputs = predict_images(cfg, embedder, dataset, ids, parts, "features")
        on_rank_zero(lambda: _save(cfg, datamodule, outputs, out, parts))
    else:
        log.info("features already extracted: %s", out)
    return json.loads(summary.read_text())


def _save(
    cfg: DictConfig, datamodule: BreastDataModule, outputs: dict[str, dict], out: Path, parts: Path
) -> None:
    """Write the features file and its patch accuracy per split (``<hash>.json``), then drop
    the per-image ``parts`` they were made from."""
    labels = {e.image_id: e.label_index for e in datamodule.entries}
    images, metrics = {}, {}
    for side in SIDES:
        right = counted = 0
        for image_id in datamodule.split[side]:
            if image_id not in outputs:
                continue
            record, output = datamodule.records[image_id], outputs[image_id]
            tissue = torch.tensor(record["tissue"])
            counted_patches = tissue >= datamodule.hparams.min_tissue
            right += int((output["probs"].argmax(1)[counted_patches] == labels[image_id]).sum())
            counted += int(counted_patches.sum())
            images[image_id] = {
                "features": output["features"],  # N x D
                "probs": output["probs"],  # N x C
                "positions": torch.tensor(record["positions"]),  # N x 2 (row, col)
                "tissue": tissue,
                "label": labels[image_id],
                "split": side,
            }
        metrics[f"features/patch_acc_{side}"] = right / max(counted, 1)
    saved = {"classes": list(CLASSES), "tta": cfg.features.tta, "images": images}
    atomic_write(out, lambda f: torch.save(saved, f))
    write_json(out.with_suffix(".json"), metrics)
    shutil.rmtree(parts, ignore_errors=True)
