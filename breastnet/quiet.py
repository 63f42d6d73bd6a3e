"""Quiet the known, harmless noise of Lightning and W&B, so what a run prints is worth reading.

Each filter matches one message (and its category and origin where Python allows), says why
it is safe, and leaves every other warning as it was. The model summary is off in
``conf/trainer/default.yaml`` (``trainer.enable_model_summary=true`` brings it back): it
lists the metric objects and "Total FLOPs: 0", as no module defines an example input.
"""

import logging
import os
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger
from pytorch_lightning.utilities.warnings import PossibleUserWarning

_LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"


def _not_litlogger_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_LITLOGGER_TIP)


class DeviceLines(logging.Filter):
    """Lightning's device lines, printed at every Trainer construction (4-5 per run): no TPU
    line (no breastnet setting uses one; Lightning warns apart when one sits unused), no GPU
    line on a machine without a GPU, and a GPU line once per job."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("TPU available: ") or message.startswith("GPU available: False"):
            return False
        if message.startswith("GPU available: "):
            if message in self.shown:
                return False
            self.shown.add(message)
        return True


_DEVICE_LINES = DeviceLines()


def quiet_known_noise(cfg: DictConfig) -> None:
    """Install the filters; called by the CLI at the start of each job (idempotent)."""
    # Lightning 2.6 builds torch's LeafSpec, deprecated in torch 2.10+, in its own pytree helper:
    # nothing to change on our side, and it goes away with a Lightning that calls is_leaf().
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"pytorch_lightning\.utilities\._pytree",
    )
    # Every metric breastnet logs is per epoch (on_epoch=True), so a per-step logging interval
    # longer than an epoch (the demo's image model: 2 batches) loses nothing.
    warnings.filterwarnings(
        "ignore",
        message=r"The number of training batches \(\d+\) is smaller than the logging interval",
        category=PossibleUserWarning,
    )
    # All stages of a job share one W&B run by design (breastnet.tracking); the CLI finishes
    # it at the end of the job, so the next job gets its own.
    warnings.filterwarnings(
        "ignore",
        message=r"There is a wandb run already in progress",
        category=UserWarning,
        module=r"pytorch_lightning\.loggers\.wandb",
    )
    # freeze_bn keeps BatchNorm in eval mode on purpose (frozen statistics); only then, as
    # nothing else in breastnet trains with modules in eval mode.
    if OmegaConf.select(cfg, "patch_model.net.freeze_bn", default=False):
        warnings.filterwarnings(
            "ignore",
            message=r"Found \d+ module\(s\) in eval mode at the start of training",
            category=PossibleUserWarning,
        )
    # Each stage fits into its own keyed dir in work_dir (breastnet.stages.common), where
    # breastnet writes the stage's lock and config.yaml before the fit and resumes from the
    # last.ckpt it finds there itself: "not empty" is every fresh run's state, not a stale one.
    warnings.filterwarnings(
        "ignore",
        message=r"Checkpoint directory .* exists and is not empty\.",
        category=UserWarning,
        module=r"pytorch_lightning\.callbacks\.model_checkpoint",
    )
    # Outside a SLURM job (a login node, any host with SLURM installed) the run is meant to be
    # one process: the hint to prepend srun is for a job script that forgot it, and stays
    # there (SLURM_JOB_ID set).
    if not os.environ.get("SLURM_JOB_ID"):
        warnings.filterwarnings(
            "ignore",
            message=r"The `srun` command is available on your system but is not used",
            category=PossibleUserWarning,
        )
    # An advertisement printed at every Trainer construction, and the device lines
    # (DeviceLines); the other lines of this logger (our progress lines) stay.
    lines = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _not_litlogger_tip not in lines.filters:
        lines.addFilter(_not_litlogger_tip)
    _DEVICE_LINES.shown.clear()  # a new job shows its GPU line again
    if _DEVICE_LINES not in lines.filters:
        lines.addFilter(_DEVICE_LINES)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger without ``anonymous``, which it always passes to ``wandb.init``.

    wandb (0.31 here) ignores the setting and warns about it in every run (wandb/wandb#10909).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)
