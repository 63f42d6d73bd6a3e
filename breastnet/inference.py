"""The trained pipeline of one config, applied to images: what evaluate and predict share.

Everything comes from ``work_dir`` as the earlier stages left it: the Macenko reference fitted
at prepare time, the tiling, the patch CNN (or, end to end, the image model's own CNN) and the
image model. A new image goes through exactly the steps a training image went through.
"""

from functools import cached_property

import numpy as np
import torch
from omegaconf import DictConfig

from breastnet.data.datamodule import BreastDataModule, pad_collate
from breastnet.data.store import normalise_and_tile
from breastnet.models.backbone import Backbone
from breastnet.reporting import ImageResult
from breastnet.stages import features, image


class TrainedPipeline:
    """Stain normaliser, tiling, patch CNN and image model, as trained for ``cfg``.

    Args:
        cfg: the composed config the models were trained with.
        datamodule: a set-up ``BreastDataModule`` of that config (it knows the cache, split
            and stain reference, and so the artifact hashes).
    """

    def __init__(self, cfg: DictConfig, datamodule: BreastDataModule) -> None:
        self.cfg, self.datamodule = cfg, datamodule
        self.image_model = image.load_model(cfg, datamodule)
        self.end_to_end = self.image_model.backbone is not None
        self.device = next(self.image_model.parameters(), torch.empty(0)).device
        self.normalizer = datamodule.stain.normalizer()
        self.tiling = datamodule.tiling
        # End to end the model learnt from single views; on cached features, from what the
        # features stage made (its TTA setting).
        self.tta = cfg.features.tta and not self.end_to_end
        self.batch_size = cfg.features.batch_size

    @cached_property
    def net(self) -> Backbone:
        """The CNN that embeds patches: the image model's own end to end, else the patch
        model's (loaded on first use: evaluate on cached features never needs it)."""
        if self.end_to_end:
            return self.image_model.backbone
        return features.load_patch_model(self.cfg, self.datamodule).net

    def tile(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised patches [N, S, S, 3] uint8 and grid positions [N, 2] of an RGB image."""
        return normalise_and_tile(rgb, self.tiling, self.normalizer)

    def embed(self, patches: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [N, D] and class probabilities [N, C] of patches [N, S, S, 3] uint8."""
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(patches, -1, 1)))
        return features.embed(self.net.eval(), x, self.batch_size, self.tta)

    @torch.no_grad()
    def classify(
        self, feats: torch.Tensor, probs: torch.Tensor, positions: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image class probabilities [C] and attention [N] (or None) from patch outputs."""
        batch = pad_collate(
            [{"x": feats, "probs": probs, "pos": positions, "y": -1, "image_id": ""}]
        )
        out = self.image_model.aggregator(
            *(batch[k].to(self.device) for k in ("x", "mask", "pos", "probs"))
        )
        attention = out.get("attention")
        return (
            out["logits"].softmax(1)[0].cpu().numpy(),
            None if attention is None else attention[0].cpu().numpy(),
        )

    def result(
        self,
        image_id: str,
        path: str,
        label: int | None,
        positions: np.ndarray,
        tissue: np.ndarray,
        patches: np.ndarray | None = None,
        cached: dict | None = None,
    ) -> ImageResult:
        """Everything the report needs about one image, from its features-stage entry
        (``cached``: features and probabilities made once) or else by embedding ``patches``."""
        if cached is None:
            feats, probs = self.embed(patches)
        else:
            feats, probs = cached["features"], cached["probs"]
        image_probs, attention = self.classify(feats, probs, torch.as_tensor(positions))
        return ImageResult(
            image_id=image_id,
            path=path,
            label=label,
            probs=image_probs,
            patch_probs=probs.numpy(),
            positions=np.asarray(positions),
            tissue=np.asarray(tissue),
            features=feats.numpy(),
            attention=attention,
        )
