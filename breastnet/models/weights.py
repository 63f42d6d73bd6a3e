"""Weight files: a state dict from a file (``.pth``, ``.bin``, ``.safetensors``), from the
Hugging Face cache, or torchvision's ImageNet weights from the hub cache, fetched with a
timeout of their own so an offline machine fails fast with the path to put the file at (never
a silent random init). Every file loads strictly, and its content hash, not its path, names
it in artifact keys: a file that is not there has no key (``breastnet.models.resolve`` gets
it at startup, before any key is computed)."""

import hashlib
import logging
import os
import re
import urllib.request
from collections.abc import Collection, Mapping
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from breastnet.artifacts import atomic_write
from breastnet.errors import ConfigError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 15.0
"""Socket timeout of the ImageNet weights download (that connection's alone)."""
# torchvision names its files <name>-<first hex digits of the sha256>.pth
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
HF_PREFIX = "hf-hub:"
"""``weights=hf-hub:<owner>/<repo>``: the repository's weights file from the Hugging Face cache."""
HF_FILES = ("model.safetensors", "pytorch_model.bin")
"""The names a timm repository on the Hugging Face hub gives its weights, in order of choice."""
HUB_TIMEOUT_S = 10.0
"""Timeout of the one request (no retries) that asks the hub for a file not in the cache."""
NAMED_WEIGHTS = ("none", "imagenet")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a file, plain or nested under ``state_dict``/``model``, as float32.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load``
    (tensors only).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} not found (weights: imagenet | none | "
            "/path/to/state_dict.pth | .bin | .safetensors)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(path, device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} holds no state dict of tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def imagenet_state_dict(name: str, weights: WeightsEnum) -> dict[str, Tensor]:
    """torchvision's ImageNet weights from the hub cache, else a download that fails fast."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not file.is_file():
        try:
            _download(weights.url, file)
        except OSError as err:  # URLError, timeouts, refused connections, a bad checksum
            raise RuntimeError(
                f"ImageNet weights for {name} are not cached and could not be downloaded "
                f"({err}). Fetch {weights.url} elsewhere and put it at {file} "
                f"($TORCH_HOME/hub/checkpoints/{file.name}), or pass "
                f"weights=/path/to/state_dict.pth (patch_model.net.weights=...), or "
                f"weights=none to train from scratch."
            ) from err
    return read_state_dict(file)


def _download(url: str, file: Path) -> None:
    """Fetch ``url`` into ``file`` (atomically), checking the sha256 prefix in its name."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        data = response.read()
    expected = _HASH_IN_NAME.search(file.name)
    if expected and not hashlib.sha256(data).hexdigest().startswith(expected.group(1)):
        raise OSError(f"{url}: the download does not match its sha256 prefix {expected[1]}")
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda f: f.write(data))


