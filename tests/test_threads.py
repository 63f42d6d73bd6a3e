"""Threads and worker processes sized to the CPUs a process may use: its affinity mask, the
SLURM allocation, a cgroup quota, or BREASTNET_CPUS; the config's worker defaults follow."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from breastnet.errors import ConfigError
from breastnet.threads import available_cpus, configure_torch, passive_openmp, workers

from conftest import compose_config

AFFINITY = len(os.sched_getaffinity(0))
NO_QUOTA = Path("/nonexistent/cpu.max")


@pytest.fixture
def one_cpu_affinity() -> Iterator[None]:
    """This thread pinned to one CPU (as ``taskset -c 0`` would), restored after."""
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mask)})
    yield
    os.sched_setaffinity(0, mask)


def test_affinity_mask_counts(one_cpu_affinity: None) -> None:
    assert available_cpus({}, NO_QUOTA) == 1
    assert available_cpus({"SLURM_CPUS_PER_TASK": "8"}, NO_QUOTA) == 1  # the fewer wins


def test_slurm_cpus_per_task_counts() -> None:
    assert available_cpus({}, NO_QUOTA) == AFFINITY
    assert available_cpus({"SLURM_CPUS_PER_TASK": "1"}, NO_QUOTA) == 1
    assert available_cpus({"SLURM_CPUS_PER_TASK": "4096"}, NO_QUOTA) == AFFINITY
    assert available_cpus({"SLURM_CPUS_PER_TASK": ""}, NO_QUOTA) == AFFINITY


def test_cgroup_quota_counts(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("50000 100000\n")  # half a CPU: one
    assert available_cpus({}, cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert available_cpus({}, cpu_max) == AFFINITY


def test_breastnet_cpus_overrides_everything(one_cpu_affinity: None, tmp_path: Path) -> None:
    assert available_cpus({"BREASTNET_CPUS": "6", "SLURM_CPUS_PER_TASK": "2"}, NO_QUOTA) == 6
    for bad in ("0", "two", "-1", "1.5"):
        with pytest.raises(ConfigError, match=f"BREASTNET_CPUS='{bad}': set it to a whole"):
            available_cpus({"BREASTNET_CPUS": bad}, NO_QUOTA)


@pytest.mark.parametrize(
    ("cpus", "loader", "prepare"), [("1", 0, 1), ("2", 1, 2), ("3", 2, 2), ("16", 2, 2)]
)
def test_worker_defaults_follow_the_cpus(
    cpus: str, loader: int, prepare: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.num_workers`` leaves one CPU to the trainer, ``prepare_workers`` takes them all,
    both at most the former fixed 2; a number given on the command line stays as it is."""
    monkeypatch.setenv("BREASTNET_CPUS", cpus)
    assert (workers(2, 1), workers(2)) == (loader, prepare)
    cfg = compose_config(tmp_path)
    assert (cfg.data.num_workers, cfg.data.prepare_workers) == (loader, prepare)
    given = OmegaConf.to_container(compose_config(tmp_path, "data.num_workers=3"))
    assert given["data"]["num_workers"] == 3


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """torch's thread count restored after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_configure_torch_sets_the_threads(
    torch_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("BREASTNET_CPUS", "1")
    assert configure_torch() == 1 == torch.get_num_threads()
    torch.set_num_threads(2)  # as OMP_NUM_THREADS=2 made it when torch started
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own number keeps its word
    assert configure_torch() == 2 == torch.get_num_threads()


def test_openmp_threads_wait_passively_unless_told_otherwise() -> None:
    env: dict[str, str] = {}
    passive_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    passive_openmp(mine)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_cli_sets_the_wait_policy_before_torch_starts() -> None:
    """In a fresh process: ``main`` runs before any torch import, and the policy is set."""
    code = (
        "import os, sys; sys.argv = ['breastnet', '--help']\n"
        "from breastnet import cli\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE"
