"""Run-shaping config groups: ``debug=default`` really makes a run small; ``callbacks=``
adds callbacks to the training runs."""

from pathlib import Path

import pytest
import torch

from breastnet.cli import run_stages
from breastnet.lineage import Lineage
from breastnet.synthetic import write_synthetic_dataset

from conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_debug_runs_every_stage_on_two_batches(tmp_path: Path) -> None:
    demo = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=5)
    cfg = compose_config(
        tmp_path,
        *(o for o in SMALL_RUN if not o.startswith("trainer.max_epochs")),  # debug's own: 1
        "debug=default",
        f"data.data_dir={demo}",
        "data.batch_size=4",
        "image.batch_size=2",  # 8 training images: 4 batches, of which debug runs 2
    )
    metrics = run_stages(cfg)
    lineage = Lineage(cfg)
    for model in (lineage.patch, lineage.image):
        checkpoint = torch.load(model / "best.ckpt", map_location="cpu", weights_only=False)
        assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 2), model
    assert metrics["eval/n_images"] == 4  # evaluate still scores the whole test split


def test_callbacks_group_adds_its_callbacks_to_training(tmp_path: Path) -> None:
    """``callbacks=lr_monitor``: the patch model's CSV log gets its learning rate per epoch."""
    demo = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=5)
    cfg = compose_config(
        tmp_path,
        *SMALL_RUN,
        f"data.data_dir={demo}",
        "callbacks=lr_monitor",
        "logger=csv",
        f"paths.output_dir={tmp_path / 'run'}",
        "stages=[prepare,patch]",
    )
    run_stages(cfg)
    (log,) = (tmp_path / "run").rglob("metrics.csv")
    header = log.read_text().splitlines()[0].split(",")
    assert any(column.startswith("lr-") for column in header), header
