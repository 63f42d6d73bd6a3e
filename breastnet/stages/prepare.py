"""Stage ``prepare``: index and validate the images, split them, normalise and tile once."""

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.data.datamodule import BreastDataModule
from breastnet.distributed import on_rank_zero


def run(cfg: DictConfig) -> dict[str, float]:
    """Build (or reuse) the index, split, stain reference and patch cache in work_dir.

    Rank 0 builds; every rank then reads what it built.
    """
    datamodule: BreastDataModule = instantiate(cfg.data)
    on_rank_zero(datamodule.prepare_data)
    datamodule.setup()
    return datamodule.summary()
