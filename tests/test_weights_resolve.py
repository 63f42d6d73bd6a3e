"""The patch model's weights are resolved at startup, before any key or stage: a first download
keeps every key, missing weights stop a run before prepare in one message, a random network is
never a frozen encoder. huggingface.co is a fake served to huggingface_hub's own client
(httpx2's MockTransport), so the real download and cache code runs."""

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from safetensors.torch import save
from test_foundation import FOUNDATION_RUN

from breastnet.cli import run_stages
from breastnet.data.feature_store import FeatureStore
from breastnet.errors import ConfigError
from breastnet.lineage import Lineage, patch_model_settings
from breastnet.models.resolve import resolve_patch_weights
from breastnet.models.timm_backbone import TimmBackbone
from breastnet.models.weights import weights_fingerprint
from breastnet.synthetic import write_synthetic_dataset

from conftest import ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = "lab/tiny"
HEAD, GET = (f"{method} /{REPO}/resolve/main/model.safetensors" for method in ("HEAD", "GET"))


class FakeHub:
    """huggingface.co as huggingface_hub asks it: each repository's ``model.safetensors``
    (404 for any other file); ``status`` answers every request with that HTTP status instead,
    ``reachable=False`` fails the connection. Every request for a file is recorded (not the
    client's own side calls, such as its once-a-day registry of agent harnesses)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.status: int | None = None
        self.reachable = True

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if "/resolve/" in request.url.path:
            self.requests.append(f"{request.method} {request.url.path}")
        if not self.reachable:
            raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)
        if self.status is not None:
            return httpx2.Response(self.status, request=request)
        repo, _, filename = request.url.path.strip("/").partition("/resolve/main/")
        data = self.files.get(repo) if filename == "model.safetensors" else None
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": "0" * 40}
            return httpx2.Response(404, headers=headers, request=request)
        headers = {
            "X-Repo-Commit": "1" * 40,
            "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Linked-Size": str(len(data)),
        }
        body = b"" if request.method == "HEAD" else data
        return httpx2.Response(200, headers=headers, content=body, request=request)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """An empty Hugging Face cache in tmp_path, online, with ``FakeHub`` as huggingface.co."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils._http import default_client_factory

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    fake = FakeHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    yield fake
    huggingface_hub.set_client_factory(default_client_factory)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("demo"), 4, 256, 192, seed=5)


@pytest.fixture(scope="module")
def tiny_bytes() -> bytes:
    """A random-init tiny ViT at 64 px (FOUNDATION_RUN's network), as a safetensors file."""
    return save(TimmBackbone("vit_tiny_patch16_224", {"img_size": 64}).model.state_dict())


def test_a_first_download_keeps_every_key(
    hub: FakeHub, generated: Path, tiny_bytes: bytes, tmp_path: Path
) -> None:
    """The file enters the cache at startup, before any key: the frozen encoder's features
    are written under the key a later run (file cached, nothing asked of the hub) finds."""
    hub.files[REPO] = tiny_bytes
    cfg = compose_config(
        tmp_path,
        *FOUNDATION_RUN,
        f"data.data_dir={generated}",
        f"patch_model.net.weights=hf-hub:{REPO}",
        "stages=[prepare,patch,features]",
    )
    with pytest.raises(ConfigError, match="has not been downloaded yet"):
        weights_fingerprint(f"hf-hub:{REPO}")  # never a key of the repository's name
    run_stages(cfg)
    asked = len(hub.requests)  # the file's metadata, then the file, downloaded once
    assert set(hub.requests) == {HEAD, GET} and hub.requests.count(GET) == 1
    digest = hashlib.sha256(tiny_bytes).hexdigest()
    weights = patch_model_settings(cfg.patch_model)["net"]["weights"]
    assert weights == f"hf-hub:{REPO}@sha256:{digest}"
    keys = Lineage(cfg).keys()
    assert FeatureStore.is_complete(Lineage(cfg).features)
    run_stages(cfg)  # a later run: the cached file, the same keys, the features reused
    assert len(hub.requests) == asked and Lineage(cfg).keys() == keys
    assert resolve_patch_weights(cfg) == weights


