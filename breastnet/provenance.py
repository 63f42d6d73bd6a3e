"""Where a report's numbers came from: experiment, config, checkpoints, code and command.

A report read weeks later (or mailed around) must say which models and which code made it;
``breastnet.stages.common.publish_report`` gathers these facts and the report keeps them in
``provenance.json``, ``metrics.json`` and ``index.html``, with the resolved ``config.yaml``.
"""

import hashlib
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import breastnet

HASH_CHARS = 12  # of a checkpoint's sha256: enough to tell two checkpoints apart


def _utc(timestamp: float | None = None) -> str:
    """ISO 8601 in UTC, to the second (now when ``timestamp`` is None)."""
    moment = datetime.now(UTC) if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds")


def resolved(node: Any) -> Any:
    """A config node as plain Python, each value resolved where it can be and kept as written
    where not: ``${hydra:...}`` fails outside a Hydra run (compose API, notebooks), and a
    report must not fail over one path it only records."""
    if not isinstance(node, DictConfig | ListConfig):
        return node
    written = OmegaConf.to_container(node, resolve=False)
    keys = written.keys() if isinstance(written, dict) else range(len(written))
    values = {}
    for k in keys:
        try:
            values[k] = resolved(node[k])
        except OmegaConfBaseException:
            values[k] = written[k]
    return values if isinstance(written, dict) else list(values.values())


def config_yaml(cfg: DictConfig) -> str:
    """The config as YAML, resolved as far as ``resolved`` can."""
    return OmegaConf.to_yaml(OmegaConf.create(resolved(cfg)))


def _git(*args: str) -> str | None:
    """A git command's output in the package's folder; None when git or the repo is missing."""
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(breastnet.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The breastnet commit and whether tracked files differ from it (None, None outside a
    checkout, e.g. a wheel install: a venv inside some other repository is not breastnet's
    history, hence the check that the package itself is tracked)."""
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def checkpoint_facts(path: Path) -> dict[str, str]:
    """A checkpoint's path, sha256 prefix and modification time: which weights, exactly."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "path": str(path),
        "sha256": digest[:HASH_CHARS],
        "modified": _utc(path.stat().st_mtime),
    }


def _experiment() -> str | None:
    """The ``experiment=`` choice of this run (None outside a Hydra run, or without one)."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment")


def _version() -> str | None:
    try:
        return version("breastnet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return None


def provenance(cfg: DictConfig, checkpoints: list[Path]) -> dict[str, Any]:
    """The facts behind a report: experiment and tags, the ``checkpoints`` the stage loaded
    (those that exist), breastnet's commit and version, the UTC time and the command line."""
    tags = cfg.get("tags")
    return {
        "experiment": _experiment(),
        "tags": None if tags is None else list(tags),
        "checkpoints": [checkpoint_facts(p) for p in map(Path, checkpoints) if p.is_file()],
        **git_state(),
        "version": _version(),
        "created": _utc(),
        "command": list(sys.argv),
    }
