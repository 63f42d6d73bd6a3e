"""Any timm model as a patch network, and the pathology foundation encoders built through it.

The registry of encoders is ``conf/patch_model/<entry>.yaml``: each entry gives the timm
architecture and the keyword arguments its weights need (UNI2-h's SwiGLU, register tokens and
``init_values``), its input size and mean/std, the embedding it exposes, its width, its
native pixel size and where its gated weights come from. ``patch_model=timm
patch_model.net.name=<any timm model>`` takes any other. Weights load strictly from a file
or the Hugging Face cache (``breastnet.models.weights``), never downloaded by timm itself.
"""

import os
import sys
from typing import Any

import timm
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from breastnet.models.backbone import PatchNet
from breastnet.models.weights import load_strict, read_state_dict, resolve_weights

EMBEDDINGS = ("pool", "cls", "cls_mean")
"""``pool``: timm's own pooled pre-logits (a CNN's average, a ViT's ``global_pool``);
``cls``: the class token after the final norm; ``cls_mean``: the class token beside the mean
of the patch tokens (register tokens left out), as Virchow2 recommends: twice the width."""


def _resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``*_layer`` arguments given as dotted paths (``timm.layers.SwiGLUPacked``) as classes."""
    return {
        k: get_object(v) if k.endswith("_layer") and isinstance(v, str) and "." in v else v
        for k, v in kwargs.items()
    }


class TimmBackbone(PatchNet):
    """A timm model without its classifier, its embedding, and a new ``num_classes`` head.

    Args:
        name: timm architecture (``vit_giant_patch14_224``...), built with ``pretrained=False``.
        kwargs: its constructor arguments (``num_classes`` is always 0: the head is ours).
        num_classes: width of the new linear head.
        embedding: one of ``EMBEDDINGS``.
        width: the embedding width the entry states; checked against the built model.
        input_size, mean, std: what the weights were trained with (None: timm's defaults).
        mpp: native pixel size of the weights, µm/px (what ``data.mpp`` should be).
        repo: where the weights come from (Hugging Face repository or URL), for messages.
        licence: the weights' licence and gating, for messages.
        freeze_bn: BatchNorm in eval mode with frozen affine parameters (CNNs).
        train_blocks: fine-tune only the last N blocks (timm's layer groups, the final norm
            with the last) and the head; the stem and earlier blocks stay frozen (0: the head
            alone). None trains all.
    """

    def __init__(
        self,
        name: str,
        kwargs: dict[str, Any] | None = None,
        num_classes: int = 4,
        embedding: str = "pool",
        width: int | None = None,
        input_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        mpp: float | None = None,
        repo: str | None = None,
        licence: str | None = None,
        freeze_bn: bool = False,
        train_blocks: int | None = None,
    ) -> None:
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        plain = OmegaConf.to_container(kwargs) if OmegaConf.is_config(kwargs) else kwargs or {}
        model = timm.create_model(name, pretrained=False, **_resolve_layers(plain))
        model.reset_classifier(0)
        data = timm.data.resolve_model_data_config(model)
        dim = model.num_features * (2 if embedding == "cls_mean" else 1)
        if width is not None and width != dim:
            raise ValueError(
                f"{name} with {plain} gives {embedding} features of {dim}, not {width}"
            )
        size = int(input_size or data["input_size"][-1])
        # A ViT takes its own size unless dynamic_img_size; a CNN anything of a stride or more.
        patch_embed = getattr(model, "patch_embed", None)
        fixed = patch_embed is not None and not plain.get("dynamic_img_size", False)
        smallest = size if fixed else getattr(patch_embed, "patch_size", (32,))[0]
        super().__init__(
            name,
            num_classes,
            dim,
            size,
            smallest,
            mean or data["mean"],
            std or data["std"],
            freeze_bn,
        )
        self.model, self.embedding = model, embedding
        self.mpp, self.repo, self.licence = mpp, repo, licence
        self.head = nn.Linear(dim, num_classes)
        if freeze_bn:
            for bn in self._batchnorms():
                bn.requires_grad_(False)
        self.train_blocks = train_blocks
        for p in self._early_parameters():
            p.requires_grad_(False)
        self.train()

    def layer_ids(self) -> dict[str, int]:
        """timm's layer group of each model parameter: 0 the stem, then one per block (the
        final norm with the last): what layer-wise lr decay counts in."""
        if not hasattr(self.model, "group_matcher"):
            raise ValueError(f"timm's {self.name} has no layer groups (group_matcher)")
        return group_parameters(self.model, self.model.group_matcher(coarse=False), reverse=True)

    def _early_parameters(self) -> list[nn.Parameter]:
        """Parameters before the last ``train_blocks`` blocks: never trained."""
        if self.train_blocks is None:
            return []
        ids = self.layer_ids()
        blocks = max(ids.values())  # group 0 is the stem; the final norm joins the last block
        if not 0 <= self.train_blocks <= blocks:
            raise ValueError(f"train_blocks={self.train_blocks}: {self.name} has {blocks} blocks")
        first = blocks - self.train_blocks + 1
        return [p for n, p in self.model.named_parameters() if ids[n] < first]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def trunk_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in [*self.head_parameters(), *self._early_parameters()]}
        if self.freeze_bn:
            skip |= {id(p) for bn in self._batchnorms() for p in bn.parameters()}
        return [p for p in self.model.parameters() if id(p) not in skip]

    def forward_features(self, x: Tensor) -> Tensor:
        """The entry's embedding of normalised images: B x feature_dim."""
        tokens = self.model.forward_features(x)  # ViT: B x T x D; CNN: B x D x h x w
        if self.embedding == "pool":
            return self.model.forward_head(tokens, pre_logits=True)
        cls = tokens[:, 0]  # B x D
        if self.embedding == "cls":
            return cls
        patches = tokens[:, self.model.num_prefix_tokens :]  # B x h*w x D
        return torch.cat([cls, patches.mean(1)], 1)  # B x 2D

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
        """Optimizer groups with layer-wise lr decay (timm's ``param_groups_layer_decay``):
        the head and final norm at ``lr``, each earlier block ``layer_decay`` x the next."""
        groups = param_groups_layer_decay(
            self.model,
            weight_decay=weight_decay,
            no_weight_decay_list=tuple(getattr(self.model, "no_weight_decay", set)()),
            layer_decay=layer_decay,
        )
        head = {"params": self.head_parameters(), "lr_scale": 1.0, "weight_decay": weight_decay}
        groups = [g for g in [*groups, head] if any(p.requires_grad for p in g["params"])]
        return [{**g, "lr": lr * g["lr_scale"]} for g in groups]

    def load_pretrained(self, weights: str | os.PathLike) -> None:
        """Load a weights file (or ``hf-hub:<repo>``'s cached one) strictly into the model;
        the file's own classifier (timm's ``head``...) is dropped: ours is ``self.head``."""
        source = resolve_weights(weights, source_of(self.name, self.repo, self.licence))
        if source is None:
            return
        what = f"timm {self.name}" + (f" (licence: {self.licence})" if self.licence else "")
        classifier = self.model.pretrained_cfg.get("classifier", "head")
        skip = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        state = read_state_dict(source)
        # What timm applies to its own hub files: other checkpoint layouts (DINO, DINOv2...)
        # onto its keys, position embeddings resized to the model's grid.
        convert = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
        if convert is not None:
            state = convert(state, self.model)
        load_strict(self.model, state, source, what, skip)
        self.pretrained = True


