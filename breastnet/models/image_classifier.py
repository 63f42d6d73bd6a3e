"""The image-level LightningModule: an aggregator over each image's patch sequence.

By default it trains on the features stage's cached ``[N, D]`` sequences (seconds per epoch);
given a backbone it runs the patch CNN too and trains both as one (the CNN+BiLSTM end to end).
Metrics, logging and the optimizer/scheduler handling are ``ClassifierModule``'s, as for patches.
"""

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from breastnet.models.aggregators import Vote
from breastnet.models.backbone import PatchNet
from breastnet.models.classifier import ClassifierModule
from breastnet.models.embedding import embed_patches, scatter_patches


class ImageClassifier(ClassifierModule):
    """Cross-entropy training of an aggregator (``breastnet.models.aggregators``) on images.

    Batches are dicts with ``mask`` (B x N bool, True on real patches), ``pos`` (B x N x 2),
    ``y`` (B) and ``image_id``. On cached features ``x`` is float B x N x D and ``probs``
    B x N x C; end to end (``backbone`` given) ``x`` is uint8 B x N x 3 x S x S and the backbone
    makes the features and probs. An aggregator with nothing to train (``mean``, ``vote``) on
    cached features still runs through ``Trainer.fit``, which then only computes metrics: no
    optimizer (Lightning steps a mock one) and no loss returned (Lightning skips backward).
    Automatic optimisation stays on, so trainer settings such as gradient clipping still apply.

    Args:
        aggregator: the image model proper (``breastnet.models.aggregators``).
        optimizer: partial optimizer, completed with the trainable parameters; only needed
            when there is something to train.
        scheduler: partial LR scheduler, as in ``PatchClassifier``; stepped per epoch.
        label_smoothing: cross-entropy label smoothing.
        backbone: the patch CNN, trained end to end with the aggregator. Its head only makes the
            probs that the parameter-free aggregators read, so under a learned aggregator it is
            frozen (it would get no gradient, which DDP rejects).
        chunk_size: patches per backbone forward call, which bounds its transient memory (not
            the activations autograd keeps for backward). BatchNorm sees batches of this size.
    """

    stage = "image"

    def __init__(
        self,
        aggregator: nn.Module,
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        backbone: PatchNet | None = None,
        chunk_size: int = 64,
    ):
        n = aggregator.num_classes
        super().__init__(n)
        self.save_hyperparameters(logger=False, ignore=["aggregator", "backbone"])
        self.aggregator = aggregator
        self.backbone = backbone
        if backbone is not None:
            if isinstance(aggregator, Vote):
                raise ValueError("a vote has no gradient: it cannot train a backbone end to end")
            if backbone.num_classes != n:
                raise ValueError(f"backbone has {backbone.num_classes} classes, aggregator {n}")
            backbone.drop_aux()
            if aggregator.trainable:
                for p in backbone.head_parameters():
                    p.requires_grad_(False)
        self.trainable = aggregator.trainable or (
            backbone is not None and any(p.requires_grad for p in backbone.parameters())
        )
        if self.trainable and optimizer is None:
            raise ValueError("an optimizer is needed: this model has parameters to train")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def forward(
        self, x: Tensor, mask: Tensor, pos: Tensor, probs: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The aggregator's output (``logits``, maybe ``attention``) for features or images."""
        if self.backbone is not None:
            x, probs = self.embed(x, mask)
        return self.aggregator(x, mask, pos, probs)

    def embed(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features (B x N x D) and probs (B x N x C) of uint8 B x N x 3 x S x S.

        Only real patches go through the backbone (padding costs nothing and stays out of its
        BatchNorm statistics), ``chunk_size`` at a time.
        """
        patches = x[mask]  # P x 3 x S x S, the P real patches in batch order
        features, probs = embed_patches(self.backbone, patches, self.hparams.chunk_size)
        return scatter_patches(features, mask), scatter_patches(probs, mask)

    def model_step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, logits and targets of a batch."""
        out = self(batch["x"], batch["mask"], batch["pos"], batch.get("probs"))
        return self.criterion(out["logits"], batch["y"]), out["logits"], batch["y"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """One optimisation step; with nothing to train, only the training metrics."""
        loss = super().training_step(batch, batch_idx)
        return loss if self.trainable else None

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Class probabilities (B x C) and attention (B x N, or None) of a batch of images."""
        out = self(batch["x"], batch["mask"], batch["pos"], batch.get("probs"))
        return {
            "probs": out["logits"].softmax(dim=1),
            "attention": out.get("attention"),
            "image_id": batch["image_id"],
            "y": batch.get("y"),
        }

    def configure_optimizers(self) -> dict[str, Any] | None:
        """The shared optimizer and per-epoch scheduler; None with nothing to train."""
        if not self.trainable:
            return None
        return super().configure_optimizers()
