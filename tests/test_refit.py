"""``patch.refit``: after val chose the epoch, a fresh model trains on train + val that long."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from breastnet.artifacts import finished_metrics
from breastnet.cli import run_stages
from breastnet.data.feature_store import FeatureStore
from breastnet.lineage import Lineage
from breastnet.stages.patch import chosen_epochs

from conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

REFIT = [
    *SMALL_RUN,
    "trainer.max_epochs=3",
    # a setting read from outside patch_model, as experiment=bach_cpu's weights path is
    "patch_model.label_smoothing=${data.min_tissue}",
    "patch.refit=true",
    "stages=[prepare,patch,features]",
]


def test_refit_trains_on_train_and_val_for_the_chosen_epochs(tmp_path: Path) -> None:
    from breastnet.synthetic import write_synthetic_dataset

    demo = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=5)
    cfg = compose_config(tmp_path, *REFIT, f"data.data_dir={demo}")
    metrics = run_stages(cfg)
    lineage = Lineage(cfg)
    assert lineage.refit and lineage.patch != lineage.selection
    chosen = chosen_epochs(lineage.selection)
    assert 1 <= chosen <= 3 and metrics["patch/refit_epochs"] == chosen
    refitted = torch.load(lineage.patch / "best.ckpt", map_location="cpu", weights_only=False)
    assert refitted["epoch"] + 1 == chosen  # the last of the chosen number of epochs
    scheduler = refitted["hyper_parameters"]["scheduler"]
    assert scheduler.keywords["max_epochs"] == 3  # the full run's schedule, cut short
    assert finished_metrics(lineage.patch)["patch/test_acc"] == metrics["patch/refit_test_acc"]
    # Its training images are the outer split's train and val images.
    split = json.loads(lineage.split.read_text())
    datamodule = instantiate(cfg.data, mode="patch", refit=True)
    datamodule.setup()
    trained = {image_id for image_id, _, _ in datamodule.datasets["train"].items}
    assert trained == set(split["train"]) | set(split["val"]) and split["val"]
    # The refit model is the one that embeds; a run without refit reuses the chosen one.
    store = FeatureStore(lineage.features)
    assert {store.rows[i].encoder for i in store} == {lineage.patch.name}
    plain = compose_config(tmp_path, *REFIT[:-2], f"data.data_dir={demo}")
    assert Lineage(plain).patch == lineage.selection
    # The image model's val images trained the refit CNN: its metrics say val is not clean.
    image = compose_config(
        tmp_path, *REFIT[:-1], f"data.data_dir={demo}", "stages=[image]", "image.max_epochs=1"
    )
    assert run_stages(image)["image/val_seen_by_patch_model"] == 1.0
    plain_image = compose_config(
        tmp_path,
        *REFIT[:-2],
        f"data.data_dir={demo}",
        "stages=[features,image]",
        "image.max_epochs=1",
    )
    assert "image/val_seen_by_patch_model" not in run_stages(plain_image)
