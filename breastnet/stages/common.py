"""What the stages share: fit with resumable checkpoints, test, mark done; publish a report."""

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from breastnet.artifacts import finish_stage, finished_metrics, locked, write_text
from breastnet.data.published import EVA_TEST_RANGES
from breastnet.data.store import Tiling
from breastnet.distributed import locked_on_rank_zero
from breastnet.lineage import Lineage
from breastnet.provenance import config_yaml, provenance
from breastnet.report import ImageResult, Report, write_report
from breastnet.report.metrics import headline
from breastnet.synthetic.dataset import is_generated
from breastnet.tracking import log_report
from breastnet.trainer import EpochSeed, ProgressLog, build_trainer

log = logging.getLogger(__name__)

# eva's reported images, breastnet's test side of data.split=eva
EVA_TEST_IMAGES = sum(stop - start for start, stop in EVA_TEST_RANGES)
# what an evaluated side other than test is to the model
_OWN_IMAGES = {
    "train": ", the images it trained on",
    "val": ", the images that chose its checkpoint",
    "all": ", its training and val images among them",
}


def train_once(
    out_dir: Path, name: str, train: Callable[[], dict[str, float]]
) -> dict[str, float]:
    """The metrics of the model in ``out_dir``: ``train()`` unless it has finished there.

    Checked and trained under the model directory's lock (rank 0 holds it): of two jobs with
    the same model key, one trains and the other waits, then reuses its result.
    """
    with locked_on_rank_zero(out_dir):
        if (done := finished_metrics(out_dir)) is not None:
            log.info("%s model already trained: %s", name, out_dir)
            return done
        return train()


def train_and_test(
    cfg: DictConfig,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    out_dir: Path,
    prefix: str,
    early_stopping_patience: int | None = None,
    last_every_n_epochs: int = 1,
    select: bool = True,
    extra_metrics: dict[str, float] | None = None,
    **trainer_overrides: Any,
) -> dict[str, float]:
    """Fit with ``best``/``last`` checkpoints in ``out_dir`` (resuming from ``last``, written
    every ``last_every_n_epochs``), test the best, and mark the stage done; returns
    ``<prefix>/val_acc_best`` and ``<prefix>/test_acc``.

    ``best`` is the epoch of highest validation accuracy, the lowest validation loss among
    equals (``<prefix>/val_select``, which early stopping watches too); without ``select``
    (a refit, whose val images are training images) it is the last epoch. ``prefix`` is the
    model's ``stage``, which its logged metrics start with; ``extra_metrics`` join the
    returned and recorded ones.
    """
    score_name = f"{prefix}/val_select"
    # `save_last=True` writes last.ckpt only when `best` improves: a second callback keeps
    # last.ckpt at every epoch end, which resuming needs.
    best = ModelCheckpoint(
        dirpath=out_dir,
        filename="best",
        monitor=score_name if select else None,
        mode="max",
        enable_version_counter=False,
    )
    latest = ModelCheckpoint(
        dirpath=out_dir,
        filename="last",
        every_n_epochs=last_every_n_epochs,
        enable_version_counter=False,
    )
    callbacks = [best, latest, EpochSeed(cfg.seed), ProgressLog(prefix)]
    callbacks += [instantiate(c) for c in cfg.get("callbacks", {}).values()]  # conf/callbacks
    if early_stopping_patience:
        callbacks.append(EarlyStopping(score_name, patience=early_stopping_patience, mode="max"))
    trainer = build_trainer(cfg, callbacks, **trainer_overrides)
    resume = out_dir / "last.ckpt"
    if resume.is_file():
        log.info("resuming from %s", resume)
    # Our own checkpoints hold the optimizer partials in their hyperparameters: trusted pickles.
    trainer.fit(
        model,
        datamodule=datamodule,
        ckpt_path=resume if resume.is_file() else None,
        weights_only=False,
    )
    # The best checkpoint's val accuracy (accuracy comes first in its selection), counted over
    # the epochs before a resume too; ddp_spawn brings it back in the callback metrics only,
    # and a fit resumed at its end validates nothing, leaving it in the restored model.
    score = trainer.callback_metrics.get(f"{prefix}/val_acc_best")
    score = model.val_acc_best.compute() if score is None else score
    tested = trainer.test(
        model, datamodule=datamodule, ckpt_path=best.best_model_path or None, weights_only=False
    )
    metrics = {
        f"{prefix}/val_acc_best": float(score),
        f"{prefix}/test_acc": float(tested[0][f"{prefix}/test_acc"]),
        # data.batch_size is the global batch: what each rank took of it
        f"{prefix}/batch_per_device": float(datamodule.batch_size_per_device),
        **(extra_metrics or {}),  # what the stage fitted before (the linear probe's C)
    }
    if trainer.is_global_zero:
        finish_stage(out_dir, cfg, metrics)
    return metrics


