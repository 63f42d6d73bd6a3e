"""Patch networks behind one interface (``PatchNet``): pooled features and logits as
separate calls, a ``num_classes`` head, frozen BatchNorm, early layers or the whole encoder
(``freeze``) on request. ``Backbone`` is a torchvision classifier; timm's models are
``breastnet.models.timm_backbone``'s.

The torchvision architectures and their split into features and head are
``breastnet.models.registry``'s; weights (``none``, ``imagenet`` or a state-dict file, never a
silent random init) come from ``breastnet.models.weights``.
"""

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from breastnet.models.registry import BackboneSpec, get_spec, resolve_data_config
from breastnet.models.weights import imagenet_state_dict, load_strict, read_state_dict


class PatchNet(nn.Module):
    """What the pipeline asks of any patch network (torchvision ``Backbone``, timm
    ``TimmBackbone``): pooled features and logits as separate calls, normalisation with its
    weights' mean/std on the device, a size check, frozen BatchNorm, and ``freeze``.

    Attributes:
        feature_dim: width of ``forward_features``.
        input_size: square input side the pretrained weights were evaluated at.
        min_size: smallest input side the architecture takes.
        mean, std: per-channel normalisation of the weights (for ``normalize``).
        has_aux: whether ``forward`` returns ``(logits, aux_logits)`` in training.
        pretrained: whether ``load_pretrained`` loaded weights (not a random init).
        frozen: whether ``freeze`` made it a fixed encoder.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        feature_dim: int,
        input_size: int,
        min_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        freeze_bn: bool,
    ) -> None:
        super().__init__()
        self.name, self.num_classes, self.feature_dim = name, num_classes, feature_dim
        self.input_size, self.min_size = input_size, min_size
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.freeze_bn, self.has_aux, self.pretrained, self.frozen = freeze_bn, False, False, False
        self.register_buffer(
            "norm_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("norm_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def check_input_size(self, size: int) -> None:
        """Fail on patches too small for the architecture, before any long work; warn when
        pretrained weights get another size than they learnt at (a from-scratch net has none).

        Args:
            size: the side of the square patches, ``data.patch_size``.
        """
        if size < self.min_size:
            raise ValueError(
                f"data.patch_size={size} is below the {self.min_size} px that {self.name} "
                f"takes: use data.patch_size={self.input_size} (what its weights saw)"
            )
        if self.pretrained and size != self.input_size:
            warnings.warn(
                f"data.patch_size={size} differs from the {self.input_size} px that "
                f"{self.name}'s pretrained weights learnt at, so tissue reaches them at another "
                f"scale (data.patch_size={self.input_size} matches)",
                stacklevel=2,
            )

    def _batchnorms(self) -> list[_BatchNorm]:
        return [m for m in self.modules() if isinstance(m, _BatchNorm)]

    def head_parameters(self) -> list[nn.Parameter]:
        """The new head's parameters (the ``num_classes`` classifier)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "PatchNet":
        """Set train/eval mode; a frozen net stays in eval, BatchNorm too when ``freeze_bn``."""
        super().train(mode and not self.frozen)
        if self.freeze_bn:
            for bn in self._batchnorms():
                bn.eval()
        return self

    def freeze(self) -> None:
        """Make this a fixed encoder: no parameter trains, eval mode for good (no dropout, no
        BatchNorm updates), and a zero head, so its patch probabilities are uniform: no head
        was trained to give them (use an aggregator over features)."""
        self.requires_grad_(False)
        with torch.no_grad():
            for p in self.head_parameters():
                p.zero_()
        self.frozen = True
        self.eval()

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
        """Pooled features of normalised images: B x feature_dim."""
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from ``forward_features`` output: B x num_classes."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Logits of normalised images."""
        return self.forward_head(self.forward_features(x))

    def drop_aux(self) -> None:
        """Skip an aux head in training (only Inception-V3 has one)."""

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the new head(s): what a backbone freeze holds still."""
        raise NotImplementedError


class Backbone(PatchNet):
    """A torchvision classifier with a ``num_classes`` head and timm-style split calls.

    Args:
        name: registry key (``BACKBONES``).
        num_classes: width of the new head (and of Inception-V3's aux head).
        freeze_bn: keep every BatchNorm in eval mode with frozen affine parameters, even in
            ``train()``: needed for BN-folded weights, and steadier with small batches.
        train_from: first layer to train (e.g. ``features.10`` for mobilenet_v2, ``Mixed_6a``
            for inception_v3); every parameter before it stays frozen, which on a few
            hundred images keeps the generic early filters from overfitting. None trains all.

    ``min_size`` comes from torchvision's weights metadata; ``has_aux`` is true for
    Inception-V3 until ``drop_aux``.
    """

    def __init__(
        self,
        name: str = "inception_v3",
        num_classes: int = 4,
        freeze_bn: bool = False,
        train_from: str | None = None,
    ):
        spec = get_spec(name)
        data = resolve_data_config(name)
        super().__init__(
            name,
            num_classes,
            spec.feature_dim,
            data["input_size"],
            max(spec.weights.meta["min_size"]),
            data["mean"],
            data["std"],
            freeze_bn,
        )
        self.has_aux = "AuxLogits.fc" in spec.head_layers
        self.model = spec.builder(weights=None, num_classes=num_classes, **spec.kwargs)
        if freeze_bn:
            for bn in self._batchnorms():
                bn.requires_grad_(False)
        self.train_from = train_from
        for p in self._early_parameters():
            p.requires_grad_(False)
        self.train()

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

    def head_parameters(self) -> list[nn.Parameter]:
        return [
            p
            for layer in self.spec.head_layers
            for p in self.model.get_submodule(layer).parameters()
        ]

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
        skip = {id(p) for p in self.head_parameters()}
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
            state, source = imagenet_state_dict(self.name, self.spec.weights), self.spec.weights
        else:
            state, source = read_state_dict(Path(weights)), weights
        load_strict(self.model, state, source, f"torchvision {self.name}", self.spec.head_layers)
        self.pretrained = True


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
