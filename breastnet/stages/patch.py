"""Stage ``patch``: fine-tune the patch CNN (Inception-V3 by default) on stain-normalised patches.

Writes ``work_dir/patch/<hash>/{best,last}.ckpt`` (``breastnet.lineage`` says what the hash
covers), so folds and sweep jobs never overwrite each other. An interrupted run resumes from
``last.ckpt``. With ``image.train_features=oof`` it then trains the K out-of-fold models,
each on the training images without one inner fold (validated on the same val images), whose
test side is that fold: their test accuracy is the out-of-fold patch accuracy. With
``patch.refit=true`` the chosen model is then retrained on train + val for the epochs val
chose (``patch/<refit key>``), and that model embeds the images. A frozen
encoder (``patch_model.freeze=true``) trains nothing and writes no checkpoint: the features
stage embeds with its weights as loaded.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from breastnet.data.datamodule import BreastDataModule
from breastnet.errors import ConfigError
from breastnet.lineage import Lineage
from breastnet.stages.common import train_and_test, train_once

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume, or reuse) the patch model and any out-of-fold ones; returns val/test
    patch accuracy (and ``patch/oof_acc``, the mean over the out-of-fold models)."""
    lineage = Lineage(cfg)
    if lineage.frozen:
        if lineage.oof_folds:
            raise ConfigError(
                "image.train_features=oof needs fine-tuned patch models: a frozen encoder "
                "(patch_model.freeze=true) embeds every image alike, use in_sample"
            )
        log.info("patch_model.freeze=true: a fixed encoder, nothing to train")
        return {}
    metrics = _train(cfg, lineage)
    if lineage.refit:
        metrics |= _refit(cfg, lineage)
    if inner := lineage.inner_models():
        held_out = [_train(cfg, model)["patch/test_acc"] for model in inner]
        metrics["patch/oof_acc"] = float(np.mean(held_out))
    return metrics


def _train(cfg: DictConfig, lineage: Lineage) -> dict[str, float]:
    out = lineage.selection

    def train() -> dict[str, float]:
        if lineage.inner is not None:
            k, n = lineage.inner
            log.info("out-of-fold patch model %d of %d: %s", k + 1, n, out)
        datamodule: BreastDataModule = instantiate(
            cfg.data, mode="patch", inner_fold=lineage.inner
        )
        datamodule.setup()
        model = instantiate(cfg.patch_model)
        patience = cfg.patch.early_stopping_patience
        return train_and_test(cfg, model, datamodule, out, "patch", patience)

    return train_once(out, "patch", train)


def chosen_epochs(model_dir: Path) -> int:
    """How many epochs the model in ``model_dir`` had trained when val chose it."""
    checkpoint = torch.load(model_dir / "best.ckpt", map_location="cpu", weights_only=False)
    return int(checkpoint["epoch"]) + 1


def _refit(cfg: DictConfig, lineage: Lineage) -> dict[str, float]:
    """``patch.refit``: a fresh model on train + val for the chosen number of epochs, on the
    chosen run's learning-rate schedule (cut short there); returns its epochs and test
    patch accuracy."""
    epochs = chosen_epochs(lineage.selection)

    def train() -> dict[str, float]:
        log.info("patch.refit: %d epoch(s) on train + val: %s", epochs, lineage.patch)
        datamodule: BreastDataModule = instantiate(cfg.data, mode="patch", refit=True)
        datamodule.setup()
        settings = OmegaConf.create(OmegaConf.to_container(cfg.patch_model, resolve=True))
        if settings.get("scheduler") is not None:  # the schedule of the full run
            settings.scheduler.max_epochs = cfg.trainer.max_epochs
        model = instantiate(settings)
        return train_and_test(
            cfg, model, datamodule, lineage.patch, "patch", select=False, max_epochs=epochs
        )

    found = train_once(lineage.patch, "patch (refit)", train)
    return {"patch/refit_epochs": float(epochs), "patch/refit_test_acc": found["patch/test_acc"]}