def summary_metrics(report: Report, prefix: str) -> dict[str, float | str]:
    """The headline numbers of a report as flat ``<prefix>/<name>`` scalars (for Hydra, W&B),
    and for an evaluated split its protocol (``<prefix>/protocol``: split file, grouping,
    images and groups per side), so no number travels without it."""
    if report.metrics is None:
        return {}
    out: dict[str, float | str] = {f"{prefix}/{k}": v for k, v in headline(report.metrics).items()}
    split = report.metrics.get("split", {})
    if "text" in split:
        scope = f"; test: {split['scope']}" if split.get("scope") else ""
        out[f"{prefix}/protocol"] = f"{split['name']}: {split['text']}{scope}"
    if (duplicates := split.get("near_duplicates")) is not None:
        out[f"{prefix}/near_duplicates"] = duplicates
    return out


def model_facts(cfg: DictConfig, lineage: Lineage) -> dict:
    """What the model was trained on, for the page and metrics.json: the pixel size its
    tiles are cut at (``tiling_mpp``, which every image is rescaled to) and whether its
    patch network is a frozen encoder (no patch predictions)."""
    data = cfg.data
    return {
        "training_data": str(Path(data.data_dir).expanduser().resolve()),
        "training_split": lineage.outer_split.stem,
        "generated": is_generated(data.data_dir),
        "frozen_encoder": lineage.frozen,
        "tiling_mpp": float(data.mpp),
        "tile": f"{data.tile_size} px every {data.stride} px at {data.mpp:g} µm/px "
        f"({data.tile_size * data.mpp:.0f} µm), resized to {data.patch_size} px",
    }


def pixel_facts(mpps: Sequence[float | None], source: str) -> dict:
    """What the page and metrics.json say of the images' own pixel sizes: where they come
    from (``source``), the distinct sizes given (predictions.csv's ``mpp`` column has each
    image's) and how many files had none (assumed to be at the tiling's)."""
    return {
        "pixel_size": source,
        "image_mpp": sorted({float(f"{m:.4g}") for m in mpps if m}),
        "untagged_files": sum(not m for m in mpps),
    }


def eva_scope(spec: Any, facts: dict, data_dir: str) -> str | None:
    """Which of eva's reported (test) images the data set holds, e.g. "bach-dev's part: 66
    of eva's 132 test images", so a subset is not read as the published test set; None for
    other splits. ``spec``: the split's ``SplitSpec``; ``facts``: its ``split_summary``."""
    if spec.split != "eva":
        return None
    n, total = facts["n_images"]["test"], EVA_TEST_IMAGES
    if n >= total:
        return f"eva's {total} test images"
    return f"{Path(data_dir).name}'s part: {n} of eva's {total} test images"


def evaluation_line(split: str, facts: dict, metrics: dict) -> str:
    """Evaluate's one line: what was scored (the protocol, how many images, what the model
    trained on) beside its balanced accuracy and accuracy, e.g. ``test (eva's split,
    bach-dev's part: 66 of eva's 132 test images; trained on 108 + 25 val): balanced accuracy
    0.604, accuracy 0.571``. ``facts``: ``split_facts`` with ``eva_scope``'s ``scope``."""
    n = facts["n_images"]
    if facts.get("scope") and split == "test":
        scored = f"eva's split, {facts['scope']}"
    else:
        count = sum(n.values()) if split == "all" else n[split]
        scored = f"{facts['protocol']}: {count} images{_OWN_IMAGES.get(split, '')}"
    return (
        f"{split} ({scored}; trained on {n['train']} + {n['val']} val): balanced accuracy "
        f"{metrics['balanced_accuracy']:.3f}, accuracy {metrics['image_accuracy']:.3f}"
    )


def publish_report(
    cfg: DictConfig,
    out_dir: Path,
    results: list[ImageResult],
    patches: Callable[[str], Any],
    title: str,
    min_tissue: float,
    prefix: str,
    parts: Path,
    split: dict | None = None,
    checkpoints: Sequence[Path] = (),
    inputs: dict | None = None,
    tiling: Tiling | None = None,
    predictor: dict | None = None,
) -> tuple[Report, dict[str, float]]:
    """Write the report of evaluate or predict (``split``: what evaluate scored, see
    ``write_report``) with its provenance (``checkpoints``: those the stage loaded) and
    resolved ``config.yaml``, drop the per-image ``parts`` it was made from, warn where its
    numbers are below chance, log it (W&B); returns it and its headline metrics under
    ``prefix``. ``inputs`` (what was scored against what the model was trained on) and
    ``tiling`` go to ``write_report``; ``predictor`` (an ensemble's kind and size) to the
    provenance."""
    with locked(out_dir):  # one writer of a report directory at a time
        write_text(out_dir / "config.yaml", config_yaml(cfg))
        facts = provenance(cfg, list(checkpoints)) | (predictor or {}) | {"config": "config.yaml"}
        report = write_report(
            out_dir,
            results,
            patches=patches,
            title=title,
            min_tissue=min_tissue,
            n_examples=cfg.evaluate.examples,
            seed=cfg.seed,
            split=split,
            provenance=facts,
            inputs=inputs,
            tiling=tiling,
        )
        shutil.rmtree(parts, ignore_errors=True)
    for remark in (report.metrics or {}).get("below_chance", []):
        log.warning("below chance: %s (%s)", remark, report.html)
    log_report(cfg, report, results, prefix)
    return report, summary_metrics(report, prefix)
