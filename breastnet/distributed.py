"""Ranks for the whole pipeline: start every process once, let rank 0 write, make all wait.

Lightning's ``ddp`` starts ranks > 0 inside the first ``Trainer.fit`` by re-running the command
line; each then runs the stages before that fit on its own, unsynchronised. Here they are
started (or, under SLURM/torchrun, joined) before the first stage, so every stage runs on every
rank with a process group to wait on: rank 0 alone writes shared artifacts (index, cache,
features file, reports, metrics.json), the others wait for it and read them. Each stage's
Trainer then finds the process group (and ``LOCAL_RANK``) in place and starts nothing.

Two timeouts: training collectives fail after ``distributed.collective_timeout_min``; the waits
for rank 0's artifacts (``on_rank_zero``, ``barrier``) run on a group of their own and fail
after ``distributed.timeout_min``, which covers preparing a large cache. See
docs/architecture.md, "Ranks".
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy
from omegaconf import DictConfig
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from breastnet.artifacts import locked
from breastnet.errors import UserError, is_user_error

log = logging.getLogger(__name__)
T = TypeVar("T")
# ddp strategies whose processes start per Trainer call, not by re-running the command line.
STARTS_PER_CALL = ("spawn", "fork", "notebook")
# The process group of the waits for rank 0 (its own timeout); None: the default group.
_wait_group: Any = None


def in_multirun() -> bool:
    """Inside a Hydra multirun (sweep or folds), where jobs share one process."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def launched_per_rank(strategy: Any) -> bool:
    """A ``ddp``-family strategy named by string whose ranks > 0 Lightning starts by re-running
    the command line (``ddp``, ``ddp_find_unused_parameters_true``...), not spawn or fork."""
    return (
        isinstance(strategy, str)
        and strategy.startswith("ddp")
        and not any(word in strategy for word in STARTS_PER_CALL)
    )


def spawned(strategy: str) -> str:
    """The spawning twin of a ``launched_per_rank`` strategy (``ddp_x`` -> ``ddp_spawn_x``)."""
    return "ddp_spawn" + strategy.removeprefix("ddp")


def launch(cfg: DictConfig) -> int:
    """Start (or join) every rank of a multi-process ``ddp`` run; returns the world size.

    A no-op on one process and for ``ddp_spawn`` (and inside a Hydra multirun, where the
    stages fall back to ``ddp_spawn``: re-running the command line would restart the sweep).
    """
    if dist.is_initialized():
        return dist.get_world_size()
    strategy = cfg.trainer.get("strategy")
    if not launched_per_rank(strategy) or (in_multirun() and not SLURMEnvironment.detect()):
        return 1
    trainer, timeouts = cfg.trainer, cfg.distributed
    fabric = Fabric(
        accelerator=trainer.get("accelerator", "auto"),
        devices=trainer.get("devices", "auto"),
        num_nodes=trainer.get("num_nodes", 1),
        strategy=DDPStrategy(timeout=timedelta(minutes=timeouts.collective_timeout_min)),
    )
    if fabric.world_size > 1:
        fabric.launch()
        global _wait_group
        _wait_group = dist.new_group(
            backend="gloo", timeout=timedelta(minutes=timeouts.timeout_min)
        )
        log.info("rank %d of %d started", fabric.global_rank, fabric.world_size)
    return fabric.world_size


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else rank_zero_only.rank


def barrier() -> None:
    """Wait until every rank gets here (nothing on one process)."""
    if dist.is_initialized():
        dist.barrier(group=_wait_group)


def on_rank_zero(work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 alone, then release every rank; returns its result on rank 0.

    A failure on rank 0 is raised on every rank (instead of leaving them at a barrier until
    the process group times out).
    """
    result, error = None, None
    if rank() == 0:
        try:
            result = work()
        except Exception as e:  # re-raised below, after the others are told
            error = e
    if dist.is_initialized():
        status = [None if error is None else _said(error)]
        dist.broadcast_object_list(status, src=0, group=_wait_group)
        if error is None and status[0] is not None:
            message, users = status[0]
            # the user's error is the same message on every rank; a bug keeps a traceback
            raise (UserError if users else RuntimeError)(f"rank 0 failed: {message}")
    if error is not None:
        raise error
    return result


def from_rank_zero(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 alone and give its result to every rank: one view of a shared
    folder (on NFS two ranks listing it at once may see different files)."""
    result = [on_rank_zero(work)]
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0, group=_wait_group)
    return result[0]


def _said(error: Exception) -> tuple[str, bool]:
    """What the other ranks say of rank 0's ``error``, and whether it is the user's."""
    users = is_user_error(error)
    return (str(error) if users else f"{type(error).__name__}: {error}"), users


@contextmanager
def locked_on_rank_zero(path: Path) -> Iterator[None]:
    """Rank 0 holds the artifact's lock (``breastnet.artifacts.locked``) while every rank
    checks and builds it together; the other ranks wait until rank 0 holds it."""
    with ExitStack() as stack:
        on_rank_zero(lambda: stack.enter_context(locked(path)))
        yield
