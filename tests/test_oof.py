"""Out-of-fold training features: no training image is embedded by a patch model that saw it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from breastnet.artifacts import finished_metrics
from breastnet.cli import run_stages
from breastnet.data.bach import DataError, IndexEntry
from breastnet.data.feature_store import FeatureStore
from breastnet.data.inner import inner_folds, inner_split
from breastnet.inference.models import load_patch_model
from breastnet.lineage import Lineage
from breastnet.models.embedding import embed_patches

from conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

OOF = [
    *SMALL_RUN,
    "trainer.max_epochs=1",
    "image_model=mean_features",
    "image.max_epochs=2",
    "image.train_features=oof",
    "image.oof_folds=2",
    "stages=[prepare,patch,features,image]",
]


def test_oof_training_features_come_from_models_that_never_saw_the_image(
    tmp_path: Path,
) -> None:
    from breastnet.synthetic import write_synthetic_dataset

    demo = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=5)
    cfg = compose_config(tmp_path, *OOF, f"data.data_dir={demo}")
    metrics = run_stages(cfg)
    lineage = Lineage(cfg)
    outer = json.loads(lineage.split.read_text())
    inner = lineage.inner_models()
    splits = {m.patch.name: json.loads(m.split.read_text()) for m in inner}
    # The inner test sides partition the outer training side; val is the outer val.
    held = [set(s["test"]) for s in splits.values()]
    assert set.union(*held) == set(outer["train"]) and sum(map(len, held)) == len(outer["train"])
    assert all(s["val"] == outer["val"] for s in splits.values())
    store = FeatureStore(lineage.features)
    saved = {"images": {i: store.load(i) for i in store}}
    assert store.meta["train_features"] == "oof"
    training = set(outer["train"])
    for image_id, image in saved["images"].items():
        if image_id in training:
            assert image["patch_model"] in splits, image_id
            assert image_id not in splits[image["patch_model"]]["train"]
        else:
            assert image["patch_model"] == lineage.patch.name
    # A training image's features are its out-of-fold model's (not the full model's) outputs.
    image_id = outer["train"][0]
    image = saved["images"][image_id]
    (model,) = [m for m in inner if m.patch.name == image["patch_model"]]
    datamodule = instantiate(cfg.data, mode="image")
    datamodule.setup()
    dataset, _ = datamodule.inference_images(image_ids=[image_id])
    patches = dataset[0]["x"]
    with torch.no_grad():
        own, _ = embed_patches(load_patch_model(cfg, model).net, patches, 64)
        full, _ = embed_patches(load_patch_model(cfg, lineage).net, patches, 64)
    assert torch.allclose(image["features"], own, atol=1e-5)
    assert not torch.allclose(image["features"], full, atol=1e-3)
    inner_acc = [finished_metrics(m.patch)["patch/test_acc"] for m in inner]
    assert metrics["patch/oof_acc"] == pytest.approx(np.mean(inner_acc))
    assert finished_metrics(lineage.image) is not None  # the image model trained on them
    # In-sample: every image from the full model, under another features key.
    with open_dict(cfg):
        cfg.image.train_features = "in_sample"
    assert Lineage(cfg).features != lineage.features
    assert Lineage(cfg).image != lineage.image


def _entries(per_class: int) -> list[IndexEntry]:
    names = {"Normal": "n", "Benign": "b", "InSitu": "is", "Invasive": "iv"}
    return [
        IndexEntry(f"{c}/{p}{i:03d}", f"/x/{c}/{p}{i:03d}.tif", c, 64, 64)
        for c, p in names.items()
        for i in range(per_class)
    ]


def test_inner_folds_keep_groups_together_and_stratify() -> None:
    entries = _entries(12)
    train = [e.image_id for e in entries if int(e.image_id[-3:]) < 10]
    split = {"train": train, "val": [], "test": []}
    groups = {e.image_id: f"{e.label}{int(e.image_id[-3:]) // 2}" for e in entries}
    folds = inner_folds(split, entries, 5, seed=3, groups=groups)
    assert sorted(i for f in folds for i in f) == sorted(train)
    fold_of = {i: k for k, f in enumerate(folds) for i in f}
    for image_id in train:  # each pair of numbers (one group) in one fold
        mates = [j for j in train if groups[j] == groups[image_id]]
        assert {fold_of[j] for j in mates} == {fold_of[image_id]}
    for fold in folds:  # 5 groups per class in 5 folds: one group (2 images) of each class
        assert sorted(np.unique([i.split("/")[0] for i in fold], return_counts=True)[1]) == [2] * 4
    held = folds[0]
    assert inner_split(split, held)["train"] == [i for i in train if i not in held]
    with pytest.raises(DataError, match="fewer than image.oof_folds=6"):
        inner_folds(split, entries, 6, seed=3, groups=groups)
