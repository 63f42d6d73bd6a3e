"""Backbones: shapes, the aux head, weight files, offline ImageNet, frozen BatchNorm, gradients."""

import io
import socket
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models as tvm

from breastnet.models import weights
from breastnet.models.backbone import build_backbone
from breastnet.models.registry import BACKBONES, resolve_data_config

from conftest import SHARED_MOBILENET

FEATURE_DIM = {
    "inception_v3": 2048,
    "mobilenet_v2": 1280,
    "resnet18": 512,
    "resnet50": 2048,
    "efficientnet_b0": 1280,
    "convnext_tiny": 768,
}


def small_size(name: str) -> int:
    """Smallest cheap input: Inception-V3 needs 75 px in eval mode."""
    return 75 if name == "inception_v3" else 64


def test_registry_is_tested() -> None:
    assert set(BACKBONES) == set(FEATURE_DIM)


@pytest.mark.parametrize("name", sorted(FEATURE_DIM))
def test_feature_and_logit_shapes(name: str) -> None:
    net = build_backbone(name, weights="none").eval()
    s = small_size(name)
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        features = net.forward_features(x)
        logits = net(x)
    assert net.feature_dim == FEATURE_DIM[name]
    assert features.shape == (2, FEATURE_DIM[name])
    assert logits.shape == (2, 4)
    torch.testing.assert_close(net.forward_head(features), logits)


def test_data_config_comes_from_the_weights() -> None:
    inception = resolve_data_config("inception_v3")
    assert inception["input_size"] == 299
    assert resolve_data_config("resnet18")["input_size"] == 224
    assert inception["mean"] == pytest.approx((0.485, 0.456, 0.406))
    net = build_backbone("resnet18", weights="none")
    assert (net.input_size, net.mean, net.std) == tuple(resolve_data_config("resnet18").values())


@pytest.mark.parametrize(
    ("name", "smallest"), [("inception_v3", 75), ("convnext_tiny", 32), ("mobilenet_v2", 1)]
)
def test_input_size_below_the_minimum_fails_naming_both(name: str, smallest: int) -> None:
    net = build_backbone(name, weights="none").eval()
    assert net.min_size == smallest
    with torch.no_grad():
        assert net(torch.zeros(1, 3, smallest, smallest)).shape == (1, 4)  # the minimum runs
    net.check_input_size(smallest)
    if smallest > 1:  # one pixel less: torchvision's error would not name the setting
        with pytest.raises(ValueError, match=rf"data.patch_size={smallest - 1} .* {smallest} px"):
            net.check_input_size(smallest - 1)


