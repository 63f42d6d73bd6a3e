"""Stage ``image``: the image-level model (BiLSTM by default) over each image's patch sequence.

By default it trains on the features stage's cached sequences, in seconds, read from the
features store one image at a time (memory holds a batch, not the store). With
``image.end_to_end=true`` the patch CNN (from the patch stage's best checkpoint) and the
aggregator are fine-tuned together on whole images: the CNN+BiLSTM trained as one.
Writes ``work_dir/image/<hash>/{best,last}.ckpt``.
"""

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.data.feature_store import FeatureStore
from breastnet.errors import ConfigError
from breastnet.inference.models import build_image_model, load_patch_model
from breastnet.lineage import Lineage
from breastnet.missing import other_keys
from breastnet.stages.common import train_and_test, train_once

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or reuse) the image model; returns val/test image accuracy."""
    settings, lineage = cfg.image, Lineage(cfg)
    if not settings.end_to_end and not FeatureStore.is_complete(lineage.features):
        raise FileNotFoundError(
            f"{lineage.features} not found: run the features stage first"
            + other_keys(cfg, "features", lineage.features)
        )
    if settings.end_to_end and lineage.oof_folds:
        raise ValueError(
            "image.train_features=oof needs the features stage's cached features: it does not "
            "apply with image.end_to_end=true"
        )
    if lineage.frozen and "feature_dim" not in cfg.image_model.aggregator.keys():  # noqa: SIM118 (a ??? value is not `in` a DictConfig)
        raise ConfigError(
            f"image_model={cfg.image_model.aggregator._target_.rsplit('.', 1)[-1]} reads patch "
            "probabilities, which a frozen encoder (patch_model.freeze=true) does not give: "
            "use image_model=attention, mean_features or bilstm"
        )
    return train_once(lineage.image, "image", lambda: _train(cfg, lineage))


def _train(cfg: DictConfig, lineage: Lineage) -> dict[str, float]:
    settings, out = cfg.image, lineage.image
    if settings.end_to_end:
        # load_patch_model returns it in eval mode, which Lightning keeps through fit: train
        # mode here (BatchNorm stays frozen where freeze_bn says so), or nothing would adapt.
        backbone = load_patch_model(cfg, lineage).net.train()
        datamodule = instantiate(cfg.data, mode="image", batch_size=settings.batch_size)
        model = build_image_model(cfg, backbone.feature_dim, backbone)
    else:
        datamodule = instantiate(
            cfg.data,
            mode="features",
            features_path=str(lineage.features),
            batch_size=settings.batch_size,
            num_workers=0,  # an image's sequence is one small file, read as it is needed
        )
        datamodule.setup()
        model = build_image_model(cfg, datamodule.feature_dim)
    # Epochs on cached features take seconds; a BiLSTM checkpoint with its optimizer state is
    # ~75 MB: the resume point is written every 10 epochs, not every epoch.
    last_every = 1 if settings.end_to_end else 10
    epochs = settings.max_epochs if model.trainable else 1  # one pass scores a fixed rule
    return train_and_test(
        cfg, model, datamodule, out, "image", None, last_every, max_epochs=epochs
    )
