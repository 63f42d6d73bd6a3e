"""Ranks for the whole pipeline: start every process once, let rank 0 write, make all wait.

Lightning's ``ddp`` starts ranks > 0 inside the first ``Trainer.fit`` by re-running the command
line; each then runs the stages before that fit on its own, unsynchronised. Here they are
started (or, under SLURM/torchrun, joined) before the first stage, so every stage runs on every
rank with a process group to wait on: rank 0 alone writes shared artifacts (index, cache,
features file, reports, metrics.json), the others wait for it and read them. Each stage's
Trainer then finds the process group (and ``LOCAL_RANK``) in place and starts nothing.
"""

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy
from omegaconf import DictConfig
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)
T = TypeVar("T")


def in_multirun() -> bool:
    """Inside a Hydra multirun (sweep or folds), where jobs share one process."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _launches_from_here(cfg: DictConfig) -> bool:
    """A ``ddp``-family strategy named by string (not spawn: those start per Trainer call)."""
    strategy = cfg.trainer.get("strategy")
    return isinstance(strategy, str) and strategy.startswith("ddp") and "spawn" not in strategy


def launch(cfg: DictConfig) -> int:
    """Start (or join) every rank of a multi-process ``ddp`` run; returns the world size.

    A no-op on one process and for ``ddp_spawn`` (and inside a Hydra multirun, where the
    stages fall back to ``ddp_spawn``: re-running the command line would restart the sweep).
    """
    if dist.is_initialized():
        return dist.get_world_size()
    if not _launches_from_here(cfg) or (in_multirun() and not SLURMEnvironment.detect()):
        return 1
    trainer = cfg.trainer
    fabric = Fabric(
        accelerator=trainer.get("accelerator", "auto"),
        devices=trainer.get("devices", "auto"),
        num_nodes=trainer.get("num_nodes", 1),
        strategy=DDPStrategy(timeout=timedelta(minutes=cfg.distributed.timeout_min)),
    )
    if fabric.world_size > 1:
        fabric.launch()
        log.info("rank %d of %d started", fabric.global_rank, fabric.world_size)
    return fabric.world_size


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else rank_zero_only.rank


def barrier() -> None:
    """Wait until every rank gets here (nothing on one process)."""
    if dist.is_initialized():
        dist.barrier()


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
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if error is None and status[0] is not None:
            raise RuntimeError(f"rank 0 failed: {status[0]}")
    if error is not None:
        raise error
    return result
