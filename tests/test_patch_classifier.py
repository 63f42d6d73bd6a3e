"""PatchClassifier: aux loss, micro accuracy, a fast_dev_run fit, backbone freeze, configs."""

import copy
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from breastnet.models.patch_classifier import PatchClassifier, warmup_cosine

from conftest import CONF, CPU_TRAINER, make_patch_model, patch_samples

TRAINER = CPU_TRAINER


@pytest.fixture(scope="module")
def inception() -> PatchClassifier:
    return make_patch_model("inception_v3")


def test_aux_loss_counts_only_in_training(inception: PatchClassifier) -> None:
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    y = torch.tensor([0, 2])
    batch = {"x": x, "y": y, "image_id": ["a", "b"]}
    inception.train()
    torch.manual_seed(0)  # same dropout draws in both passes
    loss, _, _ = inception.model_step(batch)
    torch.manual_seed(0)
    logits, aux = inception.net(inception.net.normalize(x))
    main_ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(loss - main_ce, 0.4 * F.cross_entropy(aux, y))

    inception.eval()
    eval_loss, eval_logits, _ = inception.model_step(batch)
    with torch.no_grad():
        torch.testing.assert_close(eval_loss, F.cross_entropy(eval_logits, y))


def test_batch_of_one_is_skipped_for_the_aux_head(inception: PatchClassifier) -> None:
    batch = {"x": torch.zeros(1, 3, 299, 299, dtype=torch.uint8), "y": torch.tensor([1])}
    inception.train()
    with pytest.warns(UserWarning, match="batch of 1"):
        assert inception.training_step(batch, 0) is None


def test_class_weights_and_label_smoothing() -> None:
    weights = [1.0, 2.0, 3.0, 4.0]
    model = make_patch_model(class_weights=weights, label_smoothing=0.1).eval()
    batch = {"x": torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), "y": torch.arange(4)}
    with torch.no_grad():
        loss, logits, y = model.model_step(batch)
    expected = F.cross_entropy(logits, y, weight=torch.tensor(weights), label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="class_weights"):
        make_patch_model(class_weights=[1.0, 2.0])


def test_val_acc_is_micro_not_balanced(monkeypatch: pytest.MonkeyPatch) -> None:
    """On imbalanced data micro accuracy (logged) and torchmetrics' macro default differ."""
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    preds = torch.zeros(8, dtype=torch.long)
    micro = MulticlassAccuracy(num_classes=4, average="micro")(preds, y)
    macro = MulticlassAccuracy(num_classes=4)(preds, y)
    assert micro == pytest.approx(0.75) and macro < 0.5

    model = make_patch_model()
    # The predicted class is written into pixel (0, 0) of each image.
    monkeypatch.setattr(model, "forward", lambda x: F.one_hot(x[:, 0, 0, 0].long(), 4) * 5.0)
    x = torch.zeros(8, 3, 64, 64, dtype=torch.uint8)
    x[:, 0, 0, 0] = preds.to(torch.uint8)
    data = [{"x": xi, "y": yi} for xi, yi in zip(x, y, strict=True)]
    (logged,) = pl.Trainer(**TRAINER).validate(model, DataLoader(data, batch_size=3))
    assert logged["patch/val_acc"] == pytest.approx(0.75)
    assert logged["patch/val_acc_best"] == pytest.approx(0.75)
    assert logged["patch/val_recall_Normal"] == pytest.approx(1.0)
    assert logged["patch/val_recall_Benign"] == pytest.approx(0.0)


def test_fast_dev_run_fit() -> None:
    model = make_patch_model(scheduler=partial(warmup_cosine, warmup_epochs=1))
    before = copy.deepcopy(model.net.state_dict())
    loader = DataLoader(patch_samples(4), batch_size=2)
    trainer = pl.Trainer(fast_dev_run=True, **TRAINER)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    after = model.net.state_dict()
    assert not torch.equal(before["model.features.0.0.weight"], after["model.features.0.0.weight"])
    assert not torch.equal(before["model.classifier.1.weight"], after["model.classifier.1.weight"])
    assert {"patch/train_loss", "patch/train_acc", "patch/val_loss", "patch/val_acc"} <= set(
        trainer.callback_metrics
    )


def test_channels_last_gives_the_same_logits() -> None:
    model = make_patch_model().eval()
    fast = make_patch_model(channels_last=True)
    fast.net.load_state_dict(model.net.state_dict())
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), model(x), rtol=1e-4, atol=1e-4)


class RecordTrunk(pl.Callback):
    """After each training epoch: did the trunk move, did the head move?"""

    def __init__(self) -> None:
        self.moved: list[tuple[bool, bool]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: PatchClassifier) -> None:
        self.trunk = [p.detach().clone() for p in pl_module.net.trunk_parameters()]
        self.head = pl_module.net.model.classifier[1].weight.detach().clone()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: PatchClassifier) -> None:
        trunk = pl_module.net.trunk_parameters()
        moved = any(not torch.equal(a, b) for a, b in zip(self.trunk, trunk, strict=True))
        head = pl_module.net.model.classifier[1].weight
        self.moved.append((moved, not torch.equal(self.head, head)))


def test_freeze_backbone_for_the_first_epoch() -> None:
    model = make_patch_model(freeze_backbone_epochs=1)
    record = RecordTrunk()
    trainer = pl.Trainer(
        max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[record], **TRAINER
    )
    trainer.fit(model, DataLoader(patch_samples(4), batch_size=2))
    assert record.moved == [(False, True), (True, True)]


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_epochs=2, max_epochs=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] > 0
    with pytest.raises(ValueError, match="max_epochs"):
        warmup_cosine(opt, max_epochs=-1)


TORCHVISION = sorted(
    p.stem
    for p in (CONF / "patch_model").glob("*.yaml")
    if "build_backbone" in p.read_text() or "  - inception_v3\n" in p.read_text()
)
"""The torchvision configs; the timm ones (ViT-g among them) are built on the meta device in
test_foundation.py."""


@pytest.mark.parametrize("name", TORCHVISION)
def test_patch_model_configs_instantiate(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF / "patch_model"), version_base="1.3"):
        cfg = compose(name, overrides=["net.weights=none"])
    model = instantiate(cfg)
    assert isinstance(model, PatchClassifier) and model.net.name == name
    optimizer = model.hparams.optimizer(params=model.parameters())
    assert isinstance(optimizer, torch.optim.SGD)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_trainer_configs_compose(name: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF / "trainer"), version_base="1.3"):
        trainer_cfg = compose(name)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "trainer": trainer_cfg})
    t = cfg.trainer
    assert t.default_root_dir == str(tmp_path)
    if t.accelerator in ("cpu", "auto"):
        trainer = instantiate(t, logger=False, enable_checkpointing=False)
        assert (trainer.max_epochs, trainer.num_devices, trainer.precision) == (
            t.max_epochs,
            t.devices,
            t.precision,
        )
        assert trainer.default_root_dir == str(tmp_path)
