"""Jobs sharing one work_dir: each artifact is built once, under its lock, and reused by the
others (real processes, started together)."""

import logging
import multiprocessing
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from breastnet.cli import run_stages

from conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.slow
CONTEXT = multiprocessing.get_context("spawn")  # a fresh interpreter each, as a job has


def _run(cfg: DictConfig, start, done) -> None:
    """A child: wait for the others, run the stages, report whether it reused a model."""
    reused = []
    handler = logging.Handler()
    handler.emit = lambda record: reused.append("already trained" in record.getMessage())
    logging.getLogger("breastnet").addHandler(handler)
    logging.getLogger("breastnet").setLevel(logging.INFO)
    start.wait()
    metrics = run_stages(cfg)
    done.put((any(reused), metrics))


def run_together(cfg: DictConfig, n: int) -> list[tuple[bool, dict]]:
    """Run the stages of ``cfg`` in ``n`` processes started at the same moment."""
    OmegaConf.resolve(cfg)  # the run dir's ${hydra:...} resolves here, not in the children
    start, done = CONTEXT.Barrier(n), CONTEXT.Queue()
    children = [CONTEXT.Process(target=_run, args=(cfg, start, done)) for _ in range(n)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=600)
        assert child.exitcode == 0
    return [done.get(timeout=10) for _ in children]


def artifacts(work: Path) -> dict[str, bytes]:
    """Every artifact file of a work dir by relative path (lock files left out); the cache
    journal as a sorted list of lines (jobs append in the order they finish)."""
    files = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file() and p.suffix != ".lock"):
        data = path.read_bytes()
        if path.name == "manifest.jsonl":
            data = b"".join(sorted(data.splitlines(keepends=True)))
        files[path.relative_to(work).as_posix()] = data
    return files


def test_four_prepares_at_once_build_one_cache(tiny_bach: Path, tmp_path: Path) -> None:
    overrides = [*SMALL_RUN, f"data.data_dir={tiny_bach}", "stages=[prepare]"]
    overrides += ["data.tile_size=32", "data.stride=32"]  # the 64x48 images: 2 tiles each
    together = compose_config(tmp_path / "together", *overrides)
    run_together(together, 4)
    serial = compose_config(tmp_path / "serial", *overrides)
    run_stages(serial)
    built, reference = (
        artifacts(tmp_path / "together" / "work"),
        artifacts(tmp_path / "serial" / "work"),
    )
    assert built.keys() == reference.keys()
    for name, data in reference.items():
        assert built[name] == data, name
    (manifest,) = [n for n in built if n.endswith("manifest.jsonl")]
    assert len(built[manifest].splitlines()) == 16  # each of the 16 images tiled once
    assert sum(n.endswith(".npy") for n in built) == 16


def test_two_identical_trainings_train_once(tiny_bach: Path, tmp_path: Path) -> None:
    overrides = [*SMALL_RUN, f"data.data_dir={tiny_bach}", "trainer.max_epochs=1"]
    overrides += ["data.tile_size=32", "data.stride=32"]
    run_stages(compose_config(tmp_path, *overrides, "stages=[prepare]"))
    results = run_together(compose_config(tmp_path, *overrides, "stages=[patch]"), 2)
    assert sorted(reused for reused, _ in results) == [False, True]  # one trained
    (first, _), (second, _) = ((m, r) for r, m in results)
    assert first == second  # the reuser returns the trainer's metrics
    (model,) = (tmp_path / "work" / "patch").iterdir()
    assert (model / "DONE").is_file()
