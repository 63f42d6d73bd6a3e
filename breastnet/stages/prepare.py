"""Stage ``prepare``: index and validate the images, split them, normalise and tile once, and
audit the split for near-duplicates across its sides (``breastnet.audit``)."""

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.audit import audit_split
from breastnet.data.datamodule import BreastDataModule
from breastnet.distributed import on_rank_zero


def run(cfg: DictConfig) -> dict[str, float]:
    """Build (or reuse) the index, split, stain reference, patch cache and split audit in
    work_dir; returns the data counts (and ``data/near_duplicates``: val/test images with a
    training near-duplicate).

    Rank 0 builds; every rank then reads what it built.
    """
    datamodule: BreastDataModule = instantiate(cfg.data)
    on_rank_zero(datamodule.prepare_data)
    datamodule.setup()
    summary = datamodule.summary()
    if cfg.audit.enabled:
        found = on_rank_zero(
            lambda: audit_split(
                datamodule.work_dir, datamodule.entries, datamodule.split_path, cfg.audit.threshold
            )
        )
        if found is not None:
            summary["data/near_duplicates"] = float(found["flagged"])
    return summary
