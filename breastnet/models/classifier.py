"""What the patch and image LightningModules share: metrics, logging, optimizer and scheduler.

Both classify into the same classes and are compared on the same numbers, so their validation
and test metrics are computed and logged in one place.
"""

import inspect
import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MaxMetric, MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

from breastnet import CLASSES


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


def selection_score(acc: Tensor, loss: Tensor, n: Tensor) -> Tensor:
    """Validation accuracy with ties broken by loss: ``acc - (1 - 1 / (1 + loss)) / (2 n)``.

    Accuracy moves in steps of one sample, ``1 / n``; the loss term stays in ``[0, 1 / (2 n)]``,
    so no loss outweighs one more sample right, and among epochs of equal accuracy the lower
    loss wins (first-reached accuracy alone picks an early epoch with near-uniform outputs).
    A NaN loss counts as the worst.
    """
    loss = torch.nan_to_num(loss, nan=math.inf)
    return acc - (1 - 1 / (1 + loss)) / (2 * n)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier base: subclasses implement ``model_step``, this logs the rest.

    Subclasses set ``stage`` and save ``optimizer`` and ``scheduler`` hyperparameters
    (partials, as in the configs) for ``configure_optimizers``. Metrics are logged as
    ``<stage>/<split>_<name>`` (``patch/train_loss``, ``image/val_acc``): the patch and image
    models of one job share a W&B run, and the best ones (``<stage>/val_acc_best``,
    ``<stage>/test_acc``) are the keys the stage returns. ``<stage>/val_select``
    (``selection_score``) picks ``best.ckpt``.

    Args:
        num_classes: number of classes; with ``len(CLASSES)`` the recalls are logged by name.
    """

    stage: str

    def __init__(self, num_classes: int):
        super().__init__()
        n = num_classes
        self.class_names = list(CLASSES) if n == len(CLASSES) else [str(i) for i in range(n)]

        # Micro accuracy (fraction of samples right); torchmetrics' default "macro" would be
        # balanced accuracy, which per-class recall already shows.
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_recall = MulticlassRecall(num_classes=n, average=None)
        self.test_recall = MulticlassRecall(num_classes=n, average=None)
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_count = SumMetric()
        self.val_acc_best = MaxMetric()

    def model_step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, logits and targets of a batch; each subclass reads its own batches."""
        raise NotImplementedError

    def on_train_start(self) -> None:
        """Forget what the sanity check put into the validation metrics."""
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_recall.reset()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """One optimisation step: the loss, with training loss and accuracy logged."""
        loss, logits, y = self.model_step(batch)
        self.train_loss(loss)
        self.train_acc(logits, y)
        s = self.stage
        self.log(f"{s}/train_loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{s}/train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Update validation loss, accuracy, per-class recall and sample count."""
        loss, logits, y = self.model_step(batch)
        self.val_loss(loss)
        self.val_acc(logits, y)
        self.val_recall.update(logits, y)
        self.val_count.update(len(y))
        s = self.stage
        self.log(f"{s}/val_loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{s}/val_acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        """Log the selection score, the best validation accuracy so far and per-class recall.

        Not in the sanity check: its few batches are no epoch to select or to remember.
        """
        if not self.trainer.sanity_checking:
            acc = self.val_acc.compute()
            score = selection_score(acc, self.val_loss.compute(), self.val_count.compute())
            self.log(f"{self.stage}/val_select", score, sync_dist=True)
            self.val_acc_best(acc)
            best = self.val_acc_best.compute()
            self.log(f"{self.stage}/val_acc_best", best, sync_dist=True, prog_bar=True)
        self.val_count.reset()
        self._log_recall("val", self.val_recall)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the best validation accuracy (metric states are not in the state dict), so a
        resumed fit counts the epochs before the interruption."""
        checkpoint["val_acc_best"] = float(self.val_acc_best.max_value)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the best validation accuracy of a checkpoint that has one."""
        if "val_acc_best" in checkpoint:
            self.val_acc_best.reset()
            self.val_acc_best.update(checkpoint["val_acc_best"])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Update test loss, accuracy and per-class recall."""
        loss, logits, y = self.model_step(batch)
        self.test_loss(loss)
        self.test_acc(logits, y)
        self.test_recall.update(logits, y)
        self.log(f"{self.stage}/test_loss", self.test_loss, on_step=False, on_epoch=True)
        self.log(f"{self.stage}/test_acc", self.test_acc, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        """Log the per-class test recall."""
        self._log_recall("test", self.test_recall)

    def _log_recall(self, split: str, metric: MulticlassRecall) -> None:
        # A vector metric cannot go through self.log, so compute (synced), log, reset.
        for name, value in zip(self.class_names, metric.compute(), strict=True):
            self.log(f"{self.stage}/{split}_recall_{name}", value)
        metric.reset()

    def optimizer_params(self) -> list[Any]:
        """What the optimizer updates: the trainable parameters (or their groups)."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over trainable parameters only, and the per-epoch scheduler.

        The scheduler partial gets ``max_epochs`` from the trainer when it takes one and the
        config leaves it out, so one config serves any run length.
        """
        optimizer = self.hparams.optimizer(params=self.optimizer_params())
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
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": "epoch",
                "monitor": f"{self.stage}/val_loss",
            },
        }