def hf_hub_file(repo: str, what: str) -> Path:
    """The weights file of Hugging Face repository ``repo``: from the local cache, else
    downloaded once. One request per candidate file, with a short timeout and no retries, asks
    the hub first, so an offline machine (or ``HF_HUB_OFFLINE=1``) is told at once instead of
    after the hub client's own retries; a file not found is one error saying how to get it.

    Args:
        repo: ``owner/name`` on the hub.
        what: where the weights come from and on what terms, for the message.

    Raises:
        ConfigError: the file is neither cached nor downloadable.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if (cached := _cached_hf_file(repo)) is not None:
        return cached
    if constants.is_offline_mode():
        raise hub_weights_missing(repo, what, "HF_HUB_OFFLINE=1 forbids downloading it")
    for filename in HF_FILES:
        try:
            get_hf_file_metadata(hf_hub_url(repo, filename), timeout=HUB_TIMEOUT_S)
        except EntryNotFoundError:
            continue  # the repository has the other name
        except HfHubHTTPError as err:  # gated without access (401/403), no such repository
            status = err.response.status_code if err.response is not None else "?"
            why = f"the hub refused it (HTTP {status}: log in and accept its terms)"
            raise hub_weights_missing(repo, what, why) from err
        except Exception as err:  # DNS, refused connection, timeout, proxy: no network
            why = f"huggingface.co could not be reached ({type(err).__name__}: {err})"
            raise hub_weights_missing(repo, what, why) from err
        log.info("downloading %s of %s into the Hugging Face cache", filename, repo)
        return Path(hf_hub_download(repo, filename, etag_timeout=HUB_TIMEOUT_S))
    raise hub_weights_missing(repo, what, f"the repository holds no {' or '.join(HF_FILES)}")


def hub_weights_missing(repo: str, what: str, why: str) -> ConfigError:
    """The one message for hub weights that are not here: the two ways to get them."""
    from huggingface_hub import constants

    return ConfigError(
        f"{what}. Its weights file (patch_model.net.weights={HF_PREFIX}{repo}) is not in the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. Either download its "
        f"model.safetensors (or pytorch_model.bin) from https://huggingface.co/{repo} and set "
        "patch_model.net.weights=/path/to/that/file, or on a machine with internet accept its "
        f"terms on the hub, run `hf auth login; hf download {repo}` and copy the cache here "
        "(HF_HUB_OFFLINE=1 then reads it offline)."
    )


def resolve_weights(weights: str | os.PathLike, what: str) -> Path | None:
    """The file behind a ``weights`` setting: None for ``none``, the cached file of
    ``hf-hub:<repo>``, else the path itself."""
    text = str(weights)
    if text == "none":
        return None
    if text.startswith(HF_PREFIX):
        return hf_hub_file(text.removeprefix(HF_PREFIX), what)
    return Path(text).expanduser()


def _cached_hf_file(repo: str) -> Path | None:
    """The weights file of ``repo`` in the Hugging Face cache, if one is there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in HF_FILES:
        if isinstance(found := try_to_load_from_cache(repo, filename), str):
            return Path(found)
    return None


@lru_cache(maxsize=64)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, computed once per process while it is unchanged
    (a ViT-g file is gigabytes)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def weights_fingerprint(weights: str | os.PathLike | None) -> str | None:
    """What names ``weights`` in an artifact key: ``none``/``imagenet`` as they are, a file by
    its content (``sha256:<hex>``), so a moved or renamed copy keeps its key and another file
    under the same name gets another; ``hf-hub:<repo>`` by its cached file's content.

    Raises:
        ConfigError: the file is not there (not yet downloaded): a key of the path or
            repository name would move once it is, orphaning what was built under it.
    """
    if weights is None or str(weights) in NAMED_WEIGHTS:
        return None if weights is None else str(weights)
    text = str(weights)
    if text.startswith(HF_PREFIX):
        repo = text.removeprefix(HF_PREFIX)
        if (cached := _cached_hf_file(repo)) is None:
            what = f"The artifact keys hold the content hash of {repo}'s weights"
            raise hub_weights_missing(repo, what, "it has not been downloaded yet")
        return f"{text}@sha256:{file_sha256(cached)}"
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights file {path} not found (patch_model.net.weights={text}): put the file "
            "there or set patch_model.net.weights to where it is"
        )
    return f"sha256:{file_sha256(path)}"


def load_strict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    source: object,
    what: str,
    skip: Collection[str] = (),
) -> None:
    """Load ``state`` into ``module``: every key but those under the ``skip`` prefixes (new
    heads) must be there with its shape, and no other, or one error names the missing,
    unexpected and misshapen keys (a wrong file never leaves layers at random init)."""
    head = tuple(f"{layer}." for layer in skip)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(head)}
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
            f"{len(keys)} {kind} keys ({', '.join(keys[:5])}{', ...' * (len(keys) > 5)})"
            for kind, keys in problems.items()
            if keys
        )
        raise ValueError(f"weights {source} do not fit {what}: {found}")
    module.load_state_dict(state, strict=False)
