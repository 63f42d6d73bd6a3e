"""Stage ``image``: the image-level model (BiLSTM by default) over each image's patch sequence.

By default it trains on the features stage's cached sequences, in seconds. With
``image_model.end_to_end=true`` the patch CNN (from the patch stage's best checkpoint) and the
aggregator are fine-tuned together on whole images: the CNN+BiLSTM trained as one.
Writes ``work_dir/image/<hash>/{best,last}.ckpt``.
"""

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import LightningModule

from breastnet.artifacts import config_hash
from breastnet.data.datamodule import BreastDataModule
from breastnet.models.backbone import Backbone
from breastnet.stages import features, patch
from breastnet.stages.common import container, finished_metrics, train_and_test

log = logging.getLogger(__name__)

# Keys of conf/image_model that the stage reads; the rest builds the LightningModule.
STAGE_KEYS = ("max_epochs", "batch_size", "end_to_end")


def build_model(
    cfg: DictConfig, feature_dim: int, backbone: Backbone | None = None
) -> LightningModule:
    """The ImageClassifier of ``cfg.image_model`` for features of width ``feature_dim``."""
    settings = {k: v for k, v in container(cfg.image_model).items() if k not in STAGE_KEYS}
    settings["aggregator"]["feature_dim"] = feature_dim
    return instantiate(OmegaConf.create(settings), backbone=backbone)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or reuse) the image model; returns val/test image accuracy."""
    settings = cfg.image_model
    patch_data: BreastDataModule = instantiate(cfg.data, mode="patch")
    patch_data.setup()
    if settings.end_to_end:
        upstream = patch.artifact_dir(cfg, patch_data).name
    else:
        features_path = features.artifact_path(cfg, patch_data)
        if not features_path.is_file():
            raise FileNotFoundError(f"{features_path} not found: run the features stage first")
        upstream = features_path.stem
    key = config_hash({"upstream": upstream, "image_model": container(settings), "seed": cfg.seed})
    out = patch_data.work_dir / "image" / key
    if (done := finished_metrics(out)) is not None:
        log.info("image model already trained: %s", out)
        return done

    if settings.end_to_end:
        backbone = features.load_patch_model(cfg, patch_data).net
        datamodule = instantiate(cfg.data, mode="image", batch_size=settings.batch_size)
        model = build_model(cfg, backbone.feature_dim, backbone)
    else:
        datamodule = instantiate(
            cfg.data,
            mode="features",
            features_path=str(features_path),
            batch_size=settings.batch_size,
            num_workers=0,  # the sequences are in memory already
        )
        datamodule.setup()
        model = build_model(cfg, datamodule.feature_dim)
    return train_and_test(cfg, model, datamodule, out, "image", max_epochs=settings.max_epochs)
