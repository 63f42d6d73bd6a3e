"""ImageClassifier: fits on cached features, a parameter-free vote, end to end, configs."""

import copy
import inspect
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf.errors import MissingMandatoryValue
from torch import Tensor
from torch.utils.data import DataLoader

from breastnet.models.backbone import build_backbone
from breastnet.models.classifier import warmup_cosine
from breastnet.models.image_classifier import ImageClassifier

from conftest import CONF, CPU_TRAINER, build_aggregator, image_model_config

D, C = 8, 4
ADAM = partial(torch.optim.Adam, lr=1e-2)
SMALL = {"hidden_size": 16, "num_layers": 2}
TRAINER = CPU_TRAINER
pytestmark = pytest.mark.usefixtures("one_thread")


def image_batch(x: Tensor, lengths: list[int], y: list[int]) -> dict[str, object]:
    """A padded batch as the DataModule collates it, around patches or features x: B x N x ..."""
    b, n = x.shape[:2]
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]  # B x N
    pos = torch.stack([torch.arange(n) // 3, torch.arange(n) % 3], dim=1)  # N x 2
    return {
        "x": x,
        "mask": mask,
        "pos": pos.expand(b, n, 2).masked_fill(~mask[..., None], -1),
        "y": torch.tensor(y),
        "image_id": [f"img{i}" for i in range(b)],
    }


def feature_batch(seed: int, probs: Tensor | None = None) -> dict[str, object]:
    """Four images of 6, 4, 2 and 1 patches with random features (and probs unless given)."""
    g = torch.Generator().manual_seed(seed)
    batch = image_batch(torch.randn(4, 6, D, generator=g), [6, 4, 2, 1], [0, 1, 2, 3])
    batch["probs"] = torch.randn(4, 6, C, generator=g).softmax(-1) if probs is None else probs
    return batch


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None)  # already batched


def test_fast_dev_run_fit_and_predict() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(
        build_aggregator("bilstm", D, C, **SMALL),
        optimizer=ADAM,
        scheduler=partial(warmup_cosine, warmup_epochs=1),
        label_smoothing=0.1,
    )
    before = copy.deepcopy(model.state_dict())
    data = loader([feature_batch(0), feature_batch(1)])
    trainer = pl.Trainer(fast_dev_run=True, **TRAINER)
    trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    logged = {"train_loss", "train_acc", "val_loss", "val_acc", "val_acc_best", "val_select"}
    assert {f"image/{k}" for k in logged} <= set(trainer.callback_metrics)

    (out,) = trainer.predict(model, data)  # fast_dev_run: one batch
    assert out["probs"].shape == (4, C) and out["attention"] is None
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(4))
    assert out["image_id"] == ["img0", "img1", "img2", "img3"]


def test_predict_returns_attention() -> None:
    model = ImageClassifier(build_aggregator("attention", D, C), optimizer=ADAM).eval()
    with torch.no_grad():
        out = model.predict_step(feature_batch(0), 0)
    assert out["attention"].shape == (4, 6)
    torch.testing.assert_close(out["attention"].sum(1), torch.ones(4))


def test_vote_fits_as_a_no_op_and_logs_metrics() -> None:
    """Patch argmax = image label for 3 of 4 images (the Invasive one votes Normal)."""
    model = ImageClassifier(build_aggregator("vote", D, C))
    assert not model.trainable and not list(model.parameters())
    assert model.configure_optimizers() is None
    votes = torch.tensor([0, 1, 2, 0])[:, None].expand(4, 6)  # B x N
    data = loader([feature_batch(0, probs=0.1 + 0.6 * torch.nn.functional.one_hot(votes, C))])
    trainer = pl.Trainer(max_epochs=1, **TRAINER)
    with pytest.warns(UserWarning, match="no optimizer"):
        trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    assert trainer.callback_metrics["image/train_acc"] == pytest.approx(0.75)
    (logged,) = trainer.validate(model, data)
    assert logged["image/val_acc"] == pytest.approx(0.75)
    assert logged["image/val_acc_best"] == pytest.approx(0.75)
    assert logged["image/val_recall_Normal"] == 1.0 and logged["image/val_recall_Invasive"] == 0.0
    (tested,) = trainer.test(model, data)
    assert tested["image/test_acc"] == pytest.approx(0.75)


def end_to_end(name: str) -> ImageClassifier:
    torch.manual_seed(0)
    backbone = build_backbone("mobilenet_v2", weights="none")
    aggregator = build_aggregator(name, backbone.feature_dim, C, **SMALL)
    return ImageClassifier(aggregator, optimizer=ADAM, backbone=backbone, chunk_size=3)


@pytest.mark.parametrize("name", ["bilstm", "mean_probs"])
def test_end_to_end_backward_reaches_the_backbone(name: str) -> None:
    """uint8 patches with padding; the BiLSTM freezes the unused head, the mean trains it."""
    model = end_to_end(name).train()
    x = torch.randint(0, 256, (2, 5, 3, 32, 32), dtype=torch.uint8)
    loss, logits, _ = model.model_step(image_batch(x, [5, 3], [1, 3]))
    loss.backward()
    assert logits.shape == (2, C) and loss.isfinite()
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert any(k.startswith("backbone.") for k in trainable)
    for k, p in trainable.items():
        assert p.grad is not None and p.grad.isfinite().all(), k
    assert model.backbone.model.features[0][0].weight.grad.abs().sum() > 0
    head = model.backbone.model.classifier[1].weight
    assert head.requires_grad == (name == "mean_probs")


def test_end_to_end_padding_never_reaches_the_backbone() -> None:
    model = end_to_end("bilstm").eval()
    x = torch.randint(0, 256, (2, 5, 3, 32, 32), dtype=torch.uint8)
    batch = image_batch(x, [5, 3], [1, 3])
    alone = image_batch(x[1:, :3], [3], [3])
    with torch.no_grad():
        torch.testing.assert_close(model.model_step(batch)[1][1], model.model_step(alone)[1][0])


def test_end_to_end_rejects_a_vote() -> None:
    with pytest.raises(ValueError, match="vote"):
        ImageClassifier(
            build_aggregator("vote", 1280), backbone=build_backbone("mobilenet_v2", "none")
        )


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "image_model").glob("*.yaml")))
def test_image_model_configs_instantiate(name: str) -> None:
    cfg = image_model_config(name)
    # Every key is an ImageClassifier argument: the stage settings live in `image:`.
    assert set(cfg) <= set(inspect.signature(ImageClassifier).parameters) | {"_target_"}
    learned = "feature_dim" in cfg.aggregator.keys()  # noqa: SIM118 (`in` skips ???)
    if learned:
        with pytest.raises(MissingMandatoryValue):
            instantiate(cfg)
    model = instantiate(cfg, aggregator={"feature_dim": D} if learned else {})
    assert isinstance(model, ImageClassifier)
    assert type(model.aggregator) is get_class(cfg.aggregator._target_)
    # the linear probe reads features but is fitted in closed form by the image stage
    assert model.trainable == (learned and name != "linear_probe")
    if model.trainable:
        optimizer = model.hparams.optimizer(params=model.parameters())
        assert isinstance(optimizer, torch.optim.Adam)
    if name == "bilstm":
        lstm = model.aggregator.lstm
        assert (lstm.hidden_size, lstm.num_layers, lstm.bidirectional) == (256, 3, True)
