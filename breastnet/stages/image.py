"""Stage ``image``: the image-level model (BiLSTM by default) over each image's patch sequence.

By default it trains on the features stage's cached sequences, in seconds, read from the
features store one image at a time (memory holds a batch, not the store). With
``image.end_to_end=true`` the patch CNN (from the patch stage's best checkpoint) and the
aggregator are fine-tuned together on whole images: the CNN+BiLSTM trained as one.
``image_model=linear_probe`` is fitted in closed form on the training images first (its
penalty chosen by inner cross-validation on them), then scored like the others.
Writes ``work_dir/image/<hash>/{best,last}.ckpt``.

With ``select.inner_folds=K`` it also scores the configured image model by K-fold
cross-validation inside the training images (``select/inner_balanced_accuracy``): a number
for sweepers to choose by that no test image enters (the val carve-out is training side). It
is kept in ``work_dir/image/<hash>/inner_cv_<K>folds.json``, so the model is not retrained
for it.
"""

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from breastnet.artifacts import write_json
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.datasets import pad_collate
from breastnet.data.feature_store import FeatureStore
from breastnet.distributed import locked_on_rank_zero, rank
from breastnet.errors import ConfigError
from breastnet.inference.models import build_image_model, load_patch_model
from breastnet.lineage import Lineage
from breastnet.missing import other_keys
from breastnet.models.aggregators import LinearProbe
from breastnet.models.image_classifier import ImageClassifier
from breastnet.models.linear_probe import fit_on_side, fit_probe
from breastnet.selection import cross_validate, inner_splits, training_images, training_side
from breastnet.stages.common import train_and_test, train_once
from breastnet.trainer import EpochSeed, build_trainer

log = logging.getLogger(__name__)

SELECT_METRIC = "select/inner_balanced_accuracy"
REFIT_VAL = "image/val_seen_by_patch_model"
"""1.0 when the image model's val images trained the patch CNN (``patch.refit``)."""


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (or reuse) the image model; returns val/test image accuracy (and the inner-CV
    score with ``select.inner_folds``)."""
    settings, lineage = cfg.image, Lineage(cfg)
    folds = inner_folds(cfg)
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
    if settings.end_to_end and (folds or _is_probe(cfg)):
        what = "select.inner_folds" if folds else "image_model=linear_probe"
        raise ConfigError(
            f"{what} fits image models on the features stage's cached features: it does not "
            "apply with image.end_to_end=true"
        )
    if lineage.frozen and "feature_dim" not in cfg.image_model.aggregator.keys():  # noqa: SIM118 (a ??? value is not `in` a DictConfig)
        raise ConfigError(
            f"image_model={cfg.image_model.aggregator._target_.rsplit('.', 1)[-1]} reads patch "
            "probabilities, which a frozen encoder (patch_model.freeze=true) does not give: "
            "use image_model=attention, mean_features, linear_probe or bilstm"
        )
    metrics = train_once(lineage.image, "image", lambda: _train(cfg, lineage))
    if lineage.refit:  # the key says so too: its upstream is the refit patch model's
        log.warning(
            "patch.refit=true: the val images trained the patch CNN, so image/val_acc_best "
            "(and the epoch it chose) is optimistic: choose with select=inner_cv instead"
        )
        metrics = metrics | {REFIT_VAL: 1.0}
    if folds:
        metrics = metrics | _inner_cv_once(cfg, lineage, folds)
    return metrics


def inner_folds(cfg: DictConfig) -> int:
    """``select.inner_folds``: 0 (off) or the folds of the inner-CV selection objective."""
    folds = OmegaConf.select(cfg, "select.inner_folds", default=0) or 0
    if folds == 1 or folds < 0:
        raise ConfigError(f"select.inner_folds must be 0 (off) or at least 2, got {folds}")
    return int(folds)


def _is_probe(cfg: DictConfig) -> bool:
    return issubclass(get_class(cfg.image_model.aggregator._target_), LinearProbe)


def _features_datamodule(cfg: DictConfig, lineage: Lineage) -> BreastDataModule:
    """The set-up DataModule of the features store's sequences."""
    datamodule = instantiate(
        cfg.data,
        mode="features",
        features_path=str(lineage.features),
        batch_size=cfg.image.batch_size,
        num_workers=0,  # an image's sequence is one small file, read as it is needed
    )
    datamodule.setup()
    return datamodule