def test_other_size_than_the_pretrained_weights_warns(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.pth"
    torch.save(tvm.mobilenet_v2(weights=None).state_dict(), path)
    pretrained = build_backbone("mobilenet_v2", weights=path)
    with pytest.warns(UserWarning, match=r"data.patch_size=96 differs from the 224 px"):
        pretrained.check_input_size(96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pretrained.check_input_size(224)
        build_backbone("mobilenet_v2", weights="none").check_input_size(96)  # nothing learnt


def test_normalize_uint8_and_float_agree() -> None:
    net = build_backbone("resnet18", weights="none")
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(net.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.std).view(1, 3, 1, 1)
    expected = (x.float() / 255 - mean) / std
    torch.testing.assert_close(net.normalize(x), expected)
    torch.testing.assert_close(net.normalize(x.float() / 255), expected)
    with pytest.raises(TypeError):
        net.normalize(x.long())


def test_inception_aux_only_in_training() -> None:
    net = build_backbone("inception_v3", weights="none").train()
    logits, aux = net(torch.randn(2, 3, 299, 299))
    assert logits.shape == aux.shape == (2, 4)
    assert net.eval()(torch.randn(2, 3, 75, 75)).shape == (2, 4)  # logits alone, no tuple
    net.train()
    with pytest.raises(ValueError, match="299"):
        net(torch.randn(2, 3, 96, 96))
    net.drop_aux()
    assert net(torch.randn(2, 3, 96, 96)).shape == (2, 4)
    assert not any(p.requires_grad for p in net.model.AuxLogits.parameters())


@pytest.mark.parametrize("name", sorted(FEATURE_DIM))
def test_backward_reaches_every_trainable_param(name: str) -> None:
    torch.manual_seed(0)  # stochastic depth must not drop a whole block for the whole batch
    net = build_backbone(name, weights="none").train()
    s = 299 if name == "inception_v3" else 64  # the aux head needs 299 px
    out = net(torch.randn(2, 3, s, s))
    loss = sum(o.mean() for o in out) if isinstance(out, tuple) else out.mean()
    loss.backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


def test_weights_from_file_load_exactly(tmp_path: Path) -> None:
    """A torchvision ImageNet-style file (1000 classes): everything but the head is loaded."""
    source = tvm.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet.pth"
    torch.save(source.state_dict(), path)
    net = build_backbone("mobilenet_v2", weights=path)
    torch.testing.assert_close(
        net.model.features[3].conv[1][0].weight, source.features[3].conv[1][0].weight
    )
    torch.testing.assert_close(
        net.model.features[1].conv[0][1].running_var, source.features[1].conv[0][1].running_var
    )
    assert net.model.classifier[1].out_features == 4


def test_nested_fp16_file_is_cast(tmp_path: Path) -> None:
    source = tvm.inception_v3(weights=None, aux_logits=True, init_weights=False)
    state = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "inception_fp16.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    net = build_backbone("inception_v3", weights=path)
    weight = net.model.Mixed_7c.branch_pool.conv.weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, state["Mixed_7c.branch_pool.conv.weight"].float())
    assert net.model.AuxLogits.fc.out_features == 4


def test_mismatching_file_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="resnet18.pth") as err:
        build_backbone("mobilenet_v2", weights=path)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)
    state = tvm.mobilenet_v2(weights=None).state_dict()
    del state["features.0.0.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="features.0.0.weight"):
        build_backbone("mobilenet_v2", weights=path)
    with pytest.raises(FileNotFoundError):
        build_backbone("mobilenet_v2", weights=tmp_path / "absent.pth")


def test_imagenet_offline_fails_fast_with_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network that does not answer cuts the fetch at the download's own timeout (the
    process's socket default is left alone); the error says where to put the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    timeouts = []

    def offline(url: str, timeout: float) -> None:
        timeouts.append(timeout)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError) as err:
        build_backbone("mobilenet_v2", weights="imagenet")
    assert timeouts == [weights.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert str(expected) in str(err.value)
    assert "weights=/path/to/state_dict.pth" in str(err.value)
    assert not expected.exists()


def test_a_download_that_does_not_match_its_checksum_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not it"))
    with pytest.raises(RuntimeError, match="sha256 prefix b0353104"):
        build_backbone("mobilenet_v2", weights="imagenet")
    assert not list((tmp_path / "hub" / "checkpoints").glob("*.pth"))


def test_imagenet_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Putting the file where the error message says makes ``weights=imagenet`` work offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = tvm.mobilenet_v2(weights=None)
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    net = build_backbone("mobilenet_v2", weights="imagenet")
    torch.testing.assert_close(net.model.features[0][0].weight, source.features[0][0].weight)


def test_freeze_bn_survives_train_mode() -> None:
    net = build_backbone("mobilenet_v2", weights="none", freeze_bn=True).train()
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(bn.training for bn in bns)
    assert net.training and net.model.classifier.training
    assert not any(p.requires_grad for bn in bns for p in bn.parameters())
    before = [bn.running_mean.clone() for bn in bns]
    net(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns, strict=True))
    trunk = {id(p) for p in net.trunk_parameters()}
    assert not trunk & {id(p) for bn in bns for p in bn.parameters()}
    assert not trunk & {id(p) for p in net.model.classifier.parameters()}


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="known: inception_v3"):
        build_backbone("vgg16", weights="none")


@pytest.mark.slow
def test_shared_bn_folded_mobilenet_file() -> None:
    """The shared ImageNet MobileNetV2 (BN folded, fp16) loads and behaves with frozen BN."""
    if not SHARED_MOBILENET.is_file():
        pytest.skip(f"{SHARED_MOBILENET} not found (set BREASTNET_WEIGHTS)")
    net = build_backbone("mobilenet_v2", weights=SHARED_MOBILENET, freeze_bn=True)
    x = net.normalize(torch.rand(2, 3, 224, 224))
    with torch.no_grad():
        logits = net.eval()(x)
        features = net.forward_features(x)
        train_features = net.train().forward_features(x)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(train_features, features)  # frozen BN: train mode == eval mode
    assert isinstance(net.model.classifier[1], nn.Linear)


def test_train_from_freezes_the_layers_before_it_for_good() -> None:
    net = build_backbone("mobilenet_v2", weights="none", train_from="features.10")
    grads = {n: p.requires_grad for n, p in net.model.named_parameters()}
    assert not any(v for n, v in grads.items() if n.startswith(("features.0.", "features.9.")))
    assert all(v for n, v in grads.items() if n.startswith(("features.10.", "classifier.")))
    # A head-only warm start unfreezes the trunk later: the early layers are not part of it.
    trunk = {id(p) for p in net.trunk_parameters()}
    assert id(net.model.features[9].conv[0][0].weight) not in trunk
    assert id(net.model.features[10].conv[0][0].weight) in trunk
    with pytest.raises(ValueError, match="features.99. is not a layer"):
        build_backbone("mobilenet_v2", weights="none", train_from="features.99")
