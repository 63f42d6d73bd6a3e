"""Every ``experiments/bench_*.py`` runs: the smallest settings on generated images, and the
ratio lines a GPU or CPU check reads come out as numbers."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from breastnet.synthetic import write_synthetic_dataset

from conftest import ROOT

NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
# script -> its smallest arguments and the lines whose ratio must be a positive number
BENCHMARKS = {
    "bench_prepare.py": (
        ["--n", "4", "--tile-size", "64", "--patch-size", "32", "--jitter-seconds", "0.05"],
        [rf"^prepare_speedup_vs_staintools: {NUMBER}$"],
    ),
    "bench_predict.py": (
        ["--n", "2", "--tile-size", "64", "--patch-size", "32", "--chunk", "8", "--workers", "0"],
        [rf"^streamed, 0 workers, TTA {t}\s+{NUMBER}\s+{NUMBER}" for t in ("off", "on")],
    ),
    "bench_train_step.py": (
        ["--backbone", "mobilenet_v2", "--tile-size", "64", "--patch-size", "32"]
        + ["--batch-size", "4", "--steps", "1", "--warmup", "1"]
        + ["--loader-batches", "1", "--part-samples", "4"],
        [
            rf"^train_step_speedup_tuned_vs_eager: {NUMBER}$",
            rf"^loader_patches_per_s_per_worker: {NUMBER}$",
        ],
    ),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten generated JPEG images per class (bach-dev's format), in BACH layout: enough for
    the default split of bench_train_step's DataModule."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("bench"), 10, 256, 192, ext="jpeg")


def test_every_benchmark_has_a_smoke_test() -> None:
    found = {p.name for p in (ROOT / "experiments").glob("bench_*.py")}
    assert set(BENCHMARKS) <= found
    assert found - set(BENCHMARKS) <= {"bench_features.py"}  # tested beside it


@pytest.mark.parametrize("script", sorted(BENCHMARKS))
def test_benchmark_runs_and_prints_its_ratios(script: str, images: Path, tmp_path: Path) -> None:
    args, patterns = BENCHMARKS[script]
    if script == "bench_train_step.py":
        args = [*args, "--work-dir", str(tmp_path / "work")]
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), "--data", str(images), *args],
        cwd=ROOT,
        # one thread: on a busy machine OpenMP barriers stall tiny ops (conftest.one_thread)
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for pattern in patterns:
        match = re.search(pattern, done.stdout, re.MULTILINE)
        assert match, f"{pattern!r} not in:\n{done.stdout}"
        assert all(float(v) > 0 for v in match.groups())
