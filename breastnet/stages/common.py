"""What the training stages share: the Trainer, per-epoch seeding, stage directories."""

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment

from breastnet.artifacts import write_json, write_text

log = logging.getLogger(__name__)

# Trainer keys that say where a run executes, not what it learns: left out of stage hashes.
_PLACEMENT_KEYS = {
    "_target_",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "sync_batchnorm",
    "default_root_dir",
    "log_every_n_steps",
    "enable_progress_bar",
    "enable_model_summary",
}


def container(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (for hashing and saving)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def training_settings(trainer_cfg: DictConfig) -> dict:
    """The trainer settings that shape a model (epochs, precision, clipping...)."""
    return {k: v for k, v in container(trainer_cfg).items() if k not in _PLACEMENT_KEYS}


class EpochSeed(pl.Callback):
    """Reseed the global RNGs (dropout...) at each epoch start from (seed, epoch).

    With the DataModule's ``EpochShuffle`` (shuffle and augmentations), a run resumed from
    ``last.ckpt`` draws what an uninterrupted one draws, and ends with the same weights.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.seed + trainer.current_epoch, workers=True, verbose=False)


class LogConfig(pl.Callback):
    """Log the whole resolved config (not only the model's hyperparameters) when a fit starts.

    Done in the process that trains: under ``ddp_spawn`` a logger first used in the launching
    process is copied into the workers half set up (the CSV logger then loses its header).
    """

    def __init__(self, config: dict) -> None:
        self.config = config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for logger in trainer.loggers:
                logger.log_hyperparams(self.config)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], **overrides: Any) -> pl.Trainer:
    """The configured Trainer with its logger; ``overrides`` replace trainer settings.

    Lightning's ``ddp`` re-launches the command line for ranks > 0, which cannot work inside
    a Hydra multirun (each job would start the sweep again): there ``ddp_spawn`` is used.
    """
    # Under SLURM, srun has started every rank already: nothing to spawn.
    if _in_multirun() and cfg.trainer.get("strategy") == "ddp" and not SLURMEnvironment.detect():
        log.warning("trainer.strategy=ddp inside a Hydra multirun: using ddp_spawn instead")
        overrides["strategy"] = "ddp_spawn"
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        callbacks = [*callbacks, LogConfig(container(cfg))]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **overrides)


def finish_stage(out_dir: Path, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Record a finished stage: its config, its metrics, then the DONE marker (last)."""
    write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "DONE", "")


def finished_metrics(out_dir: Path) -> dict[str, float] | None:
    """The metrics of a finished stage, or None if it has not finished."""
    if not (out_dir / "DONE").is_file():
        return None
    return json.loads((out_dir / "metrics.json").read_text())


def train_and_test(
    cfg: DictConfig,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    out_dir: Path,
    prefix: str,
    early_stopping_patience: int | None = None,
    last_every_n_epochs: int = 1,
    **trainer_overrides: Any,
) -> dict[str, float]:
    """Fit with ``best``/``last`` checkpoints in ``out_dir`` (resuming from ``last``, written
    every ``last_every_n_epochs``), test the best, and mark the stage done; returns
    ``<prefix>/val_acc_best`` and ``<prefix>/test_acc``.
    """
    # `save_last=True` writes last.ckpt only when `best` improves: a second callback keeps
    # last.ckpt at every epoch end, which resuming needs.
    best = ModelCheckpoint(
        dirpath=out_dir,
        filename="best",
        monitor="val/acc",
        mode="max",
        enable_version_counter=False,
    )
    latest = ModelCheckpoint(
        dirpath=out_dir,
        filename="last",
        every_n_epochs=last_every_n_epochs,
        enable_version_counter=False,
    )
    callbacks = [best, latest, EpochSeed(cfg.seed)]
    if early_stopping_patience:
        callbacks.append(EarlyStopping("val/acc", patience=early_stopping_patience, mode="max"))
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
    # ddp_spawn brings back the best checkpoint's path but not its score.
    score = best.best_model_score
    score = trainer.callback_metrics["val/acc_best"] if score is None else score
    tested = trainer.test(
        model, datamodule=datamodule, ckpt_path=best.best_model_path or None, weights_only=False
    )
    metrics = {
        f"{prefix}/val_acc_best": float(score),
        f"{prefix}/test_acc": float(tested[0]["test/acc"]),
    }
    if trainer.is_global_zero:
        finish_stage(out_dir, cfg, metrics)
    return metrics
