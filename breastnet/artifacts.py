"""Artifacts in ``work_dir``: content-hash keys, atomic writes, DONE markers and file locks, so
reruns reuse and resume, and jobs sharing a work_dir build each artifact once
(docs/architecture.md, "Locks")."""

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def config_hash(obj: Any, length: int = 10) -> str:
    """Short stable hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:length]


# Salt of every artifact key: bump it when what an artifact holds changes for the same
# settings, so no artifact of an older format is reused.
FORMAT = 2


def artifact_key(settings: Mapping[str, Any]) -> str:
    """An artifact key: the hash of its settings and the format version."""
    return config_hash({"format": FORMAT, **settings})


def container(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (for hashing and saving)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes 0600 files; artifacts get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, then rename it.

    An interrupted write never leaves a half-written artifact under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lock_path(path: Path) -> Path:
    """The lock file of an artifact: ``.lock`` inside a directory artifact (a name without a
    suffix: ``patch/<key>``), ``.<name>.lock`` beside a file; hidden either way, so listings
    and globs of artifacts do not see them."""
    return path / ".lock" if not path.suffix else path.with_name(f".{path.name}.lock")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the artifact's lock (an ``fcntl`` lock on ``lock_path(path)``) while checking,
    building and renaming it: a second process (another job on the same work_dir) waits here,
    then finds it built and reuses it.
    """
    lock = FileLock(lock_path(path))
    Path(lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.info("waiting for another process building %s", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_text(path: Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write JSON (indented, keys sorted)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_npy(path: Path, array: np.ndarray) -> None:
    """Atomically write a ``.npy`` array (readable with ``np.load(mmap_mode="r")``)."""
    atomic_write(path, lambda f: np.save(f, array))


def finish_stage(out_dir: Path, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Record a finished stage: its config, its metrics, then the DONE marker (last)."""
    write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "DONE", "")


def finished_metrics(out_dir: Path) -> dict[str, float] | None:
    """The metrics of a finished stage, or None if it has not finished."""
    if not (out_dir / "DONE").is_file():
        return None
    return json.loads((out_dir / "metrics.json").read_text())
