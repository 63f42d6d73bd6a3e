"""torchvision backbones behind one interface: pooled features and logits as separate calls.

Each registry entry carries what the rest of the pipeline needs to know about an architecture
(feature width, the input size/mean/std of its ImageNet weights, which layers form the head),
so no model constant is scattered in the data or stage code (as timm's
``resolve_model_data_config``). Weights are ``none``, ``imagenet`` (torchvision's hub cache,
downloaded where there is a network) or a state-dict file, and never fall back silently to a
random init.
"""

import os
import socket
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models as tvm
from torchvision.models import WeightsEnum

DOWNLOAD_TIMEOUT_S = 15.0
"""Socket timeout while fetching ImageNet weights, so an offline machine fails fast."""

INCEPTION_AUX_MIN_SIZE = 299
"""Inception-V3's aux head (5x5 pool then 5x5 conv on Mixed_6e) needs a 299 px input."""

_INCEPTION_STEM = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
)

Features = tuple[Tensor, Tensor | None]


def _inception_features(m: nn.Module, x: Tensor, with_aux: bool) -> Features:
    if with_aux and min(x.shape[-2:]) < INCEPTION_AUX_MIN_SIZE:
        raise ValueError(
            f"inception_v3's aux head needs inputs of at least {INCEPTION_AUX_MIN_SIZE} px in "
            f"training, got {tuple(x.shape[-2:])}: use 299 px patches or aux_weight=0 (drop_aux)"
        )
    x = m._transform_input(x)  # ImageNet-normalised -> the [-1, 1] scale of Google's weights
    for name in _INCEPTION_STEM:
        x = getattr(m, name)(x)  # B x 768 x 17 x 17 after Mixed_6e
    aux = m.AuxLogits(x) if with_aux else None  # B x num_classes
    x = m.Mixed_7c(m.Mixed_7b(m.Mixed_7a(x)))  # B x 2048 x 8 x 8
    return torch.flatten(m.avgpool(x), 1), aux  # B x 2048


def _resnet_features(m: nn.Module, x: Tensor, with_aux: bool) -> Features:
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))  # B x 64 x H/4 x W/4
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # B x D x H/32 x W/32
    return torch.flatten(m.avgpool(x), 1), None  # B x D


def _pooled_features(m: nn.Module, x: Tensor, with_aux: bool) -> Features:
    x = m.features(x)  # B x 1280 x H/32 x W/32
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), None  # B x 1280


def _convnext_features(m: nn.Module, x: Tensor, with_aux: bool) -> Features:
    x = m.avgpool(m.features(x))  # B x 768 x 1 x 1
    return m.classifier[1](m.classifier[0](x)), None  # LayerNorm2d, Flatten: B x 768


def _inception_head(m: nn.Module, features: Tensor) -> Tensor:
    return m.fc(m.dropout(features))


def _fc_head(m: nn.Module, features: Tensor) -> Tensor:
    return m.fc(features)


def _classifier_head(m: nn.Module, features: Tensor) -> Tensor:
    return m.classifier(features)  # Dropout, Linear


