"""The torchvision architectures breastnet knows, and how each splits into features and head.

Each entry carries what the rest of the pipeline needs to know about an architecture
(feature width, the input size/mean/std of its ImageNet weights, which layers form the head),
so no model constant is scattered in the data or stage code (as timm's
``resolve_model_data_config``).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

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
