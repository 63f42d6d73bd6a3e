"""Model selection: ``best.ckpt`` is the most accurate epoch, the lowest val loss among equals."""

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from breastnet.models.classifier import ClassifierModule, selection_score
from breastnet.stages.common import train_and_test

# Per epoch: validation samples right (of 4) and the logit margin of the right ones.
SCRIPT = [(3, 0.1), (4, 0.1), (3, 10.0), (4, 2.0), (4, 1.0), (4, 0.5), (4, 5.0), (4, 5.0)]


def score(acc: float, loss: float, n: int = 40) -> float:
    return float(selection_score(torch.tensor(acc), torch.tensor(loss), torch.tensor(n)))


def test_selection_score_orders_by_accuracy_then_loss() -> None:
    assert score(21 / 40, math.inf) > score(20 / 40, 0.0)  # one more right beats any loss
    assert score(0.5, 0.1) > score(0.5, 0.2) > score(0.5, 100.0)
    assert score(0.5, float("nan")) == score(0.5, math.inf) > score(0.5 - 1 / 40, 0.0)
    assert score(0.5, 0.0) == 0.5


class Scripted(ClassifierModule):
    """Logits that follow ``SCRIPT`` by epoch; the one wrong sample, if any, has margin 0.1."""

    stage = "image"

    def __init__(self) -> None:
        super().__init__(num_classes=4)
        self.bias = nn.Parameter(torch.zeros(4))  # something to optimise (at lr 0)

    def model_step(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        y = batch["y"]
        right, margin = SCRIPT[min(self.current_epoch, len(SCRIPT) - 1)]
        is_right = torch.arange(len(y)) < right
        pred = torch.where(is_right, y, (y + 1) % 4)
        scale = torch.where(is_right, margin, 0.1)
        logits = F.one_hot(pred, 4) * scale[:, None] + self.bias
        return F.cross_entropy(logits, y), logits, y

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class FourImages(pl.LightningDataModule):
    batch_size_per_device = 4

    def loader(self) -> DataLoader:
        return DataLoader([{"y": torch.tensor(c)} for c in range(4)], batch_size=4)

    train_dataloader = val_dataloader = test_dataloader = loader


def test_best_is_the_lowest_loss_of_the_most_accurate_epochs(tmp_path: Path) -> None:
    """Epoch 1 reaches 4/4 first, epoch 2 has a lower loss at 3/4, epoch 3 the lowest loss at
    4/4; early stopping (patience 2) counts loss gains at equal accuracy, so it stops after
    epoch 5, where accuracy alone would have stopped after epoch 3."""
    trainer = {
        "_target_": "pytorch_lightning.Trainer",
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": len(SCRIPT),
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    cfg = OmegaConf.create({"seed": 0, "trainer": trainer, "logger": None})
    metrics = train_and_test(cfg, Scripted(), FourImages(), tmp_path, "image", 2)
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["epoch"] == 3
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 5
    assert metrics["image/val_acc_best"] == pytest.approx(1.0)
