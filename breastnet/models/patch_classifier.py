"""The patch-level LightningModule: fine-tunes a backbone on patches labelled by their image.

Its pooled features (``extract_features``, ``predict_step``) feed the image-level aggregator.
"""

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

from breastnet import CLASSES
from breastnet.models.backbone import Backbone


def warmup_cosine(
    optimizer: Optimizer, warmup_epochs: int = 1, max_epochs: int = 10, min_factor: float = 0.0
) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_factor`` x lr at ``max_epochs``; per epoch.

    The warm-up keeps the first updates, driven by a random new head, from wrecking the
    pretrained features.
    """
    if max_epochs < 1:
        raise ValueError(f"warmup_cosine needs a finite trainer.max_epochs, got {max_epochs}")
    warmup = min(warmup_epochs, max_epochs - 1)

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        progress = min((epoch - warmup) / (max_epochs - warmup), 1.0)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


class PatchClassifier(pl.LightningModule):
    """Cross-entropy fine-tuning of a ``Backbone`` on dict batches of uint8 patches.

    Batches are ``{"x": uint8 [B, 3, S, S], "y": int64 [B], ...}``; images are normalised here,
    on the device. Public calls (``forward``, ``extract_features``, ``predict_proba``) take the
    same uint8 (or 0..1 float) images.

    Args:
        net: the backbone (see ``breastnet.models.backbone.build_backbone``).
        optimizer: partial optimizer, completed with the trainable parameters.
        scheduler: partial LR scheduler, completed with the optimizer (and ``max_epochs`` from
            the trainer when it takes one and the config leaves it out); stepped per epoch.
        aux_weight: weight of Inception-V3's aux loss in training; 0 drops the aux head.
        label_smoothing: cross-entropy label smoothing.
        class_weights: per-class cross-entropy weights, in ``CLASSES`` order.
        freeze_backbone_epochs: train only the new head(s) for this many epochs, then all.
            Frozen parameters get no gradient, so under DDP use the
            ``ddp_find_unused_parameters_true`` strategy with it.
        channels_last: channels-last memory format for the net and inputs (faster with AMP).
        compile: ``torch.compile`` the net's forward in place (checkpoint keys unchanged).
    """

    def __init__(
        self,
        net: Backbone,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., Any] | None = None,
        aux_weight: float = 0.4,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        freeze_backbone_epochs: int = 0,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        if aux_weight == 0:
            net.drop_aux()
        if channels_last:
            net.to(memory_format=torch.channels_last)
        n = net.num_classes
        self.class_names = list(CLASSES) if n == len(CLASSES) else [str(i) for i in range(n)]
        if class_weights is not None and len(class_weights) != n:
            raise ValueError(f"class_weights needs {n} values, got {len(class_weights)}")
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float)
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

        # Micro accuracy (fraction of patches right); torchmetrics' default "macro" would be
        # balanced accuracy, which per-class recall already shows.
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_recall = MulticlassRecall(num_classes=n, average=None)
        self.test_recall = MulticlassRecall(num_classes=n, average=None)
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_acc_best = MaxMetric()

    def setup(self, stage: str) -> None:
        """Compile the net's forward once, when asked."""
        if self.hparams.compile:
            self.net.compile()

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Logits of uint8 images; ``(logits, aux_logits)`` for Inception-V3 in training."""
        return self.net(self._prepare(x))

    def _prepare(self, x: Tensor) -> Tensor:
        x = self.net.normalize(x)  # B x 3 x S x S float
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def model_step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, logits and targets of a batch; the aux loss counts only in training."""
        y = batch["y"]
        out = self(batch["x"])
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = self.criterion(logits, y)
        if aux is not None:
            loss = loss + self.hparams.aux_weight * self.criterion(aux, y)
        return loss, logits, y

    def on_train_start(self) -> None:
        """Forget what the sanity check put into the validation metrics."""
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_recall.reset()
        self.val_acc_best.reset()

    def on_train_epoch_start(self) -> None:
        """Hold the pretrained layers still for the first ``freeze_backbone_epochs``."""
        if self.hparams.freeze_backbone_epochs > 0:
            trainable = self.current_epoch >= self.hparams.freeze_backbone_epochs
            for p in self.net.trunk_parameters():
                p.requires_grad_(trainable)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """One optimisation step; a batch of one is skipped where aux BatchNorm can't take it."""
        if self.net.has_aux and not self.net.freeze_bn and len(batch["y"]) < 2:
            rank_zero_warn(
                "skipping a training batch of 1: Inception-V3's aux BatchNorm needs 2 or more "
                "samples (use drop_last=True in the training DataLoader)"
            )
            return None
        loss, logits, y = self.model_step(batch)
        self.train_loss(loss)
        self.train_acc(logits, y)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Update validation loss, accuracy and per-class recall."""
        loss, logits, y = self.model_step(batch)
        self.val_loss(loss)
        self.val_acc(logits, y)
        self.val_recall.update(logits, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        """Log the best validation accuracy so far and the per-class recall."""
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)
        self._log_recall("val", self.val_recall)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Update test loss, accuracy and per-class recall."""
        loss, logits, y = self.model_step(batch)
        self.test_loss(loss)
        self.test_acc(logits, y)
        self.test_recall.update(logits, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        """Log the per-class test recall."""
        self._log_recall("test", self.test_recall)

    def _log_recall(self, split: str, metric: MulticlassRecall) -> None:
        # A vector metric cannot go through self.log, so compute (synced), log, reset.
        for name, value in zip(self.class_names, metric.compute(), strict=True):
            self.log(f"{split}/recall_{name}", value)
        metric.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Class probabilities and pooled features of a batch, with its other keys passed on."""
        features = self.net.forward_features(self._prepare(batch["x"]))  # B x D
        probs = self.net.forward_head(features).softmax(dim=1)  # B x num_classes
        rest = {k: v for k, v in batch.items() if k != "x"}
        return {"probs": probs, "features": features, **rest}

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.net.train(training)

    def extract_features(self, x: Tensor) -> Tensor:
        """Eval-mode pooled features of uint8 images: B x feature_dim (2048 for Inception-V3)."""
        with self._evaluating():
            return self.net.forward_features(self._prepare(x))

    def predict_proba(self, x: Tensor) -> Tensor:
        """Eval-mode class probabilities of uint8 images: B x num_classes."""
        with self._evaluating():
            return self.net(self._prepare(x)).softmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over trainable parameters only, and the per-epoch scheduler."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.hparams.optimizer(params=params)
        make_scheduler = self.hparams.scheduler
        if make_scheduler is None:
            return {"optimizer": optimizer}
        kwargs = {}
        if "max_epochs" in inspect.signature(make_scheduler).parameters and "max_epochs" not in (
            getattr(make_scheduler, "keywords", {})
        ):
            kwargs["max_epochs"] = self.trainer.max_epochs
        scheduler = make_scheduler(optimizer=optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": "val/loss"},
        }
