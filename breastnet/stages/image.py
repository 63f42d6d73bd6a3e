"""Stage ``image``: the image-level model (BiLSTM by default) over each image's patch sequence.

By default it trains on the features stage's cached sequences, in seconds. With
``image_model.end_to_end=true`` the patch CNN (from the patch stage's best checkpoint) and the
aggregator are fine-tuned together on whole images: the CNN+BiLSTM trained as one.
Writes ``work_dir/image/<hash>/{best,last}.ckpt``.
"""

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import LightningModule

from breastnet.artifacts import config_hash
from breastnet.data.datamodule import BreastDataModule
from breastnet.models.backbone import Backbone
from breastnet.models.image_classifier import ImageClassifier
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


def _upstream(cfg: DictConfig, patch_data: BreastDataModule) -> str:
    """Name of the artifact the image model learns from: patch model (end to end) or features."""
    if cfg.image_model.end_to_end:
        return patch.artifact_dir(cfg, patch_data).name
    return features.artifact_path(cfg, patch_data).stem


def artifact_dir(cfg: DictConfig, patch_data: BreastDataModule) -> Path:
    """``work_dir/image/<hash>``, keyed by the upstream artifact and the image model config."""
    key = config_hash(
        {
            "upstream": _upstream(cfg, patch_data),
            "image_model": container(cfg.image_model),
            "seed": cfg.seed,
        }
    )
    return patch_data.work_dir / "image" / key


def load_model(cfg: DictConfig, patch_data: BreastDataModule) -> ImageClassifier:
    """The best checkpoint of the image stage for this config, in eval mode, on the GPU if any."""
    out = artifact_dir(cfg, patch_data)
    if finished_metrics(out) is None:
        raise FileNotFoundError(f"no finished image model in {out}: run the image stage first")
    # The patch CNN's width sizes the aggregator; end to end, the CNN is part of the model.
    net: Backbone = instantiate(cfg.patch_model.net, weights="none")
    model = build_model(cfg, net.feature_dim, net if cfg.image_model.end_to_end else None)
    state = torch.load(out / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or reuse) the image model; returns val/test image accuracy."""
    settings = cfg.image_model
    patch_data: BreastDataModule = instantiate(cfg.data, mode="patch")
    patch_data.setup()
    if not settings.end_to_end:
        features_path = features.artifact_path(cfg, patch_data)
        if not features_path.is_file():
            raise FileNotFoundError(f"{features_path} not found: run the features stage first")
    out = artifact_dir(cfg, patch_data)
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
    # Epochs on cached features take seconds; a BiLSTM checkpoint with its optimizer state is
    # ~75 MB: the resume point is written every 10 epochs, not every epoch.
    last_every = 1 if settings.end_to_end else 10
    return train_and_test(
        cfg, model, datamodule, out, "image", None, last_every, max_epochs=settings.max_epochs
    )
