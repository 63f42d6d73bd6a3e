"""How many CPUs this process may use, and torch's threads and the worker pools sized to them.

A machine's core count is not what a run may use: a SLURM job gets ``--cpus-per-task``, a
container or ``taskset`` an affinity mask, a cgroup a CPU quota. torch sizes its thread pools
by the machine, DataLoader and prepare workers were fixed numbers: on 2 shared cores a run
then kept more threads busy than it had CPUs, and OpenMP threads that wait for each other on
an oversubscribed CPU spin instead of working. Here the CPUs are counted once:

- ``BREASTNET_CPUS`` when set (an explicit number wins over everything below);
- else the fewest of the affinity mask (``os.sched_getaffinity``), ``SLURM_CPUS_PER_TASK``
  (set by ``sbatch --cpus-per-task``; some clusters do not bind tasks to their CPUs) and the
  cgroup v2 CPU quota (``docker --cpus``).

The CLI sets torch's threads to that number before any stage runs (``OMP_NUM_THREADS``, when
set, keeps its word); ``data.num_workers`` and ``data.prepare_workers`` default to the
``${workers:...}`` resolver. A DataLoader worker runs one torch thread (torch sets it).

Counting is not enough when another job shares the CPUs it counted: OpenMP's threads then
spin while they wait for one that lost its CPU. ``passive_openmp`` makes them sleep instead
(``OMP_WAIT_POLICY=PASSIVE``, read once when the OpenMP runtime starts, so before torch is
imported). Beside one busy loop on 2 cores, ``make demo`` used 42 % more CPU than idle
with spinning threads and less than idle without (README, "CPUs and threads").
"""

import logging
import math
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from breastnet.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "BREASTNET_CPUS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_configured = False  # torch's inter-op pool can be sized once per process


def _cgroup_quota(cpu_max: Path) -> int | None:
    """CPUs the cgroup v2 quota allows (``"200000 100000"`` -> 2), None without one."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))


def available_cpus(env: Mapping[str, str] | None = None, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use (module docstring); ``env`` defaults to ``os.environ``.

    Raises:
        ConfigError: ``BREASTNET_CPUS`` is not a whole number >= 1.
    """
    env = os.environ if env is None else env
    if (given := env.get(ENV, "").strip()) != "":
        if not given.isdigit() or int(given) < 1:
            raise ConfigError(f"{ENV}={given!r}: set it to a whole number of CPUs (>= 1)")
        return int(given)
    counts = [len(os.sched_getaffinity(0))]
    if (slurm := env.get("SLURM_CPUS_PER_TASK", "")).isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    if (quota := _cgroup_quota(cpu_max)) is not None:
        counts.append(quota)
    return min(counts)


def workers(most: int, keep: int = 0) -> int:
    """Worker processes to start: ``most`` at the most, leaving ``keep`` of the available CPUs
    to the process that starts them (``${workers:2,1}`` in conf/data/bach.yaml)."""
    return max(0, min(int(most), available_cpus() - int(keep)))


def passive_openmp(env: MutableMapping[str, str] | None = None) -> None:
    """Waiting OpenMP threads sleep rather than spin (a setting of the user's keeps its
    word); call before torch is imported, as the OpenMP runtime reads it once."""
    (os.environ if env is None else env).setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure_torch() -> int:
    """Size torch's thread pools to the available CPUs, before any work (the CLI calls it at
    the start of each job); returns the intra-op thread count now in use."""
    global _configured
    import torch

    cpus = available_cpus()
    if "OMP_NUM_THREADS" not in os.environ:  # a number the user set keeps its word
        torch.set_num_threads(cpus)
    if not _configured:
        _configured = True
        try:
            torch.set_num_interop_threads(cpus)
        except RuntimeError:  # inter-op work ran already in this process (tests): keep it
            log.debug("torch inter-op threads in use already: %d", torch.get_num_interop_threads())
    log.debug("%d CPUs available; torch threads %d", cpus, torch.get_num_threads())
    return torch.get_num_threads()
