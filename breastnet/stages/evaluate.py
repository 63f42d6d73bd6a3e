"""Stage ``evaluate``: metrics, plots, predictions and an HTML page for one split.

Runs the trained image model (on every rank, with the trainer's accelerator) over the images
of ``evaluate.split`` and writes ``work_dir/reports/<hash>/``: ``metrics.json``
(docs/architecture.md, "metrics.json"), ``predictions.csv``, the PNGs and ``index.html``;
with ``logger=wandb`` the same go to the W&B run.
"""

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from breastnet.data.datamodule import BreastDataModule
from breastnet.data.datasets import FeatureDataset
from breastnet.data.feature_store import FeatureStore, missing_message
from breastnet.data.splits import SIDES, split_summary
from breastnet.distributed import locked_on_rank_zero, on_rank_zero
from breastnet.errors import ConfigError
from breastnet.inference.embedder import Embedder
from breastnet.inference.models import image_embedder, load_image_model, used_checkpoints
from breastnet.inference.results import add_tile_probs, image_result
from breastnet.inference.runner import predict_images
from breastnet.lineage import Lineage, container
from breastnet.logs import say
from breastnet.stages.common import (
    eva_scope,
    evaluation_line,
    model_facts,
    pixel_facts,
    publish_report,
)

log = logging.getLogger(__name__)

SPLITS = (*SIDES, "all")


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the trained pipeline on ``evaluate.split``; returns the headline metrics."""
    split = cfg.evaluate.split
    if split not in SPLITS:
        raise ConfigError(f"evaluate.split must be one of {SPLITS}, got {split!r}")
    lineage = Lineage(cfg)
    datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
    datamodule.setup()
    model = load_image_model(cfg, lineage)
    sides = SIDES if split == "all" else (split,)
    if model.backbone is not None:  # end to end: the image model's own CNN embeds the patches
        dataset, ids = datamodule.inference_images(sides)
        embedder = image_embedder(cfg, lineage, model)
    else:  # on the features stage's cached outputs
        cached = FeatureStore(lineage.features)
        ids = _stored(cached, datamodule, sides)
        dataset = FeatureDataset(cached, ids, datamodule.prepared.labels)
        embedder = Embedder(None, model.aggregator)
    out = lineage.report(split)
    checkpoints = used_checkpoints(lineage, model)
    aggregator = model.aggregator  # a frozen encoder's heatmaps: its per-tile probabilities
    # One evaluation of a report at a time, from its first part to the report that drops the
    # parts: a second job (a requeue, a duplicate) waits, then evaluates on its own parts.
    with locked_on_rank_zero(out / "evaluate.run"):  # out/.evaluate.run.lock
        outputs = predict_images(cfg, embedder, dataset, ids, out / ".parts", "evaluate")
        report = partial(_report, cfg, datamodule, outputs, out, checkpoints, aggregator)
        return on_rank_zero(report) or {}


def _stored(
    store: FeatureStore, datamodule: BreastDataModule, sides: tuple[str, ...]
) -> list[str]:
    """The images of ``sides`` whose current content the store holds; the others (added or
    changed since the features stage ran) are named in a warning and left out."""
    wanted = datamodule.prepared.contents(sides)
    if stale := store.stale(wanted):
        log.warning(
            "%s; evaluating the other %d",
            missing_message(store.root, stale, len(wanted)),
            len(wanted) - len(stale),
        )
    left_out = set(stale)
    return [i for i in wanted if i not in left_out]


def split_facts(cfg: DictConfig, datamodule: BreastDataModule, evaluated: set[str]) -> dict:
    """What a reader needs to trust the numbers: the split's sides and source groups, and
    from prepare's audit the near-duplicates among the ``evaluated`` images and their
    closest training images (``evaluate.examples`` pairs)."""
    prepared = datamodule.prepared
    spec = prepared.split_spec
    labels = {e.image_id: e.label for e in prepared.entries}
    groups = spec.groups_of(prepared.entries)
    facts = split_summary(prepared.split, groups, spec, labels)
    facts["name"] = prepared.split_path.stem
    audit = prepared.split_path.with_suffix(".audit.json")
    if not audit.is_file():  # audit.enabled=false
        return facts
    saved = json.loads(audit.read_text())
    matches = [m for m in saved["matches"] if m["image_id"] in evaluated]
    paths = {e.image_id: e.path for e in prepared.entries}
    pairs = [
        m | {"image_path": paths[m["image_id"]], "train_path": paths[m["train_id"]]}
        for m in matches[: cfg.evaluate.examples]
    ]
    return facts | {
        "near_duplicates": sum(m["near_duplicates"] > 0 for m in matches),
        "threshold": saved["threshold"],
        "pairs": pairs,
    }


def _report(
    cfg: DictConfig,
    datamodule: BreastDataModule,
    outputs: dict,
    out,
    checkpoints: list[Path],
    aggregator: nn.Module | None = None,
) -> dict:
    """Write the report of ``outputs``; a frozen encoder's images get no patch predictions,
    their heatmaps ``aggregator``'s own per-tile probabilities where it has them."""
    prepared = datamodule.prepared
    entries = {e.image_id: e for e in prepared.entries}
    lineage = Lineage(cfg)
    frozen = lineage.frozen
    results = []
    for image_id, output in outputs.items():
        record = prepared.records[image_id]  # grid positions and tissue, from prepare
        entry = entries[image_id]
        result = image_result(
            output, entry.path, entry.label_index, record["positions"], record["tissue"], frozen
        )
        result.mpp, result.mpp_assumed = entry.mpp or datamodule.tiling.mpp, entry.mpp is None
        if frozen and aggregator is not None:
            add_tile_probs(result, [aggregator], [output["features"]])
        results.append(result)
    split = cfg.evaluate.split
    name = cfg.image_model.aggregator._target_.rsplit(".", 1)[-1]
    inputs = model_facts(cfg, lineage) | {
        "input": f"the {split} split of the training data",
        **pixel_facts([entries[i].mpp for i in outputs], "TIFF tags, else data.mpp"),
        "label_map": container(cfg.data.get("label_map")),
    }
    facts = split_facts(cfg, datamodule, set(outputs))
    if scope := eva_scope(prepared.split_spec, facts, cfg.data.data_dir):
        facts["scope"] = scope
    report, metrics = publish_report(
        cfg,
        out,
        results,
        lambda i: np.asarray(prepared.cache.load(i)),
        f"breastnet: {name} on the {split} split",
        datamodule.hparams.min_tissue,
        "eval",
        out / ".parts",
        facts,
        checkpoints=checkpoints,
        inputs=inputs,
        tiling=datamodule.tiling,
    )
    if report.metrics is not None:
        say(evaluation_line(split, facts, report.metrics))
    say(f"report: {report.html} (metrics.json, predictions.csv and the PNGs beside it)")
    return metrics
