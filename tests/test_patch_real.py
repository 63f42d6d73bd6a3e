"""Real bach-dev patches: a patch model overfits them; ImageNet features separate the classes.

Both tests are slow (real JPEG decoding and CNN passes on the CPU) and read the images in place
(``bach_dev`` fixture); the second also needs the shared ImageNet MobileNetV2 weight file.
"""

import os
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor
from torch.utils.data import DataLoader

from breastnet import CLASSES
from breastnet.models.backbone import Backbone, build_backbone
from breastnet.models.patch_classifier import PatchClassifier

ROOT = Path(__file__).resolve().parents[1]
SHARED_MOBILENET = Path(
    os.environ.get(
        "BREASTNET_WEIGHTS",
        ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet_bnfolded_fp16.pth",
    )
)
TILE = 512
"""Side of the tiles cut from the 1536 x 1536 BACH images (a 3 x 3 grid)."""

CENTRE = (1, 1)
CORNERS = ((0, 0), (2, 2))
"""Tiles by (row, column) in the 3 x 3 grid."""


def load_tiles(
    root: Path, per_class: int, tiles: tuple[tuple[int, int], ...], size: int
) -> tuple[Tensor, Tensor, np.ndarray]:
    """The first ``per_class`` images of each class, cut into ``tiles`` resized to ``size``.

    Returns:
        uint8 images [N, 3, size, size], int64 labels [N], and the source image of each tile
        (for grouped cross-validation).
    """
    from PIL import Image

    images, labels, groups = [], [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).glob("*.jpeg"))[:per_class]:
            with Image.open(path) as im:
                im = im.convert("RGB")  # decode once, crop each tile
                for row, col in tiles:
                    box = (col * TILE, row * TILE, (col + 1) * TILE, (row + 1) * TILE)
                    tile = np.asarray(im.crop(box))  # TILE x TILE x 3
                    images.append(cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA))
                    labels.append(label)
                    groups.append(f"{name}/{path.name}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # N x 3 x S x S
    return x, torch.tensor(labels), np.array(groups)


class LossHistory(pl.Callback):
    """Records the epoch-mean training loss after every training epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.slow
def test_patch_model_overfits_real_patches(bach_dev: Path) -> None:
    """A random-init MobileNetV2 fits 8 real 128 px patches (2 images per class) exactly."""
    start = time.perf_counter()
    pl.seed_everything(0, workers=True)
    x, y, _ = load_tiles(bach_dev, per_class=2, tiles=(CENTRE,), size=128)
    samples = [{"x": xi, "y": yi} for xi, yi in zip(x, y, strict=True)]
    loader = DataLoader(samples, batch_size=len(samples), shuffle=True)
    model = PatchClassifier(
        net=build_backbone("mobilenet_v2", weights="none"),
        optimizer=partial(torch.optim.Adam, lr=1e-3),
        scheduler=None,
    )
    history = LossHistory()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[history],
    )
    trainer.fit(model, train_dataloaders=loader)
    accuracy = (model.predict_proba(x).argmax(1) == y).float().mean().item()
    losses = history.losses
    print(
        f"\noverfit: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} epochs, "
        f"train accuracy {accuracy:.3f}, {time.perf_counter() - start:.1f} s"
    )
    assert len(losses) == trainer.max_epochs
    assert losses[-1] < 0.2 * losses[0]
    assert accuracy == 1.0


def probe_accuracy(net: Backbone, x: Tensor, y: Tensor, groups: np.ndarray) -> float:
    """5-fold (stratified, by image) accuracy of a logistic probe on eval-mode pooled features."""
    net.eval()
    with torch.no_grad():
        features = torch.cat([net.forward_features(net.normalize(b)) for b in x.split(40)])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    scores = cross_val_score(probe, features.numpy(), y.numpy(), groups=groups, cv=folds)
    return float(scores.mean())


@pytest.mark.slow
def test_shared_imagenet_weights_separate_classes(bach_dev: Path) -> None:
    """A linear probe on ImageNet MobileNetV2 features beats one on random-init features."""
    if not SHARED_MOBILENET.is_file():
        pytest.skip(f"shared ImageNet weights not found at {SHARED_MOBILENET} (BREASTNET_WEIGHTS)")
    start = time.perf_counter()
    x, y, groups = load_tiles(bach_dev, per_class=20, tiles=CORNERS, size=224)
    torch.manual_seed(0)
    pretrained = build_backbone("mobilenet_v2", weights=SHARED_MOBILENET, freeze_bn=True)
    random_init = build_backbone("mobilenet_v2", weights="none")
    pretrained_acc = probe_accuracy(pretrained, x, y, groups)
    random_acc = probe_accuracy(random_init, x, y, groups)
    print(
        f"\nlinear probe on {len(y)} tiles of {len(set(groups))} images: ImageNet "
        f"{pretrained_acc:.3f}, random init {random_acc:.3f}, {time.perf_counter() - start:.1f} s"
    )
    assert pretrained_acc >= 0.6
    assert pretrained_acc >= random_acc + 0.15