def _train(cfg: DictConfig, lineage: Lineage) -> dict[str, float]:
    settings, out = cfg.image, lineage.image
    fitted: dict[str, float] = {}
    if settings.end_to_end:
        # load_patch_model returns it in eval mode, which Lightning keeps through fit: train
        # mode here (BatchNorm stays frozen where freeze_bn says so), or nothing would adapt.
        backbone = load_patch_model(cfg, lineage).net.train()
        datamodule = instantiate(cfg.data, mode="image", batch_size=settings.batch_size)
        model = build_image_model(cfg, backbone.feature_dim, backbone)
    else:
        datamodule = _features_datamodule(cfg, lineage)
        model = build_image_model(cfg, datamodule.feature_dim)
        if isinstance(model.aggregator, LinearProbe):  # fitted here, scored by the loop below
            fitted = fit_probe(model.aggregator, datamodule, cfg.seed)
    # Epochs on cached features take seconds; a BiLSTM checkpoint with its optimizer state is
    # ~75 MB: the resume point is written every 10 epochs, not every epoch.
    last_every = 1 if settings.end_to_end else 10
    epochs = settings.max_epochs if model.trainable else 1  # one pass scores a fixed rule
    return train_and_test(
        cfg,
        model,
        datamodule,
        out,
        "image",
        None,
        last_every,
        extra_metrics=fitted,
        max_epochs=epochs,
    )


def _inner_cv_once(cfg: DictConfig, lineage: Lineage, folds: int) -> dict[str, float]:
    """``inner_cv_metrics`` of this image model, computed once and kept beside it."""
    path = lineage.image / f"inner_cv_{folds}folds.json"
    with locked_on_rank_zero(path):
        if path.is_file():
            return json.loads(path.read_text())["metrics"]
        metrics, scores = inner_cv_metrics(cfg, _features_datamodule(cfg, lineage), folds)
        if rank() == 0:
            write_json(path, {"metrics": metrics, "folds": folds, "fold_scores": scores})
    return metrics


def inner_cv_metrics(
    cfg: DictConfig, datamodule: Any, folds: int
) -> tuple[dict[str, float], list[float]]:
    """The configured image model's mean balanced accuracy over ``folds`` grouped, stratified,
    seeded (``seed``) folds of the training side of ``datamodule`` (a set-up features
    DataModule: what ``training_side`` reads, train and val), and each fold's; no test image is
    read.

    Each fold fits the model as the image stage would on the other folds' images, and scores
    it on its own: a trainable aggregator for ``image.max_epochs`` with its optimizer and the
    trainer's settings (its last epoch: epochs are chosen on val, which this never reads),
    the linear probe with its own penalty search inside those images (nested), a fixed rule
    (``vote``, ``mean_probs``) as it is.
    """
    model = build_image_model(cfg, datamodule.feature_dim)
    probe = model.aggregator if isinstance(model.aggregator, LinearProbe) else None
    side = training_side(datamodule, pooled=probe is not None)
    splits = inner_splits(side.labels, side.groups, folds, cfg.seed, "select.inner_folds")
    if probe is not None:

        def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
            return fit_on_side(probe, side.subset(train), cfg.seed).predict(side.pooled[held])

    else:
        dataset = training_images(datamodule)

        def fit_predict(train: np.ndarray, held: np.ndarray) -> np.ndarray:
            return _fit_and_predict(cfg, dataset, datamodule.feature_dim, train, held)

    scores = cross_validate(fit_predict, side.labels, splits, model.aggregator.num_classes)
    mean = float(np.mean(scores))
    log.info(
        "select: inner %d-fold balanced accuracy %.4f (folds: %s)",
        folds,
        mean,
        ", ".join(f"{s:.3f}" for s in scores),
    )
    return {SELECT_METRIC: mean}, scores


def _fit_and_predict(
    cfg: DictConfig, dataset: Dataset, feature_dim: int, train: np.ndarray, held: np.ndarray
) -> np.ndarray:
    """A fresh image model (seeded alike in every fold) fitted on the ``train`` images of
    ``dataset`` (if it has anything to fit); its predicted classes of the ``held`` ones."""
    torch.manual_seed(cfg.seed)
    model = build_image_model(cfg, feature_dim)
    batch = cfg.image.batch_size
    if model.trainable:
        trainer = build_trainer(
            cfg,
            [EpochSeed(cfg.seed)],
            logger=False,
            max_epochs=cfg.image.max_epochs,
            enable_checkpointing=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        loader = DataLoader(
            Subset(dataset, train.tolist()),
            batch_size=max(1, batch // trainer.world_size),  # image.batch_size is global
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.seed),
            collate_fn=pad_collate,
        )
        with _quiet_inner_fit():
            trainer.fit(model, train_dataloaders=loader)
    return _predict(model, Subset(dataset, held.tolist()), batch)


@contextmanager
def _quiet_inner_fit() -> Iterator[None]:
    """An inner fold's fit has no val loader and stops at ``image.max_epochs`` by design:
    Lightning's two lines saying so, once per fold of every job, tell the user nothing."""
    lines = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = lines.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no")
        lines.setLevel(logging.WARNING)
        try:
            yield
        finally:
            lines.setLevel(level)


@torch.no_grad()
def _predict(model: ImageClassifier, dataset: Dataset, batch_size: int) -> np.ndarray:
    """Predicted classes of every image of ``dataset``, on the CPU (every rank alike)."""
    model = model.cpu().eval()
    preds = [
        model(b["x"], b["mask"], b["pos"], b.get("probs"))["logits"].argmax(1)
        for b in DataLoader(dataset, batch_size=batch_size, collate_fn=pad_collate)
    ]
    return torch.cat(preds).numpy()
