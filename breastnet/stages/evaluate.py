"""Stage ``evaluate``: metrics, plots, predictions and an HTML page for one split.

Runs the trained image model (and, for the plots, the patch outputs it reads) over the images
of ``eval.split`` and writes ``work_dir/reports/<hash>/``: ``metrics.json`` (DESIGN.md's
keys), ``predictions.csv``, the PNGs and ``index.html``; with ``logger=wandb`` the same go to
the W&B run.
"""

import logging

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from tqdm import tqdm

from breastnet.artifacts import config_hash
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.splits import SIDES
from breastnet.inference import TrainedPipeline
from breastnet.reporting import Report, write_report
from breastnet.stages import features, image
from breastnet.tracking import log_report

log = logging.getLogger(__name__)

SPLITS = (*SIDES, "all")


def summary_metrics(report: Report, prefix: str) -> dict[str, float]:
    """The headline numbers of a report as flat ``<prefix>/<name>`` scalars (for Hydra, W&B)."""
    if report.metrics is None:
        return {}
    keys = ("image_accuracy", "patch_accuracy", "macro_auc", "n_images")
    return {f"{prefix}/{k}": report.metrics[k] for k in keys if report.metrics[k] is not None}


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the trained pipeline on ``eval.split``; returns the headline metrics."""
    if rank_zero_only.rank != 0:
        return {}
    split = cfg.eval.split
    if split not in SPLITS:
        raise ValueError(f"eval.split must be one of {SPLITS}, got {split!r}")
    datamodule: BreastDataModule = instantiate(cfg.data, mode="patch")
    datamodule.setup()
    pipeline = TrainedPipeline(cfg, datamodule)
    cached = {}
    if not pipeline.end_to_end:
        saved = torch.load(features.artifact_path(cfg, datamodule), weights_only=False)
        cached = saved["images"]
    ids = [i for side in SIDES for i in datamodule.split[side] if split in (side, "all")]
    entries = {e.image_id: e for e in datamodule.entries}
    results = []
    for image_id in tqdm(ids, desc=f"evaluate {split}", unit="img"):
        record = datamodule.records[image_id]  # grid positions and tissue, from prepare
        saved_outputs = cached.get(image_id)
        results.append(
            pipeline.result(
                image_id,
                entries[image_id].path,
                entries[image_id].label_index,
                np.asarray(record["positions"]),
                np.asarray(record["tissue"]),
                # End to end there are no cached features: the image model's CNN embeds.
                None if saved_outputs else np.asarray(datamodule.cache.load(image_id)),
                saved_outputs,
            )
        )
    model_dir = image.artifact_dir(cfg, datamodule)
    out = datamodule.work_dir / "reports" / config_hash({"image": model_dir.name, "split": split})
    report = write_report(
        out,
        results,
        patches=lambda i: np.asarray(datamodule.cache.load(i)),
        title=f"breastnet: {cfg.image_model.aggregator.name} on the {split} split",
        min_tissue=datamodule.hparams.min_tissue,
        n_examples=cfg.eval.examples,
        seed=cfg.seed,
    )
    metrics = summary_metrics(report, "eval")
    log_report(cfg, report, results, "eval")
    if report.metrics is not None:
        print(f"image accuracy on the {split} split: {report.metrics['image_accuracy']:.3f}")
    print(f"report: {report.html} (metrics.json, predictions.csv and the PNGs beside it)")
    return metrics
