"""Weight files: a state dict from a file, or torchvision's ImageNet weights from the hub
cache, fetched with a timeout of their own so an offline machine fails fast with the path to
put the file at (never a silent random init)."""

import hashlib
import re
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor
from torchvision.models import WeightsEnum

from breastnet.artifacts import atomic_write

DOWNLOAD_TIMEOUT_S = 15.0
"""Socket timeout of the ImageNet weights download (that connection's alone)."""
# torchvision names its files <name>-<first hex digits of the sha256>.pth
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def read_state_dict(path: Path) -> dict[str, Tensor]:
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
