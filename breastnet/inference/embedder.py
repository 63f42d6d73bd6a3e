"""The LightningModule that ``Trainer.predict`` runs over whole images.

One device placement, precision (bf16 autocast on GPU) and sampler for the features,
evaluate and predict stages; ``breastnet.inference.runner`` runs it on every rank.

``features.view`` says what an image's rows embed: its tiles, the whole image (the tiles
stitched back at their grid positions and resized to one patch, as eva embeds an image) or
both side by side; the features stage and predict build their ``Embedder`` with the same view.
"""

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import Tensor

from breastnet.errors import ConfigError
from breastnet.models.aggregators import masked_mean
from breastnet.models.backbone import PatchNet
from breastnet.models.embedding import embed_patches, scatter_patches

VIEWS = ("tiles", "whole", "both")


def _float32(value: Any) -> Any:
    """bf16/fp16 outputs (autocast) as float32; everything else as it is."""
    return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value


def view_settings(cfg: DictConfig) -> dict[str, Any]:
    """The ``Embedder``'s ``view`` (``features.view``) and ``step``, the stride in patch pixels
    that stitches the tiles back into the image.

    Raises:
        ConfigError: an unknown view, or a whole-image view of tiles with gaps between them.
    """
    view, data = cfg.features.view, cfg.data
    if view not in VIEWS:
        raise ConfigError(f"features.view must be one of {', '.join(VIEWS)}, got {view!r}")
    if view != "tiles" and data.stride > data.tile_size:
        raise ConfigError(
            f"features.view={view} stitches the tiles back into the image, but "
            f"data.stride={data.stride} leaves gaps between tiles of data.tile_size="
            f"{data.tile_size}: set data.stride <= data.tile_size, or features.view=tiles"
        )
    return {"view": view, "step": round(data.stride * data.patch_size / data.tile_size)}


def whole_image(patches: Tensor, positions: Tensor, step: int | None = None) -> Tensor:
    """The image that uint8 patches [P, 3, S, S] at grid ``positions`` [P, 2] (row, col) were
    cut from, as one uint8 [3, S, S] patch: the mosaic of the patches placed every ``step`` px
    (the stride at patch scale; ``S`` for tiles that meet, overlaps overwritten in order),
    resized with ``cv2.INTER_AREA``. A trimmed grid's mosaic is the tiled field."""
    size = patches.shape[-1]
    step = step or size
    rows, cols = (positions.max(0).values + 1).tolist()
    mosaic = np.zeros(((rows - 1) * step + size, (cols - 1) * step + size, 3), np.uint8)
    pixels = patches.permute(0, 2, 3, 1).cpu().numpy()  # P x S x S x 3
    for patch, (r, c) in zip(pixels, positions.tolist(), strict=True):
        mosaic[r * step : r * step + size, c * step : c * step + size] = patch
    resized = cv2.resize(mosaic, (size, size), interpolation=cv2.INTER_AREA)  # S x S x 3
    return torch.from_numpy(resized).permute(2, 0, 1).to(patches.device)


class Embedder(pl.LightningModule):
    """``Trainer.predict`` over batches of whole images (``pad_collate``'d).

    With ``net`` the batch holds uint8 patches, embedded here as ``view`` says (``VIEWS``;
    ``whole``: one row per image, on no tile, so without ``pos``, its tissue the tiles' mean;
    ``both``: each tile's features then the whole image's, probabilities the tiles'); without
    it, cached features and probabilities. With ``aggregator`` (an image model's), each image
    also gets its class probabilities and, for attention-MIL, its attention. Returns one dict
    per image, float32 on the CPU, padding removed.
    """

    def __init__(
        self,
        net: PatchNet | None = None,
        aggregator: torch.nn.Module | None = None,
        chunk_size: int = 64,
        tta: bool = False,
        view: str = "tiles",
        step: int | None = None,
    ) -> None:
        super().__init__()
        self.net, self.aggregator = net, aggregator
        self.chunk_size, self.tta, self.view, self.step = chunk_size, tta, view, step

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        mask, pos = batch["mask"], batch["pos"]  # B x N, B x N x 2
        valid = mask.any(1)  # images with patches (an unreadable file has none)
        grid = {k: batch[k] for k in ("pos", "tissue") if k in batch}
        if self.net is None:
            features, probs = batch["x"], batch["probs"]  # B x N x D, B x N x C
        else:
            features, probs = self._embed(batch["x"], pos, mask)
        if self.net is not None and self.view == "whole":  # one row: the image, on no tile
            pos = pos.new_zeros((len(mask), 1, 2))  # the aggregator's (0, 0)
            tissue = grid.get("tissue")
            grid = {} if tissue is None else {"tissue": masked_mean(tissue[..., None], mask)}
            mask = valid[:, None]  # B x 1
        per_patch = {"features": features, "probs": probs, **grid}
        per_image = {}
        if self.aggregator is not None and valid.any():
            result = self.aggregator(features[valid], mask[valid], pos[valid], probs[valid])
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

    def _embed(self, x: Tensor, pos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Features and probabilities of the view, zero-padded: B x N x D and B x N x C for
        tiles, B x 1 x D and B x 1 x C for the whole image, B x N x 2D and B x N x C for both."""
        if not mask.any():
            empty = mask.new_zeros((*mask.shape, 0), dtype=torch.float)
            return empty, empty
        if self.view != "whole":
            features, probs = embed_patches(self.net, x[mask], self.chunk_size, self.tta)
            tiles = scatter_patches(features, mask), scatter_patches(probs, mask)
            if self.view == "tiles":
                return tiles
        valid = mask.any(1)
        images = torch.stack(
            [whole_image(x[b][mask[b]], pos[b][mask[b]], self.step) for b in valid.nonzero()[:, 0]]
        )  # n_valid x 3 x S x S
        features, probs = embed_patches(self.net, images, self.chunk_size, self.tta)
        whole = scatter_patches(features, valid)[:, None], scatter_patches(probs, valid)[:, None]
        if self.view == "whole":
            return whole
        beside = whole[0].expand(-1, mask.shape[1], -1) * mask[..., None]  # B x N x D
        return torch.cat([tiles[0], beside], 2), tiles[1]


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
