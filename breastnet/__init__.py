"""breastnet: BACH breast-cancer H&E classification, from stain normalisation to image labels."""

import os
from pathlib import Path

from omegaconf import OmegaConf

from breastnet.threads import workers

# albumentations otherwise checks PyPI for updates on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CLASSES: tuple[str, ...] = ("Normal", "Benign", "InSitu", "Invasive")


def wandb_mode() -> str:
    """W&B's mode for the logger: ``WANDB_MODE`` when set, online once the user has logged in
    (``wandb login`` or ``WANDB_API_KEY``), else offline (``wandb sync`` uploads later)."""
    if mode := os.environ.get("WANDB_MODE"):
        return mode
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = os.environ.get("WANDB_API_KEY") or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    return "online" if logged_in else "offline"


OmegaConf.register_new_resolver("wandb_mode", wandb_mode, replace=True)


def tile_px(patch_size: int, native_mpp: float | None, mpp: float) -> int:
    """Source pixels at ``mpp`` of a tile that, resized to ``patch_size``, lands at an
    encoder's ``native_mpp`` (224 px at 0.5 µm/px from 0.42 µm/px files: 267 px);
    ``patch_size`` itself when the encoder has no native pixel size."""
    return round(patch_size * native_mpp / mpp) if native_mpp else int(patch_size)


OmegaConf.register_new_resolver("tile_px", tile_px, replace=True)


def slurm_gpus(accelerator: str, devices: int) -> int:
    """GPUs per node a SLURM job asks for (``conf/hydra/launcher/slurm.yaml``): none for a
    CPU trainer (``trainer=cpu``, ``ddp_cpu``), else one per device."""
    return 0 if str(accelerator) == "cpu" else int(devices)


OmegaConf.register_new_resolver("slurm_gpus", slurm_gpus, replace=True)
# `${workers:2,1}`: worker processes sized to the CPUs this process may use (breastnet.threads).
OmegaConf.register_new_resolver("workers", workers, replace=True)
