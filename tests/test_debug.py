"""``debug=default`` really makes a run small: one epoch of two batches for each model."""

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
