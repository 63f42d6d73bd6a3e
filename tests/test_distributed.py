"""Ranks without a process group: which strategies launch per rank, what a multirun uses
instead, per-rank dropout seeds, and the import graph the distributed code relies on."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.strategies import StrategyRegistry

from breastnet.distributed import launched_per_rank, spawned
from breastnet.trainer import EpochSeed

from conftest import ROOT


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


def imports(module: Path) -> set[str]:
    """The breastnet modules one file imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name.startswith("breastnet")}


def test_lineage_and_data_do_not_import_each_other() -> None:
    """breastnet.lineage reads what breastnet.data writes; the data package never imports
    lineage back (directly or through a module that does)."""
    package = ROOT / "breastnet"
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    graph = {name: imports(path) & modules.keys() for name, path in modules.items()}

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name == target:
                return True
            if name not in seen:
                seen.add(name)
                todo += graph.get(name, ())
        return False

    data = [name for name in modules if name.startswith("breastnet.data")]
    assert not [name for name in data if reaches(name, "breastnet.lineage")]
    assert reaches("breastnet.lineage", "breastnet.data.bach")  # the direction that is used
