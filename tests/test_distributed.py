"""Ranks without a process group: which strategies launch per rank, what a multirun uses
instead, and per-rank dropout seeds."""

from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.strategies import StrategyRegistry

from breastnet.distributed import launched_per_rank, spawned
from breastnet.trainer import EpochSeed


@pytest.mark.parametrize(
    ("strategy", "per_rank"),
    [
        ("ddp", True),
        ("ddp_find_unused_parameters_true", True),
        ("ddp_find_unused_parameters_false", True),
        ("ddp_spawn", False),
        ("ddp_spawn_find_unused_parameters_true", False),
        ("ddp_fork", False),
        ("ddp_notebook", False),
        ("auto", False),
        ({"_target_": "pytorch_lightning.strategies.DDPStrategy"}, False),
    ],
)
def test_which_strategies_relaunch_the_command_line(strategy: object, per_rank: bool) -> None:
    assert launched_per_rank(strategy) is per_rank


@pytest.mark.parametrize("strategy", [s for s in StrategyRegistry if launched_per_rank(s)])
def test_every_per_rank_strategy_has_a_spawning_twin(strategy: str) -> None:
    """What a Hydra multirun switches to (relaunching would restart the sweep per rank)."""
    twin = spawned(strategy)
    assert twin in StrategyRegistry and "spawn" in twin and not launched_per_rank(twin)


def test_dropout_seeds_differ_per_rank() -> None:
    """Each rank reseeds before a batch from (seed, epoch, batch, rank): rank 0 draws what one
    process draws, the others their own masks (the same on a rerun)."""

    def drawn(rank: int, batch: int = 3) -> torch.Tensor:
        trainer = SimpleNamespace(global_rank=rank, current_epoch=1)
        EpochSeed(7).on_train_batch_start(trainer, None, None, batch)
        return torch.rand(4)

    assert torch.equal(drawn(0), drawn(0)) and torch.equal(drawn(1), drawn(1))
    assert not torch.equal(drawn(0), drawn(1)) and not torch.equal(drawn(1), drawn(2))
    assert not torch.equal(drawn(0, batch=3), drawn(0, batch=4))
