"""The one path from uint8 patches to features and probabilities, for training and inference.

``embed_patches`` is called by the end-to-end image model in training and by
``breastnet.inference.embedder.Embedder``, the LightningModule that ``Trainer.predict`` runs
for the features, evaluate and predict stages. It stays with the models: the image model
needs it, and the inference package needs the models.
"""

from collections.abc import Iterator

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
