"""Stage ``prepare``: index and validate the images, split them, normalise and tile once."""

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.data.datamodule import BreastDataModule


def run(cfg: DictConfig) -> dict[str, float]:
    """Build (or reuse) the index, split, stain reference and patch cache in work_dir."""
    datamodule: BreastDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule.summary()
