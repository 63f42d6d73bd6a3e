"""Stage ``image``: the image-level model (BiLSTM by default) over each image's patch features.

Trained on the features stage's cached sequences, so it takes seconds, not hours; writes
``work_dir/image/<hash>/{best,last}.ckpt``, keyed by the features file and the model config.
"""

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from breastnet.artifacts import config_hash
from breastnet.data.datamodule import BreastDataModule
from breastnet.stages import features
from breastnet.stages.common import container, finished_metrics, train_and_test

log = logging.getLogger(__name__)

# Keys of conf/image_model that the stage reads; the rest builds the LightningModule.
STAGE_KEYS = ("max_epochs", "batch_size", "end_to_end")


def features_file(cfg: DictConfig) -> Path:
    """The features stage's output for this config (it must exist)."""
    patch_data: BreastDataModule = instantiate(cfg.data, mode="patch")
    patch_data.setup()
    path = features.artifact_path(cfg, patch_data)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the features stage first")
    return path


def artifact_dir(cfg: DictConfig, features_path: Path) -> Path:
    """``work_dir/image/<hash>``: one directory per features file, model config and seed."""
    key = config_hash(
        {
            "features": features_path.stem,
            "image_model": container(cfg.image_model),
            "seed": cfg.seed,
        }
    )
    return features_path.parent.parent / "image" / key


def build_model(cfg: DictConfig, feature_dim: int):
    """The ImageClassifier of ``cfg.image_model`` for features of width ``feature_dim``."""
    settings = {k: v for k, v in container(cfg.image_model).items() if k not in STAGE_KEYS}
    settings["aggregator"]["feature_dim"] = feature_dim
    return instantiate(OmegaConf.create(settings))


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or reuse) the image model on cached features; returns val/test image accuracy."""
    path = features_file(cfg)
    out = artifact_dir(cfg, path)
    if (done := finished_metrics(out)) is not None:
        log.info("image model already trained: %s", out)
        return done
    datamodule: BreastDataModule = instantiate(
        cfg.data,
        mode="features",
        features_path=str(path),
        batch_size=cfg.image_model.batch_size,
        num_workers=0,  # the sequences are in memory already
    )
    datamodule.setup()
    model = build_model(cfg, datamodule.feature_dim)
    return train_and_test(
        cfg, model, datamodule, out, "image", max_epochs=cfg.image_model.max_epochs
    )
