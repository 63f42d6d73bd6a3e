"""Against a real one-node SLURM cluster (``tests/slurm/cluster.sh``): ``train.sbatch`` on two
srun tasks, a ``hydra/launcher=slurm`` sweep of two array jobs on one work_dir, and a job
requeued mid-epoch. Run with ``pytest -m slurm``; skipped where the daemons cannot start."""

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from breastnet.synthetic import write_synthetic_dataset

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

CLUSTER = Path(__file__).with_name("cluster.sh")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
# The whole pipeline on a CPU in seconds: 32 px patches, a small CNN, one epoch each.
TINY = [
    "data.tile_size=64",
    "data.stride=64",
    "data.patch_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.prepare_workers=0",
    "data.split=[0.5,0.25,0.25]",
    "patch_model=mobilenet_v2",
    "patch_model.net.weights=none",
    "trainer.max_epochs=1",
    "image.max_epochs=2",
    "logger=csv",
]
# What every job gets: this interpreter's venv, this checkout, one thread per task.
JOB_ENV = {
    "VENV": str(Path(sys.executable).parents[1]),
    "PYTHONPATH": str(ROOT),
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}


def running_daemons() -> set[str]:
    """The cluster's daemons alive now (by their pid files)."""
    out = subprocess.run([str(CLUSTER), "running"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def stop_started(before: set[str]) -> None:
    """Stop the daemons that run now and did not run ``before``."""
    if started := running_daemons() - before:
        subprocess.run([str(CLUSTER), "stop", *sorted(started)], check=True, timeout=120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """Start the cluster (or find it running); the environment its commands need. The
    daemons it started are stopped afterwards (also when it could not start them all), those
    running before are left running."""
    before = running_daemons()
    try:
        started = subprocess.run(
            [str(CLUSTER), "start"], capture_output=True, text=True, timeout=300
        )
        problem = started.stderr.strip()[-500:] if started.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    if problem is not None:
        stop_started(before)
        pytest.skip(f"the SLURM daemons could not start: {problem}")
    conf = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True, check=True)
    env = os.environ | JOB_ENV | {"SLURM_CONF": conf.stdout.split("=", 1)[1].strip()}
    yield env
    stop_started(before)


def sbatch(env: dict[str, str], *args: str, cwd: Path = ROOT) -> str:
    """Submit; returns the job id."""
    done = subprocess.run(
        ["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job(env: dict[str, str], job_id: str) -> dict[str, str]:
    """The job's fields as ``scontrol show job`` gives them (Key=Value)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait(env: dict[str, str], job_id: str, timeout: float = 900) -> dict[str, str]:
    """Poll until the job ends; returns its fields."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        fields = job(env, job_id)
        if fields.get("JobState") in FINISHED:
            print(f"job {job_id}: {fields['JobState']} exit {fields.get('ExitCode')}")
            return fields
        time.sleep(2)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} did not end within {timeout} s: {job(env, job_id)}")


def test_train_sbatch_on_two_tasks(cluster: dict[str, str], tmp_path: Path) -> None:
    """experiments/slurm/train.sbatch with two srun tasks on the CPU: prepare in one task,
    every other stage on both (ranks from SLURMEnvironment, gloo); one report."""
    data = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=7)
    env = cluster | {
        "DATA": str(data),
        "WORK": str(tmp_path / "work"),
        "LOGS": str(tmp_path / "logs"),
        "EXPERIMENT": "demo",
        # placement only (kept out of every key): no GPU, no CUDA-only synced BatchNorm
        "ARGS": " ".join([*TINY, "trainer.accelerator=cpu", "++trainer.sync_batchnorm=false"]),
    }
    job_id = sbatch(
        env,
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--mem=6G",
        "--time=20",
        f"--output={tmp_path}/%j.out",
        str(ROOT / "experiments" / "slurm" / "train.sbatch"),
    )
    fields = wait(cluster, job_id)
    log = (tmp_path / f"{job_id}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    (report,) = (tmp_path / "work" / "reports").iterdir()
    assert (report / "index.html").is_file()
    # one metrics.json per step (rank 0's alone), in the first attempt's run dirs
    found = sorted((tmp_path / "logs" / job_id).rglob("metrics.json"))
    assert [p.relative_to(tmp_path / "logs" / job_id).parent.as_posix() for p in found] == [
        "0/prepare",
        "0/train",
    ]
    assert "eval/image_accuracy" in json.loads(found[1].read_text())


def test_a_sweep_of_two_array_jobs_on_one_work_dir(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """Two folds submitted by hydra/launcher=slurm run at once on one work_dir: both finish,
    one cache is built (each image tiled once), and the summary reads both jobs."""
    data = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=7)
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "breastnet",
        "-m",
        "hydra/launcher=slurm",
        "experiment=demo",
        *TINY,
        "trainer=cpu",
        "data.folds=2",
        "data.fold=range(2)",
        f"data.data_dir={data}",
        f"paths.work_dir={tmp_path / 'work'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={sweep}",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=4",
        "hydra.launcher.timeout_min=20",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    submitted = (sweep / ".submitit").iterdir()  # <array id>_<task>/ per job
    ids = sorted({p.name.split("_")[0] for p in submitted if p.name[0].isdigit()})
    assert len(ids) == 1  # one array job
    # submitit returns once each job wrote its result, a moment before SLURM ends the job
    states = [wait(cluster, f"{ids[0]}_{i}", timeout=120) for i in range(2)]
    print(f"array job {ids[0]}: {[(s['JobId'], s['JobState'], s['ExitCode']) for s in states]}")
    assert [(s["JobState"], s["ExitCode"]) for s in states] == [("COMPLETED", "0:0")] * 2
    (cache,) = (tmp_path / "work" / "cache").iterdir()
    lines = (cache / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 16  # every image tiled once, by one of the two jobs
    assert len(list((tmp_path / "work" / "reports").iterdir())) == 2  # one per fold
    summary = subprocess.run(
        [sys.executable, "-m", "breastnet.summary", str(sweep)],
        cwd=ROOT,
        env=cluster,
        capture_output=True,
        text=True,
    )
    assert summary.returncode == 0, summary.stderr
    assert "2 jobs" in (sweep / "summary.md").read_text()


REQUEUE_SCRIPT = """#!/bin/bash
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=3G
#SBATCH --requeue
#SBATCH --open-mode=append
source "$VENV/bin/activate"
srun python -m breastnet 'stages=[prepare,patch]' "$@" \\
    hydra.run.dir="$LOGS/$SLURM_JOB_ID/${SLURM_RESTART_COUNT:-0}"
"""


def test_a_requeued_job_resumes_to_the_same_weights(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """`scontrol requeue` of a job in its second epoch: the requeued job resumes the patch
    model from last.ckpt and ends with the weights of a run that was never interrupted."""
    data = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=7)
    script = tmp_path / "patch.sbatch"
    script.write_text(REQUEUE_SCRIPT)
    env = cluster | {"LOGS": str(tmp_path / "logs")}
    epochs = 4
    jobs = {}
    for name in ("uninterrupted", "requeued"):
        overrides = [
            "experiment=demo",
            *TINY,
            "trainer=cpu",
            f"trainer.max_epochs={epochs}",
            "data.batch_size=4",
            f"data.data_dir={data}",
            f"paths.work_dir={tmp_path / name}",
        ]
        jobs[name] = sbatch(env, f"--output={tmp_path}/{name}.out", str(script), *overrides)
    while not list(
        (tmp_path / "requeued" / "patch").glob("*/last.ckpt")
    ):  # the first epoch is over
        assert job(cluster, jobs["requeued"]).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", jobs["requeued"]], env=cluster, check=True)
    # A requeued job waits for a begin time (about two minutes); let it start at once.
    while (fields := job(cluster, jobs["requeued"]))["JobState"] != "RUNNING":
        if fields["JobState"] == "PENDING":
            subprocess.run(
                ["scontrol", "update", f"jobid={jobs['requeued']}", "StartTime=now"], env=cluster
            )
        time.sleep(1)
    states = {name: wait(cluster, job_id) for name, job_id in jobs.items()}
    for name, fields in states.items():
        log = (tmp_path / f"{name}.out").read_text()
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert (states["requeued"]["Restarts"], states["uninterrupted"]["Restarts"]) == ("1", "0")
    # Its output holds both attempts (--open-mode=append): one epoch done, then the requeue.
    before, after = (tmp_path / "requeued.out").read_text().split("DUE TO JOB REQUEUE", 1)
    assert "patch epoch 1/4" in before and "patch epoch 4/4" not in before
    assert "Restored all states from the checkpoint" in after and "patch epoch 4/4" in after
    second = (tmp_path / "logs" / jobs["requeued"] / "1" / "cli.log").read_text()  # Hydra's
    assert "resuming from" in second and "last.ckpt" in second

    def weights(name: str) -> dict[str, torch.Tensor]:
        (ckpt,) = (tmp_path / name / "patch").glob("*/last.ckpt")
        return torch.load(ckpt, weights_only=False, map_location="cpu")["state_dict"]

    resumed, reference = weights("requeued"), weights("uninterrupted")
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