@pytest.mark.parametrize(
    ("reachable", "status", "why"),
    [
        (False, None, "huggingface.co could not be reached (ConnectError"),
        (True, 403, "the hub refused it (HTTP 403"),
    ],
)
def test_a_hub_that_does_not_give_the_file_is_asked_once(
    hub: FakeHub, tmp_path: Path, reachable: bool, status: int | None, why: str
) -> None:
    """No network or a gated repository: one request, no retries, one message."""
    hub.reachable, hub.status = reachable, status
    cfg = compose_config(tmp_path, "patch_model=uni2_h")
    with pytest.raises(ConfigError) as err:
        resolve_patch_weights(cfg)
    assert hub.requests == ["HEAD /MahmoodLab/UNI2-h/resolve/main/model.safetensors"]
    message = str(err.value)
    assert message.startswith("patch_model=uni2_h: ") and why in message
    assert "patch_model.net.weights=hf-hub:MahmoodLab/UNI2-h" in message
    assert "hf download MahmoodLab/UNI2-h" in message
    assert "patch_model.net.weights=/path/to/that/file" in message


def test_prepare_alone_needs_no_weights_and_a_later_stage_stops_before_it(
    hub: FakeHub, generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    weights = f"patch_model.net.weights=hf-hub:{REPO}"
    overrides = [*FOUNDATION_RUN, f"data.data_dir={generated}", weights]
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1 forbids downloading it"):
        run_stages(compose_config(tmp_path, *overrides, "stages=[prepare,patch]"))
    assert not (tmp_path / "work").exists() and not hub.requests
    run_stages(compose_config(tmp_path, *overrides, "stages=[prepare]"))
    assert list((tmp_path / "work" / "index").glob("*.csv"))


def test_missing_weights_stop_the_command_line_before_prepare(tmp_path: Path) -> None:
    """experiment=foundation offline without UNI2-h: exit status 1 with one message and no
    traceback, nothing under work_dir (no index, no patch cache)."""
    data = write_synthetic_dataset(tmp_path / "data", 1, 512, 384, seed=1)
    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    args = [f"data.data_dir={data}", f"paths.work_dir={work}", f"paths.log_dir={tmp_path}/logs"]
    cmd = [sys.executable, "-m", "breastnet", "experiment=foundation", *args, "logger=none"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out and "Retrying" not in out
    assert out.count("ERROR") == 1 and "patch_model=uni2_h: " in out
    assert "patch_model.net.weights=hf-hub:MahmoodLab/UNI2-h" in out
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in out
    assert "hf download MahmoodLab/UNI2-h" in out and "weights=/path/to/that/file" in out
    assert not work.exists()


def test_random_weights_are_no_frozen_encoder(tmp_path: Path) -> None:
    """weights=none with freeze=true names the entry and the two ways to get weights;
    random init that trains stays allowed."""
    frozen = compose_config(tmp_path, "experiment=foundation", "patch_model=timm")
    with pytest.raises(ConfigError) as err:
        resolve_patch_weights(frozen)
    message = str(err.value)
    assert message.startswith("patch_model=timm: patch_model.net.weights=none with ")
    assert "patch_model.freeze=true" in message and "random, frozen vit_small" in message
    assert "set patch_model.net.weights=/path/to/the/file" in message
    assert "hf download <owner>/<repo>" in message and "patch_model.freeze=false" in message
    trained = compose_config(tmp_path, "patch_model=timm")
    assert resolve_patch_weights(trained) == "none"


def test_a_missing_weights_file_names_the_entry(tmp_path: Path) -> None:
    missing = tmp_path / "w.pth"
    cfg = compose_config(tmp_path, "patch_model=resnet18", f"patch_model.net.weights={missing}")
    with pytest.raises(ConfigError) as err:
        resolve_patch_weights(cfg)
    assert str(err.value).startswith(f"patch_model=resnet18: weights file {missing} not found")
    assert "patch_model.net.weights=imagenet" in str(err.value)
