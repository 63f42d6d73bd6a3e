"""Stage ``patch``: fine-tune the patch CNN (Inception-V3 by default) on stain-normalised patches.

Writes ``work_dir/patch/<hash>/{best,last}.ckpt`` (``breastnet.lineage`` says what the hash
covers), so folds and sweep jobs never overwrite each other. An interrupted run resumes from
``last.ckpt``.
"""

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.artifacts import finished_metrics
from breastnet.data.datamodule import BreastDataModule
from breastnet.lineage import Lineage
from breastnet.stages.common import train_and_test

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume, or reuse) the patch model; returns val/test patch accuracy."""
    out = Lineage(cfg).patch
    if (done := finished_metrics(out)) is not None:
        log.info("patch model already trained: %s", out)
        return done
    datamodule: BreastDataModule = instantiate(cfg.data, mode="patch")
    datamodule.setup()
    model = instantiate(cfg.patch_model)
    return train_and_test(cfg, model, datamodule, out, "patch", cfg.patch.early_stopping_patience)
