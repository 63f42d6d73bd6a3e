"""Stage ``image``: the image-level model (BiLSTM by default) over each image's patch sequence.

By default it trains on the features stage's cached sequences, in seconds. With
``image.end_to_end=true`` the patch CNN (from the patch stage's best checkpoint) and the
aggregator are fine-tuned together on whole images: the CNN+BiLSTM trained as one.
Writes ``work_dir/image/<hash>/{best,last}.ckpt``.
"""

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.artifacts import finished_metrics
from breastnet.inference import build_image_model, load_patch_model
from breastnet.lineage import Lineage
from breastnet.missing import other_keys
from breastnet.stages.common import train_and_test

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or reuse) the image model; returns val/test image accuracy."""
    settings, lineage = cfg.image, Lineage(cfg)
    if not settings.end_to_end and not lineage.features.is_file():
        raise FileNotFoundError(
            f"{lineage.features} not found: run the features stage first"
            + other_keys(cfg, "features", lineage.features)
        )
    if settings.end_to_end and lineage.oof_folds:
        raise ValueError(
            "image.train_features=oof needs the features stage's cached features: it does not "
            "apply with image.end_to_end=true"
        )
    out = lineage.image
    if (done := finished_metrics(out)) is not None:
        log.info("image model already trained: %s", out)
        return done

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
            num_workers=0,  # the sequences are in memory already
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
