"""SLURM defaults without a cluster: ``train.sbatch`` refuses to start without DATA (by hand,
before it submits itself, and again in the job), runs the paper's recipe on a patient-aware
split, and the launcher asks no GPU for a CPU trainer. ``sbatch`` and ``srun`` are stand-ins
that record their arguments."""

import os
import subprocess
from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import ROOT, compose_config

SCRIPT = ROOT / "experiments" / "slurm" / "train.sbatch"
RECORD = '#!/bin/sh\necho "$(basename "$0") $*" >> "$RECORDED"\n'


@pytest.fixture
def slurm_bin(tmp_path: Path) -> dict[str, str]:
    """An environment whose ``sbatch``, ``srun`` and venv record instead of running, with no
    SLURM job and no DATA in it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):
        (bin_dir / name).write_text(RECORD)
        (bin_dir / name).chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DATA"}
    env |= {"PATH": f"{bin_dir}:/usr/bin:/bin", "VENV": str(venv)}
    return env | {"RECORDED": str(tmp_path / "recorded.txt")}


def sbatch_script(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True
    )


def test_no_data_is_one_line_and_nothing_submitted(slurm_bin: dict, tmp_path: Path) -> None:
    done = sbatch_script(slurm_bin, tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        "train.sbatch: set DATA, the BACH folder: "
        "DATA=/data/BACH bash experiments/slurm/train.sbatch\n"
    )
    in_job = sbatch_script(slurm_bin | {"SLURM_JOB_ID": "7"}, tmp_path)  # sbatch'ed without it
    assert in_job.returncode == 1 and in_job.stderr == done.stderr
    missing = sbatch_script(slurm_bin | {"DATA": str(tmp_path / "BACH")}, tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"train.sbatch: DATA={tmp_path / 'BACH'} is not a directory")
    assert not (tmp_path / "recorded.txt").exists()


def test_by_hand_it_checks_then_submits_itself(slurm_bin: dict, tmp_path: Path) -> None:
    (tmp_path / "BACH").mkdir()
    done = sbatch_script(slurm_bin | {"DATA": str(tmp_path / "BACH")}, tmp_path, "-p", "gpu")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "recorded.txt").read_text() == f"sbatch -p gpu {SCRIPT}\n"
    assert (tmp_path / "logs" / "slurm").is_dir()  # where its --output goes


def test_the_job_runs_the_paper_on_a_patient_aware_split(slurm_bin: dict, tmp_path: Path) -> None:
    (tmp_path / "BACH").mkdir()
    job = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "8", "SLURM_NTASKS_PER_NODE": "4"}
    env = slurm_bin | job | {"SLURM_NNODES": "1", "DATA": str(tmp_path / "BACH")}
    done = sbatch_script(env, tmp_path)
    assert done.returncode == 0, done.stderr
    prepare, train = (tmp_path / "recorded.txt").read_text().splitlines()
    for step in (prepare, train):
        assert " experiment=paper data.split=eva data.groups=bach data.data_dir=" in step
    own = sbatch_script(env | {"SPLIT": ""}, tmp_path)  # the paper's own (leaky) split
    assert own.returncode == 0, own.stderr
    assert "data.split" not in (tmp_path / "recorded.txt").read_text().splitlines()[-1]
    demo = sbatch_script(env | {"EXPERIMENT": "demo"}, tmp_path)  # keeps its own split
    assert demo.returncode == 0, demo.stderr
    last = (tmp_path / "recorded.txt").read_text().splitlines()[-1]
    assert " experiment=demo data.data_dir=" in last


@pytest.mark.parametrize(
    ("trainer", "gpus", "tasks"),
    [
        ("trainer=cpu", 0, 1),
        ("trainer=ddp_cpu", 0, 2),
        ("trainer.accelerator=cpu", 0, 1),
        ("trainer=gpu", 1, 1),
        ("trainer=ddp", 4, 4),
        ("trainer=default", 1, 1),  # accelerator auto: a GPU where there is one
    ],
)
def test_launcher_asks_gpus_only_for_a_gpu_trainer(
    trainer: str, gpus: int, tasks: int, tmp_path: Path
) -> None:
    cfg = compose_config(tmp_path, "hydra/launcher=slurm", trainer, keep_hydra=True)
    launcher = instantiate(cfg.hydra.launcher)  # as Hydra does: ${trainer.*} resolved here
    assert (launcher.params["gpus_per_node"], launcher.params["tasks_per_node"]) == (gpus, tasks)
