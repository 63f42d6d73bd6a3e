"""Model selection on the training images alone: grouped, stratified, seeded inner folds of the
image stage's training side, and their mean balanced accuracy.

What chooses a model must not see what scores it. The linear probe chooses its penalty here
(``breastnet.models.linear_probe``), and ``select.inner_folds`` scores any image model here
(``breastnet.stages.image.inner_cv_metrics``): both read the DataModule's training side (its
train images and the val carve-out) and the split's source groups, never a test image.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import ConcatDataset, Dataset

from breastnet.data.bach import DataError
from breastnet.errors import ConfigError
from breastnet.report.metrics import balanced_accuracy

log = logging.getLogger(__name__)

Split = tuple[np.ndarray, np.ndarray]
"""(training indices, held-out indices) of one inner fold."""


@dataclass(frozen=True)
class TrainingSide:
    """The image stage's training images: their ids, labels (the samples' ``y``), source
    groups (the image's own id without ``data.groups``) and, if asked for, each image's mean
    patch feature (float64 n x D, the pooling of ``MeanFeatures``)."""

    image_ids: list[str]
    labels: np.ndarray
    groups: np.ndarray
    pooled: np.ndarray | None = None

    def subset(self, indices: np.ndarray) -> "TrainingSide":
        """These images only (an inner fold's training images)."""
        return TrainingSide(
            image_ids=[self.image_ids[i] for i in indices],
            labels=self.labels[indices],
            groups=self.groups[indices],
            pooled=None if self.pooled is None else self.pooled[indices],
        )


def training_images(datamodule: Any) -> Dataset:
    """Every image of the training side of a set-up features DataModule: its train images
    and the val carve-out. Val chooses the epoch of a model trained the usual way; a fit
    whose choice is made by inner CV reads no val, so its images train it too."""
    return ConcatDataset([datamodule.datasets["train"], datamodule.datasets["val"]])


def training_side(datamodule: Any, pooled: bool = False) -> TrainingSide:
    """The training side (``training_images``), read one image at a time (memory holds the
    pooled vectors, not the sequences); ``pooled`` adds each image's mean feature."""
    dataset = training_images(datamodule)
    prepared = datamodule.prepared
    groups = prepared.split_spec.groups_of(prepared.entries) or {}
    ids, labels, means = [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        ids.append(sample["image_id"])
        labels.append(int(sample["y"]))
        if pooled:
            means.append(torch.as_tensor(sample["x"]).double().mean(0).numpy())  # D
    return TrainingSide(
        image_ids=ids,
        labels=np.array(labels, dtype=np.int64),
        groups=np.array([groups.get(i, i) for i in ids]),
        pooled=np.stack(means) if pooled else None,
    )


def inner_splits(
    labels: np.ndarray, groups: np.ndarray, folds: int, seed: int, setting: str
) -> list[Split]:
    """``folds`` class-stratified folds of whole source groups (``StratifiedGroupKFold``,
    seeded), as (training, held-out) index arrays. ``setting`` names the key that asked for
    them, for the errors.

    A class with fewer groups than folds leaves some folds without it (logged): each fold's
    balanced accuracy then averages the classes it holds, and its training images still
    hold every class that has two groups or more.

    Raises:
        ConfigError: ``folds`` is below 2.
        DataError: fewer source groups, or images of every class, than folds.
    """
    if folds < 2:
        raise ConfigError(f"{setting}={folds}: inner cross-validation needs at least 2 folds")
    found, largest = len(set(groups.tolist())), np.bincount(labels).max(initial=0)
    if found < folds or largest < folds:
        what = (
            f"{found} source group(s)"
            if found < folds
            else f"at most {largest} image(s) per class"
        )
        raise DataError(
            f"{setting}={folds}: the {len(labels)} training images it splits have {what}, "
            f"fewer than the folds; lower {setting} (or use finer data.groups)"
        )
    sources = {int(c): len(set(groups[labels == c].tolist())) for c in np.unique(labels)}
    if few := {c: n for c, n in sources.items() if n < folds}:
        log.info(
            "%s=%d: class(es) %s have fewer source groups than folds (%s): some inner folds "
            "hold none of them",
            setting,
            folds,
            ", ".join(map(str, few)),
            ", ".join(map(str, few.values())),
        )
    dealer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return list(dealer.split(np.zeros(len(labels)), labels, groups))


def fold_balanced_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``labels`` (the report's balanced accuracy)."""
    confusion = confusion_matrix(labels, preds, labels=np.arange(num_classes))
    return float(balanced_accuracy(confusion))


def cross_validate(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    labels: np.ndarray,
    splits: Sequence[Split],
    num_classes: int,
) -> list[float]:
    """Each fold's balanced accuracy: ``fit_predict(train, held)`` fits on the training
    indices and returns the predicted classes of the held-out ones."""
    return [
        fold_balanced_accuracy(labels[held], fit_predict(train, held), num_classes)
        for train, held in splits
    ]
