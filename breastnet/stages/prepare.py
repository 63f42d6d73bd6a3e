"""Stage ``prepare``: index and validate the images, split them, normalise and tile once, and
audit the split for near-duplicates across its sides (``breastnet.audit``)."""

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.artifacts import locked
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
    on_rank_zero(datamodule.build)
    datamodule.setup()
    summary = datamodule.summary()
    if cfg.audit.enabled:

        def audit() -> dict:
            split, threshold = datamodule.split_path, cfg.audit.threshold
            with locked(split.with_suffix(".audit.json")):
                return audit_split(datamodule.work_dir, datamodule.entries, split, threshold)

        found = on_rank_zero(audit)
        if found is not None:
            summary["data/near_duplicates"] = float(found["flagged"])
    return summary
