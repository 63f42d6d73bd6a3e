"""Stage ``patch``: fine-tune the patch CNN (Inception-V3 by default) on stain-normalised patches.

Writes ``work_dir/patch/<hash>/{best,last}.ckpt``; the hash covers everything that shapes
the model (cache, split, augmentation, model, optimisation, seed), so folds and sweep jobs
never overwrite each other. An interrupted run resumes from ``last.ckpt``.
"""

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.artifacts import config_hash
from breastnet.data.datamodule import BreastDataModule
from breastnet.stages.common import (
    container,
    finished_metrics,
    train_and_test,
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
    return train_and_test(cfg, model, datamodule, out, "patch", cfg.patch.early_stopping_patience)
