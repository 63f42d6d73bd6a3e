"""The configured Lightning Trainer and the callbacks every stage's Trainer carries."""

import logging
import time
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_info

from breastnet.artifacts import container
from breastnet.data.sampling import sample_seed
from breastnet.distributed import in_multirun, launched_per_rank, spawned
from breastnet.logs import on_terminal

log = logging.getLogger(__name__)


class EpochSeed(pl.Callback):
    """Reseed the global RNGs (dropout...) before each training batch from (seed, epoch, batch,
    rank).

    What a batch draws then depends on nothing that ran before it in the process: not on
    when Lightning builds the DataLoader iterator and starts its workers (before the epoch's
    hooks when it resumes, after them otherwise). With the DataModule's ``EpochShuffle``
    (order and per-sample augmentation seeds), a run resumed from ``last.ckpt`` draws what an
    uninterrupted one draws, and ends with the same weights.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Rank 0 draws what one process draws; the others draw dropout masks of their own.
        rank = [trainer.global_rank] if trainer.global_rank else []
        seed = sample_seed(self.seed, trainer.current_epoch, batch_idx, *rank)
        pl.seed_everything(seed % 2**32, workers=True, verbose=False)


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


class ProgressLog(pl.Callback):
    """A plain log line per epoch, and every tenth of a prediction run; ``name`` is the
    stage, which a model's logged metrics start with.

    The progress bar draws only on a terminal: in a log redirected to a file (SLURM, nohup)
    these lines are what shows a run is alive.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.start = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = trainer.callback_metrics
        shown = ("train_loss", "train_acc", "val_loss", "val_acc")
        values = ", ".join(
            f"{k} {float(logged[f'{self.name}/{k}']):.4f}"
            for k in shown
            if f"{self.name}/{k}" in logged
        )
        rank_zero_info(
            f"{self.name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {values} "
            f"({time.monotonic() - self.start:.0f} s)"
        )

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx, *_
    ) -> None:
        total = trainer.num_predict_batches[0]
        if (batch_idx + 1) % max(1, total // 10) == 0 or batch_idx + 1 == total:
            rank_zero_info(
                f"{self.name}: batch {batch_idx + 1}/{total} on rank 0 "
                f"({time.monotonic() - self.start:.0f} s)"
            )


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback], logger: bool = True, **overrides: Any
) -> pl.Trainer:
    """The configured Trainer, with ``cfg.logger`` unless ``logger`` is False; ``overrides``
    replace trainer settings.

    Lightning's ``ddp`` re-launches the command line for ranks > 0, which cannot work inside
    a Hydra multirun (each job would start the sweep again): there ``ddp_spawn`` is used.
    The progress bar draws only on a terminal.
    """
    if not on_terminal():  # a redirected log gets ProgressLog's lines, not bar frames
        overrides.setdefault("enable_progress_bar", False)
    # Under SLURM, srun has started every rank already: nothing to spawn.
    strategy = cfg.trainer.get("strategy")
    if in_multirun() and launched_per_rank(strategy) and not SLURMEnvironment.detect():
        overrides["strategy"] = spawned(strategy)
        log.warning(
            "trainer.strategy=%s inside a Hydra multirun: using %s instead",
            strategy,
            overrides["strategy"],
        )
    made = instantiate(cfg.logger) if logger and cfg.get("logger") else False
    if made:
        callbacks = [*callbacks, LogConfig(container(cfg))]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=made, **overrides)
