"""The patch model's weights, resolved once at startup: before prepare, before any key.

Every stage after prepare keys its artifacts by the weights' content hash
(``breastnet.lineage``), so the file must be here before the first key is computed: a key
taken before a first download and one taken after it would differ, and what was built under
the first would be looked for under the second. A missing file stops the run here, in one
message, before the index and the patch cache are built; ``hf-hub:<repo>`` not yet cached is
downloaded once (by rank 0; the other ranks then find it in the cache). A frozen encoder with
random weights (``weights=none`` and ``patch_model.freeze=true``) is refused: it would embed
every tile with noise. torchvision's ``imagenet`` is keyed by its name, so it is still
fetched when the network is built (``breastnet.models.weights.imagenet_state_dict``).
"""

import logging
from functools import partial
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from breastnet import distributed
from breastnet.errors import ConfigError
from breastnet.models.weights import HF_PREFIX, hf_hub_file, weights_fingerprint

log = logging.getLogger(__name__)

TORCHVISION = "breastnet.models.backbone.build_backbone"
"""The builder of torchvision networks, the only ones with ``weights=imagenet``."""
ANY_FILE = "set patch_model.net.weights=/path/to/the/file (.safetensors, .bin, .pth)"


def resolve_at_startup(cfg: DictConfig) -> None:
    """Resolve the patch model's weights when ``cfg.stages`` holds a stage after prepare
    (each keys its artifacts by them); rank 0 downloads, the other ranks then read the cache
    (or download on a node of their own)."""
    if all(stage == "prepare" for stage in cfg.stages):
        return
    distributed.on_rank_zero(partial(resolve_patch_weights, cfg))
    if distributed.rank() > 0:
        resolve_patch_weights(cfg)


def resolve_patch_weights(cfg: DictConfig) -> str | None:
    """Get ``patch_model.net.weights`` here (a file that exists, ``hf-hub:<repo>`` in the
    Hugging Face cache) and return what keys them (``weights_fingerprint``, by content).

    Raises:
        ConfigError: no weights are set, the file is missing and cannot be downloaded, a timm
            network is given torchvision's ``imagenet``, or random weights would stay frozen;
            the message names the entry, the setting and the two ways to get weights.
    """
    net = cfg.patch_model.net
    weights, entry = net.get("weights"), _entry(cfg)
    text = str(weights)
    if weights is None:
        raise ConfigError(f"{entry}: patch_model.net.weights is not set. {_ways(net)}")
    if text == "none" and cfg.patch_model.get("freeze", False):
        raise ConfigError(
            f"{entry}: patch_model.net.weights=none with patch_model.freeze=true would embed "
            f"every tile with a random, frozen {net.get('name')}. {_ways(net)}. Or train it "
            "from scratch: patch_model.freeze=false"
        )
    if text == "imagenet" and net.get("_target_") != TORCHVISION:
        raise ConfigError(
            f"{entry}: patch_model.net.weights=imagenet names torchvision's weights, not "
            f"{net.get('name')}'s. {_ways(net)}"
        )
    if text.startswith(HF_PREFIX):
        # timm, imported for a hub entry alone (python -m breastnet starts without it)
        from breastnet.models.timm_backbone import source_of

        about = source_of(net.get("name", "?"), net.get("repo"), net.get("licence"))
        hf_hub_file(text.removeprefix(HF_PREFIX), f"{entry}: {about}")
    elif text not in ("none", "imagenet") and not Path(text).expanduser().is_file():
        raise ConfigError(
            f"{entry}: weights file {Path(text).expanduser()} not found "
            f"(patch_model.net.weights={text}). {_ways(net)}"
        )
    fingerprint = weights_fingerprint(weights)
    log.info("%s weights: %s", entry, fingerprint)
    return fingerprint


def _entry(cfg: DictConfig) -> str:
    """``patch_model=<entry>`` as the run chose it (the network's name outside a Hydra run)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return f"patch_model={choices.get('patch_model') or cfg.patch_model.net.get('name')}"


def _ways(net: DictConfig) -> str:
    """The two ways to give ``net`` weights: a file, or its source (torchvision's ImageNet
    weights, a release asset, the Hugging Face hub)."""
    repo = net.get("repo")
    if net.get("_target_") == TORCHVISION:
        return (
            "Give it weights: patch_model.net.weights=imagenet (torchvision's, downloaded into "
            f"$TORCH_HOME/hub/checkpoints), or a state dict file: {ANY_FILE}"
        )
    if repo and "://" in repo:  # a release asset, not on the hub
        return f"Give it weights: download {repo} and {ANY_FILE}"
    hub = repo or "<owner>/<repo>"
    return (
        f"Give it weights: put its weights file anywhere and {ANY_FILE}, or on a machine with "
        f"internet log in (`hf auth login`), accept its terms on the hub, run `hf download "
        f"{hub}` (the Hugging Face cache; copy it to an offline machine and set "
        f"HF_HUB_OFFLINE=1 there) and set patch_model.net.weights={HF_PREFIX}{hub}"
    )