def _convnext_head(m: nn.Module, features: Tensor) -> Tensor:
    return m.classifier[2](features)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one torchvision architecture and split it into features and head.

    Attributes:
        builder: torchvision constructor, called with ``weights=None``.
        weights: the ImageNet weights enum: its URL, and its transforms give size/mean/std.
        feature_dim: width of the pooled feature vector.
        features: ``(model, x, with_aux) -> (B x D features, aux logits or None)``.
        head: ``(model, features) -> logits``.
        head_layers: the new layers (replaced by a num_classes head), dropped from weight files.
        kwargs: extra constructor arguments.
    """

    builder: Callable[..., nn.Module]
    weights: WeightsEnum
    feature_dim: int
    features: Callable[[nn.Module, Tensor, bool], Features]
    head: Callable[[nn.Module, Tensor], Tensor]
    head_layers: tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


BACKBONES: dict[str, BackboneSpec] = {
    # transform_input: Google's weights expect [-1, 1]; the model converts ImageNet-normalised x.
    "inception_v3": BackboneSpec(
        tvm.inception_v3,
        tvm.Inception_V3_Weights.IMAGENET1K_V1,
        2048,
        _inception_features,
        _inception_head,
        ("fc", "AuxLogits.fc"),
        {"aux_logits": True, "transform_input": True, "init_weights": True},
    ),
    "mobilenet_v2": BackboneSpec(
        tvm.mobilenet_v2,
        tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
        1280,
        _pooled_features,
        _classifier_head,
        ("classifier.1",),
    ),
    "resnet18": BackboneSpec(
        tvm.resnet18,
        tvm.ResNet18_Weights.IMAGENET1K_V1,
        512,
        _resnet_features,
        _fc_head,
        ("fc",),
    ),
    "resnet50": BackboneSpec(
        tvm.resnet50,
        tvm.ResNet50_Weights.IMAGENET1K_V1,
        2048,
        _resnet_features,
        _fc_head,
        ("fc",),
    ),
    "efficientnet_b0": BackboneSpec(
        tvm.efficientnet_b0,
        tvm.EfficientNet_B0_Weights.IMAGENET1K_V1,
        1280,
        _pooled_features,
        _classifier_head,
        ("classifier.1",),
    ),
    "convnext_tiny": BackboneSpec(
        tvm.convnext_tiny,
        tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1,
        768,
        _convnext_features,
        _convnext_head,
        ("classifier.2",),
    ),
}


def get_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``; an unknown name lists the known ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def resolve_data_config(name: str) -> dict[str, Any]:
    """Input size and normalisation of a backbone, from its weights' own eval transforms.

    The DataModule can size patches from this without building the model.
    """
    preset = get_spec(name).weights.transforms()
    return {
        "input_size": int(preset.crop_size[0]),
        "mean": tuple(float(v) for v in preset.mean),
        "std": tuple(float(v) for v in preset.std),
    }


class Backbone(nn.Module):
    """A torchvision classifier with a ``num_classes`` head and timm-style split calls.

    Args:
        name: registry key (``BACKBONES``).
        num_classes: width of the new head (and of Inception-V3's aux head).
        freeze_bn: keep every BatchNorm in eval mode with frozen affine parameters, even in
            ``train()``: needed for BN-folded weights, and steadier with small batches.
        train_from: first layer to train (e.g. ``features.10`` for mobilenet_v2, ``Mixed_6a``
            for inception_v3); every parameter before it stays frozen, which on a few
            hundred images keeps the generic early filters from overfitting. None trains all.

    Attributes:
        feature_dim: width of ``forward_features``.
        input_size: square input side the ImageNet weights were evaluated at.
        min_size: smallest input side the architecture takes (torchvision's weights metadata).
        mean, std: per-channel normalisation of the ImageNet weights (for ``normalize``).
        has_aux: whether ``forward`` returns ``(logits, aux_logits)`` in training
            (Inception-V3, until ``drop_aux``).
        pretrained: whether ``load_pretrained`` loaded weights (not a random init).
    """

    def __init__(
        self,
        name: str = "inception_v3",
        num_classes: int = 4,
        freeze_bn: bool = False,
        train_from: str | None = None,
    ):
        super().__init__()
        spec = get_spec(name)
        data = resolve_data_config(name)
        self.name = name
        self.num_classes = num_classes
        self.freeze_bn = freeze_bn
        self.feature_dim = spec.feature_dim
        self.input_size: int = data["input_size"]
        self.min_size: int = max(spec.weights.meta["min_size"])
        self.pretrained = False
        self.mean: tuple[float, ...] = data["mean"]
        self.std: tuple[float, ...] = data["std"]
        self.has_aux = "AuxLogits.fc" in spec.head_layers
        self.model = spec.builder(weights=None, num_classes=num_classes, **spec.kwargs)
        self.register_buffer(
            "norm_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("norm_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        if freeze_bn:
            for bn in self._batchnorms():
                bn.requires_grad_(False)
        self.train_from = train_from
        for p in self._early_parameters():
            p.requires_grad_(False)
        self.train()

    def check_input_size(self, size: int) -> None:
        """Fail on patches too small for the architecture, before any long work; warn when
        pretrained weights get another size than they learnt at (a from-scratch net has none).

        Args:
            size: the side of the square patches, ``data.patch_size``.
        """
        if size < self.min_size:
            raise ValueError(
                f"data.patch_size={size} is below the {self.min_size} px that {self.name} "
                f"takes: use data.patch_size={self.input_size} (what its ImageNet weights saw)"
            )
        if self.pretrained and size != self.input_size:
            warnings.warn(
                f"data.patch_size={size} differs from the {self.input_size} px that "
                f"{self.name}'s pretrained weights learnt at, so tissue reaches them at another "
                f"scale (data.patch_size={self.input_size} matches)",
                stacklevel=2,
            )

    @property
    def spec(self) -> BackboneSpec:
        """The registry entry, looked up by name so the module carries no registry state."""
        return get_spec(self.name)

    def _early_parameters(self) -> list[nn.Parameter]:
        """Parameters before the ``train_from`` layer (in definition order): never trained."""
        if self.train_from is None:
            return []
        named = list(self.model.named_parameters())
        prefix = f"{self.train_from}."
        first = next((i for i, (n, _) in enumerate(named) if n.startswith(prefix)), None)
        if first is None:
            raise ValueError(
                f"train_from={self.train_from!r} is not a layer of {self.name} with parameters "
                "(e.g. features.10 for mobilenet_v2, Mixed_6a for inception_v3)"
            )
        return [p for _, p in named[:first]]

    def _batchnorms(self) -> list[_BatchNorm]:
        return [m for m in self.modules() if isinstance(m, _BatchNorm)]

    def train(self, mode: bool = True) -> "Backbone":
        """Set train/eval mode, keeping BatchNorm in eval when ``freeze_bn``."""
        super().train(mode)
        if self.freeze_bn:
            for bn in self._batchnorms():
                bn.eval()
        return self

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] (or float in 0..1) -> float normalised with the weights' mean/std.

        Batches travel as uint8 (4x less host memory and transfer) and are normalised on the
        device.
        """
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif not x.is_floating_point():
            raise TypeError(f"expected uint8 or float images, got {x.dtype}")
        return (x - self.norm_mean) / self.norm_std

    def forward_features(self, x: Tensor) -> Tensor:
        """Globally average-pooled features of normalised images: B x feature_dim."""
        return self.spec.features(self.model, x, False)[0]

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from ``forward_features`` output: B x num_classes."""
        return self.spec.head(self.model, features)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; ``(logits, aux_logits)`` for Inception-V3 in training mode."""
        features, aux = self.spec.features(self.model, x, self.training and self.has_aux)
        logits = self.forward_head(features)  # B x num_classes
        return logits if aux is None else (logits, aux)

    def drop_aux(self) -> None:
        """Skip Inception-V3's aux head in training and freeze it (aux_weight=0, < 299 px).

        The layers stay, so checkpoints keep the same keys either way.
        """
        if self.has_aux:
            self.has_aux = False
            self.model.AuxLogits.requires_grad_(False)

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the new head(s): what a backbone freeze holds still."""
        skip = {
            id(p)
            for layer in self.spec.head_layers
            for p in self.model.get_submodule(layer).parameters()
        }
        if self.freeze_bn:
            skip |= {id(p) for bn in self._batchnorms() for p in bn.parameters()}
        skip |= {id(p) for p in self._early_parameters()}
        if hasattr(self.model, "AuxLogits") and not self.has_aux:
            skip |= {id(p) for p in self.model.AuxLogits.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def load_pretrained(self, weights: str | os.PathLike) -> None:
        """Load ``"imagenet"`` or a state-dict file into everything but the new head.

        The file's head keys are dropped (its classes are not ours); every other key must
        match the torchvision model exactly, so a wrong file fails loudly instead of leaving
        layers at random init.
        """
        if str(weights) == "imagenet":
            state, source = _imagenet_state_dict(self.name, self.spec.weights), self.spec.weights
        else:
            state, source = _read_state_dict(Path(weights)), weights
        head = tuple(f"{layer}." for layer in self.spec.head_layers)
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        expected = {k: v for k, v in self.model.state_dict().items() if not k.startswith(head)}
        problems = {
            # BatchNorm fills in num_batches_tracked itself when an older file lacks it.
            "missing": [
                k for k in expected if k not in state and not k.endswith("num_batches_tracked")
            ],
            "unexpected": [k for k in state if k not in expected],
            "wrong shape": [
                f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                for k, v in expected.items()
                if k in state and state[k].shape != v.shape
            ],
        }
        if any(problems.values()):
            found = "; ".join(
                f"{len(keys)} {what} keys ({', '.join(keys[:5])}{', ...' * (len(keys) > 5)})"
                for what, keys in problems.items()
                if keys
            )
            raise ValueError(f"weights {source} do not fit torchvision {self.name}: {found}")
        self.model.load_state_dict(state, strict=False)
        self.pretrained = True


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a file, plain or nested under ``state_dict``/``model``, as float32."""
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} not found (weights: imagenet | none | /path/to/state_dict.pth)"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} holds no state dict of tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def _imagenet_state_dict(name: str, weights: WeightsEnum) -> dict[str, Tensor]:
    """torchvision's ImageNet weights from the hub cache, else a download that fails fast."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as err:  # URLError, timeouts, refused connections
        raise RuntimeError(
            f"ImageNet weights for {name} are not cached and could not be downloaded ({err}). "
            f"Fetch {weights.url} elsewhere and put it at {file} "
            f"($TORCH_HOME/hub/checkpoints/{file.name}), or pass weights=/path/to/state_dict.pth "
            f"(patch_model.net.weights=...), or weights=none to train from scratch."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def build_backbone(
    name: str = "inception_v3",
    weights: str | os.PathLike = "imagenet",
    num_classes: int = 4,
    freeze_bn: bool = False,
    train_from: str | None = None,
) -> Backbone:
    """Build a backbone and initialise it.

    Args:
        name: registry key: inception_v3, mobilenet_v2, resnet18, resnet50, efficientnet_b0,
            convnext_tiny.
        weights: ``"none"`` (random init), ``"imagenet"`` (torchvision's weights; offline
            they must already be in ``$TORCH_HOME/hub/checkpoints``) or a state-dict path.
        num_classes: classes of the new head.
        freeze_bn: BatchNorm frozen in eval mode (required for BN-folded weight files).
        train_from: first layer to train; the layers before it stay frozen (None: all train).

    Returns:
        The initialised ``Backbone``.
    """
    net = Backbone(name, num_classes=num_classes, freeze_bn=freeze_bn, train_from=train_from)
    if str(weights) != "none":
        net.load_pretrained(weights)
    return net
