"""Stage ``features``: pooled CNN features and class probabilities of every patch, once.

With the best patch checkpoint, every image of every split gets its ``[N, D]`` feature
sequence (row-major grid order), grid positions and patch probabilities, saved in
``work_dir/features/<hash>.pt``: the image model and the plots read them without the CNN.
"""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from tqdm import tqdm

from breastnet import CLASSES
from breastnet.artifacts import atomic_write, config_hash, write_json
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.splits import SIDES
from breastnet.models.backbone import Backbone
from breastnet.models.patch_classifier import PatchClassifier
from breastnet.stages import patch
from breastnet.stages.common import finished_metrics

log = logging.getLogger(__name__)


def dihedral(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 8 rotations/flips of a [B, C, H, W] batch (test-time augmentation)."""
    for k in range(4):
        rotated = torch.rot90(x, k, dims=(2, 3))
        yield rotated
        yield rotated.flip(3)


@torch.no_grad()
def embed(
    net: Backbone, patches: torch.Tensor, batch_size: int, tta: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] and probabilities [N, C] of uint8 patches [N, 3, S, S], chunked.

    ``net`` must be in eval mode; it stays on its device, the results come back on the CPU.
    """
    device = next(net.parameters()).device
    features, probs = [], []
    for chunk in patches.split(batch_size):
        views = [v.to(device) for v in (dihedral(chunk) if tta else [chunk])]
        view_features = [net.forward_features(net.normalize(v)) for v in views]  # each B x D
        view_probs = [net.forward_head(f).softmax(1) for f in view_features]
        features.append(torch.stack(view_features).mean(0).float().cpu())
        probs.append(torch.stack(view_probs).mean(0).float().cpu())
    return torch.cat(features), torch.cat(probs)


def artifact_path(cfg: DictConfig, datamodule: BreastDataModule) -> Path:
    """``work_dir/features/<hash>.pt``, keyed by the patch model and the TTA setting."""
    key = config_hash({"patch": patch.artifact_dir(cfg, datamodule).name, "tta": cfg.features.tta})
    return datamodule.work_dir / "features" / f"{key}.pt"


def load_patch_model(cfg: DictConfig, datamodule: BreastDataModule) -> PatchClassifier:
    """The best checkpoint of the patch stage for this config, in eval mode."""
    patch_dir = patch.artifact_dir(cfg, datamodule)
    if finished_metrics(patch_dir) is None:
        raise FileNotFoundError(
            f"no finished patch model in {patch_dir}: run the patch stage first"
        )
    net = instantiate(cfg.patch_model.net, weights="none")  # the checkpoint holds the weights
    model = PatchClassifier.load_from_checkpoint(
        patch_dir / "best.ckpt", net=net, map_location="cpu", weights_only=False
    )
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def run(cfg: DictConfig) -> dict[str, float]:
    """Extract (or reuse) features of every image; returns patch-wise accuracy per split."""
    if rank_zero_only.rank != 0:  # ranks > 0 of a `ddp` launch: rank 0 does this alone
        return {}
    datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
    datamodule.setup()
    out = artifact_path(cfg, datamodule)
    summary = out.with_suffix(".json")
    if out.is_file() and summary.is_file():
        log.info("features already extracted: %s", out)
        return json.loads(summary.read_text())

    model = load_patch_model(cfg, datamodule)
    labels = {e.image_id: e.label_index for e in datamodule.entries}
    images, metrics = {}, {}
    for side in SIDES:
        right = counted = 0
        for image_id in tqdm(datamodule.split[side], desc=f"features {side}", unit="img"):
            record = datamodule.records[image_id]
            patches = np.moveaxis(np.array(datamodule.cache.load(image_id)), -1, 1)
            features, probs = embed(
                model.net, torch.from_numpy(patches), cfg.features.batch_size, cfg.features.tta
            )
            tissue = torch.tensor(record["tissue"])
            counted_patches = tissue >= datamodule.hparams.min_tissue
            right += int((probs.argmax(1)[counted_patches] == labels[image_id]).sum())
            counted += int(counted_patches.sum())
            images[image_id] = {
                "features": features,  # N x D
                "probs": probs,  # N x C
                "positions": torch.tensor(record["positions"]),  # N x 2 (row, col)
                "tissue": tissue,
                "label": labels[image_id],
                "split": side,
            }
        metrics[f"features/patch_acc_{side}"] = right / max(counted, 1)
    saved = {"classes": list(CLASSES), "tta": cfg.features.tta, "images": images}
    atomic_write(out, lambda f: torch.save(saved, f))
    write_json(summary, metrics)
    return metrics