def source_of(name: str, repo: str | None, licence: str | None) -> str:
    """Where an encoder's weights come from and on what terms, for a missing-file message."""
    terms = licence or "see its model card"
    return f"{name}'s weights come from {repo or 'its publisher'} (licence: {terms})"


def build_timm_backbone(
    weights: str | os.PathLike | None = "none", **settings: Any
) -> TimmBackbone:
    """Build a ``TimmBackbone`` (``settings``: its arguments) and load ``weights``: ``none``
    (random init), ``hf-hub:<owner>/<repo>`` (from the Hugging Face cache; offline with
    ``HF_HUB_OFFLINE=1``) or a ``.safetensors``/``.bin``/``.pth`` file. A missing file fails
    before the model is built (a ViT-g takes a while)."""
    about = source_of(settings.get("name", "?"), settings.get("repo"), settings.get("licence"))
    if weights is None:
        raise FileNotFoundError(
            f"patch_model.net.weights is not set: {about}. Download the file and pass "
            "patch_model.net.weights=/path/to/it (weights=none: a random init)"
        )
    source = resolve_weights(weights, about)
    if source is not None and not source.is_file():
        raise FileNotFoundError(f"weights file {source} not found: {about}")
    net = TimmBackbone(**settings)
    if source is not None:
        net.load_pretrained(source)
    return net
