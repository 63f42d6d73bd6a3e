"""The patch-level LightningModule: fine-tunes a backbone on patches labelled by their image.

Its features and probabilities for the image model come from ``models.embedding``.
"""

from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from breastnet.models.backbone import PatchNet
from breastnet.models.classifier import ClassifierModule, warmup_cosine

# warmup_cosine stays importable here: older checkpoints (pickled hparams) and run configs
# name it by this path.
__all__ = ["PatchClassifier", "warmup_cosine"]


class PatchClassifier(ClassifierModule):
    """Cross-entropy fine-tuning of a ``PatchNet`` on dict batches of uint8 patches.

    Batches are ``{"x": uint8 [B, 3, S, S], "y": int64 [B], ...}``; images are normalised here,
    on the device. ``forward`` takes the same uint8 (or 0..1 float) images.

    Args:
        net: the backbone (``breastnet.models.backbone.build_backbone`` or
            ``breastnet.models.timm_backbone.build_timm_backbone``).
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
        freeze: a fixed encoder (``PatchNet.freeze``): nothing trains, the patch stage skips
            it, and the features come straight from the loaded weights.
        layer_decay: layer-wise lr decay of a timm backbone: the head and last block at the
            optimizer's lr, each earlier block ``layer_decay`` x the next (None: one lr).
    """

    stage = "patch"

    def __init__(
        self,
        net: PatchNet,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., Any] | None = None,
        aux_weight: float = 0.4,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        freeze_backbone_epochs: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        freeze: bool = False,
        layer_decay: float | None = None,
    ):
        n = net.num_classes
        super().__init__(n)
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        if aux_weight == 0:
            net.drop_aux()
        if freeze:
            net.freeze()
        if layer_decay is not None and not hasattr(net, "param_groups"):
            raise ValueError(
                f"patch_model.layer_decay needs a timm backbone (patch_model=timm or an encoder "
                f"entry), not torchvision {net.name}"
            )
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if class_weights is not None and len(class_weights) != n:
            raise ValueError(f"class_weights needs {n} values, got {len(class_weights)}")
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float)
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def setup(self, stage: str) -> None:
        """Check the datamodule's ``patch_size`` against the backbone before fitting; compile
        the net's forward once, when asked."""
        datamodule = self.trainer.datamodule
        if stage == "fit" and datamodule is not None and "patch_size" in datamodule.hparams:
            self.net.check_input_size(datamodule.hparams.patch_size)
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

    def optimizer_params(self) -> list[Any]:
        """Trainable parameters; with ``layer_decay``, timm's groups of decayed lr."""
        decay = self.hparams.layer_decay
        if decay is None:
            return super().optimizer_params()
        settings = getattr(self.hparams.optimizer, "keywords", {})
        return self.net.param_groups(settings["lr"], settings.get("weight_decay", 0.0), decay)

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
        return super().training_step(batch, batch_idx)
