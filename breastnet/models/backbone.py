"""A torchvision classifier behind one interface: pooled features and logits as separate
calls, a ``num_classes`` head, frozen BatchNorm or early layers on request.

The architectures and their split into features and head are ``breastnet.models.registry``'s;
weights (``none``, ``imagenet`` or a state-dict file, never a silent random init) come from
``breastnet.models.weights``.
"""

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from breastnet.models.registry import BackboneSpec, get_spec, resolve_data_config
from breastnet.models.weights import imagenet_state_dict, read_state_dict


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
            state, source = imagenet_state_dict(self.name, self.spec.weights), self.spec.weights
        else:
            state, source = read_state_dict(Path(weights)), weights
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
