"""``tests/slurm/cluster.sh`` stops the daemons by their pid files, only those named, and the
``cluster`` fixture names only those it started: no SLURM needed, ``sleep`` processes stand in
for the daemons."""

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cluster import CLUSTER, running_daemons, stop_started

DAEMONS = ("munged", "slurmctld", "slurmd")


@pytest.fixture
def daemons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A ``sleep`` per daemon, its pid in the daemon's pid file of a cluster dir in tmp_path."""
    monkeypatch.setenv("BREASTNET_SLURM_DIR", str(tmp_path))
    procs = {}
    for name in DAEMONS:
        procs[name] = subprocess.Popen(["sleep", "120"])
        # reaped as soon as it ends: a zombie would still answer `kill -0`
        threading.Thread(target=procs[name].wait, daemon=True).start()
        (tmp_path / f"{name}.pid").write_text(f"{procs[name].pid}\n")
    yield procs
    for proc in procs.values():
        proc.kill()


def test_stop_ends_only_the_named_daemons(daemons: dict, tmp_path: Path) -> None:
    assert running_daemons() == set(DAEMONS)
    done = subprocess.run(
        [str(CLUSTER), "stop", "slurmd", "slurmctld"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert daemons["slurmd"].wait(5) is not None and daemons["slurmctld"].wait(5) is not None
    assert daemons["munged"].poll() is None
    assert sorted(p.name for p in tmp_path.glob("*.pid")) == ["munged.pid"]
    assert running_daemons() == {"munged"}


def test_the_fixture_stops_what_it_started_not_what_ran_before(daemons: dict) -> None:
    before = {"munged"}  # running when the tests began; the fixture started the other two
    stop_started(before)
    assert daemons["slurmd"].wait(5) is not None and daemons["slurmctld"].wait(5) is not None
    assert daemons["munged"].poll() is None
    stop_started(running_daemons())  # nothing new since: nothing stopped
    assert daemons["munged"].poll() is None
