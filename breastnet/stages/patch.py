"""Stage ``patch``: fine-tune the patch CNN (Inception-V3 by default) on stain-normalised patches.

Writes ``work_dir/patch/<hash>/{best,last}.ckpt``; the hash covers everything that shapes
the model (cache, split, augmentation, model, optimisation, seed), so folds and sweep jobs
never overwrite each other. An interrupted run resumes from ``last.ckpt``.
"""

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from breastnet.artifacts import config_hash
from breastnet.data.datamodule import BreastDataModule
from breastnet.stages.common import (
    EpochSeed,
    build_trainer,
    container,
    finish_stage,
    finished_metrics,
    training_settings,
)

log = logging.getLogger(__name__)


def artifact_dir(cfg: DictConfig, datamodule: BreastDataModule) -> Path:
    """``work_dir/patch/<hash>`` for this config and the datamodule's cache and split."""
    key = config_hash(
        {
            "cache": datamodule.cache.root.name,
            "split": datamodule.split_path.name,
            "augment": container(cfg.augment),
            "batch": {k: cfg.data[k] for k in ("batch_size", "min_tissue")},
            "patch_model": container(cfg.patch_model),
            "trainer": training_settings(cfg.trainer),
            "seed": cfg.seed,
        }
    )
    return datamodule.work_dir / "patch" / key


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume, or reuse) the patch model; returns val/test patch accuracy."""
    datamodule: BreastDataModule = instantiate(cfg.data, mode="patch")
    datamodule.setup()
    out = artifact_dir(cfg, datamodule)
    if (done := finished_metrics(out)) is not None:
        log.info("patch model already trained: %s", out)
        return done

    model = instantiate(cfg.patch_model)
    # `save_last=True` writes last.ckpt only when `best` improves: a second callback keeps
    # last.ckpt at every epoch end, which resuming needs.
    checkpoint = ModelCheckpoint(
        dirpath=out, filename="best", monitor="val/acc", mode="max", enable_version_counter=False
    )
    latest = ModelCheckpoint(dirpath=out, filename="last", enable_version_counter=False)
    callbacks = [checkpoint, latest, EpochSeed(cfg.seed)]
    if cfg.patch.early_stopping_patience:
        callbacks.append(
            EarlyStopping("val/acc", patience=cfg.patch.early_stopping_patience, mode="max")
        )
    trainer = build_trainer(cfg, callbacks)
    resume = out / "last.ckpt"
    if resume.is_file():
        log.info("resuming from %s", resume)
    # Our own checkpoints hold the optimizer partials in their hyperparameters: trusted pickles.
    trainer.fit(
        model,
        datamodule=datamodule,
        ckpt_path=resume if resume.is_file() else None,
        weights_only=False,
    )
    # ddp_spawn brings back the best checkpoint's path but not its score.
    best = checkpoint.best_model_score
    best = trainer.callback_metrics["val/acc_best"] if best is None else best
    tested = trainer.test(
        model, datamodule=datamodule, ckpt_path=checkpoint.best_model_path, weights_only=False
    )
    metrics = {
        "patch/val_acc_best": float(best),
        "patch/test_acc": float(tested[0]["test/acc"]),
    }
    if trainer.is_global_zero:
        finish_stage(out, cfg, metrics)
    return metrics
