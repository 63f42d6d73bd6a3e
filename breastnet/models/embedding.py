"""The one path from uint8 patches to features and probabilities, for training and inference.

``embed_patches`` is called by the end-to-end image model in training and by ``Embedder``,
the LightningModule that ``Trainer.predict`` runs for the features, evaluate and predict
stages: one device placement, precision (bf16 autocast on GPU) and sampler for all of them.
"""

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from breastnet.models.backbone import PatchNet


def dihedral(x: Tensor) -> Iterator[Tensor]:
    """The 8 rotations/flips of a [B, C, H, W] batch (test-time augmentation)."""
    for k in range(4):
        rotated = torch.rot90(x, k, dims=(2, 3))
        yield rotated
        yield rotated.flip(3)


def embed_patches(
    net: PatchNet, patches: Tensor, chunk_size: int, tta: bool = False
) -> tuple[Tensor, Tensor]:
    """Features [P, D] and class probabilities [P, C] of uint8 patches [P, 3, S, S].

    With ``tta`` both are means over the 8 dihedral views of each patch. ``chunk_size`` images
    per forward call, views included, bound the transient memory (and, on a CPU, the batch:
    MobileNetV2 at 224 px ran 48 img/s in batches of 8, 32 at 64, 21 at 256 on 2 cores).
    """
    views = 8 if tta else 1
    features, probs = [], []
    for chunk in patches.split(max(1, chunk_size // views)):
        views = list(dihedral(chunk)) if tta else [chunk]
        view_features = [net.forward_features(net.normalize(v)) for v in views]  # each B x D
        view_probs = [net.forward_head(f).softmax(1) for f in view_features]  # each B x C
        features.append(torch.stack(view_features).mean(0))
        probs.append(torch.stack(view_probs).mean(0))
    return torch.cat(features), torch.cat(probs)


def scatter_patches(values: Tensor, mask: Tensor) -> Tensor:
    """Values of the real patches, P x K, back into a zero-padded B x N x K batch."""
    out = values.new_zeros((*mask.shape, values.shape[-1]))  # B x N x K
    out[mask] = values
    return out


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
