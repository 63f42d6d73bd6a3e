"""The LightningModule that ``Trainer.predict`` runs over whole images.

One device placement, precision (bf16 autocast on GPU) and sampler for the features,
evaluate and predict stages; ``breastnet.inference.runner`` runs it on every rank.
"""

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from breastnet.models.backbone import PatchNet
from breastnet.models.embedding import embed_patches, scatter_patches


def _float32(value: Any) -> Any:
    """bf16/fp16 outputs (autocast) as float32; everything else as it is."""
    return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value


class Embedder(pl.LightningModule):
    """``Trainer.predict`` over batches of whole images (``pad_collate``'d).

    With ``net`` the batch holds uint8 patches, embedded here; without it, cached features and
    probabilities. With ``aggregator`` (an image model's), each image also gets its class
    probabilities and, for attention-MIL, its attention. Returns one dict per image, float32
    on the CPU, padding removed.
    """

    def __init__(
        self,
        net: PatchNet | None = None,
        aggregator: torch.nn.Module | None = None,
        chunk_size: int = 64,
        tta: bool = False,
    ) -> None:
        super().__init__()
        self.net, self.aggregator = net, aggregator
        self.chunk_size, self.tta = chunk_size, tta

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        mask = batch["mask"]  # B x N
        valid = mask.any(1)  # images with patches (an unreadable file has none)
        if self.net is None:
            features, probs = batch["x"], batch["probs"]  # B x N x D, B x N x C
        elif mask.any():
            features, probs = embed_patches(self.net, batch["x"][mask], self.chunk_size, self.tta)
            features, probs = scatter_patches(features, mask), scatter_patches(probs, mask)
        else:
            features = probs = mask.new_zeros((*mask.shape, 0), dtype=torch.float)
        per_patch = {"features": features, "probs": probs}
        per_patch |= {k: batch[k] for k in ("pos", "tissue") if k in batch}
        per_image = {}
        if self.aggregator is not None and valid.any():
            result = self.aggregator(
                features[valid], mask[valid], batch["pos"][valid], probs[valid]
            )
            per_image["image_probs"] = scatter_patches(result["logits"].softmax(1), valid)
            if (attention := result.get("attention")) is not None:  # n_valid x N
                per_patch["attention"] = attention.new_zeros(mask.shape)
                per_patch["attention"][valid] = attention
        images = []
        for b, image_id in enumerate(batch["image_id"]):
            n = int(mask[b].sum())
            image: dict[str, Any] = {"image_id": image_id}
            if batch.get("error") and batch["error"][b]:
                image["error"] = batch["error"][b]
            image |= {k: v[b, :n].cpu() for k, v in per_patch.items()}
            image |= {k: v[b].cpu() for k, v in per_image.items()}
            images.append({k: _float32(v) for k, v in image.items()})
        return images


# What each model of an ensemble gives an image of its own; the rest (id, grid, tissue, error)
# comes from the tiles, which the models share.
MEMBER_KEYS = ("features", "probs", "image_probs", "attention")


def stack(outputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several models' outputs of one image as one, ``MEMBER_KEYS`` stacked (model first)."""
    first = outputs[0]
    stacked = {k: torch.stack([o[k] for o in outputs]) for k in MEMBER_KEYS if k in first}
    return first | stacked


def unstack(output: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The ``n`` models' outputs of one image, from ``stack``'s."""
    own = [k for k in MEMBER_KEYS if k in output]
    return [output | {k: output[k][i] for k in own} for i in range(n)]


class StackedEmbedder(pl.LightningModule):
    """Several ``Embedder``s on each batch, so that tiles made once serve every model; returns
    one ``stack``'ed dict per image."""

    def __init__(self, embedders: Sequence[Embedder]) -> None:
        super().__init__()
        self.embedders = torch.nn.ModuleList(embedders)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        per_model = [e.predict_step(batch, batch_idx) for e in self.embedders]
        return [stack(images) for images in zip(*per_model, strict=True)]
