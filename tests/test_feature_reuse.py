"""A frozen encoder's features follow the images' content, never their labels: a relabel
reuses every feature and trains on the new labels, a replaced image is embedded again, an
added one alone."""

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from PIL import Image

from breastnet import CLASSES
from breastnet.cli import run_stages
from breastnet.data.feature_store import FeatureStore
from breastnet.lineage import Lineage
from breastnet.synthetic import write_synthetic_dataset

from conftest import SMALL_RUN, compose_config, write_image

SWAP = {"InSitu": "Invasive", "Invasive": "InSitu"}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed MobileNetV2 as a weights file (random, seeded: what matters is that it is
    the same network every run)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """Generated images in one folder, labelled by a ``file,label`` CSV beside them."""
    source = write_synthetic_dataset(tmp_path / "generated", 3, 128, 96, seed=3)
    data = tmp_path / "flat"
    data.mkdir()
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        for image in sorted(source.rglob("*.png")):
            shutil.copy(image, data / image.name)
            writer.writerow([image.name, image.parent.name])
    return data


def _config(tmp_path: Path, data: Path, encoder: Path, *overrides: str):
    return compose_config(
        tmp_path,
        *SMALL_RUN,
        f"data.data_dir={data}",
        f"data.labels_csv={data.parent / 'labels.csv'}",
        "patch_model.freeze=true",
        f"patch_model.net.weights={encoder}",
        "stages=[prepare,features]",
        *overrides,
    )


def _embedded(caplog: pytest.LogCaptureFixture) -> int:
    """How many images the features stage embedded (0 when it reused its store)."""
    runs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features: ")]
    return sum(int(m.split()[1]) for m in runs if " images to run" in m)


def _targets(cfg) -> dict[str, int]:
    """What the image model trains and is scored on: each image's target, by id."""
    dm = instantiate(cfg.data, mode="features", features_path=str(Lineage(cfg).features))
    dm.setup()
    return {s["image_id"]: int(s["y"]) for side in dm.datasets.values() for s in side}


def _relabel_csv(path: Path) -> None:
    """Swap InSitu and Invasive in the label CSV, in place."""
    rows = list(csv.reader(path.open()))
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([name, SWAP.get(label, label)] for name, label in rows)


@pytest.mark.parametrize("how", ["label_map", "csv_in_place"])
def test_a_relabel_reuses_every_feature_and_trains_on_the_new_labels(
    flat: Path, encoder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    before = _config(tmp_path, flat, encoder)
    with caplog.at_level(logging.INFO):
        run_stages(before)
    assert _embedded(caplog) == 12
    old_keys, old_targets = Lineage(before).keys(), _targets(before)
    store = FeatureStore(Lineage(before).features)
    mtimes = {i: (store.root / store.rows[i].path).stat().st_mtime_ns for i in store}

    if how == "label_map":
        swapped = "data.label_map={InSitu:Invasive,Invasive:InSitu}"
        after = _config(tmp_path, flat, encoder, swapped)
    else:
        _relabel_csv(flat.parent / "labels.csv")
        after = _config(tmp_path, flat, encoder)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_stages(after)
    assert _embedded(caplog) == 0
    new_keys = Lineage(after).keys()
    assert {k for k in new_keys if new_keys[k] != old_keys[k]} >= {"split", "image"}
    assert (new_keys["cache"], new_keys["features"]) == (old_keys["cache"], old_keys["features"])
    reused = FeatureStore(Lineage(after).features)
    assert {i: (reused.root / reused.rows[i].path).stat().st_mtime_ns for i in reused} == mtimes
    # the targets are the current index's: 3 InSitu and 3 Invasive images changed class
    swap = {CLASSES.index(a): CLASSES.index(b) for a, b in SWAP.items()}
    targets = _targets(after)
    assert targets == {i: swap.get(y, y) for i, y in old_targets.items()}
    assert sum(targets[i] != old_targets[i] for i in targets) == 6


def test_a_replaced_image_is_embedded_again_and_an_added_one_alone(
    flat: Path, encoder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # stain=none: under stain.reference=auto another image set may pick another reference,
    # which re-tiles (and so re-embeds) every image
    cfg = _config(tmp_path, flat, encoder, "stain=none")
    run_stages(cfg)
    store = FeatureStore(Lineage(cfg).features)
    replaced = next(i for i in store if i.startswith("b"))
    kept = {i: torch.load(store.root / store.rows[i].path)["features"] for i in store}

    image = np.asarray(Image.open(flat / f"{replaced}.png"))
    write_image(flat / f"{replaced}.png", np.ascontiguousarray(image[::-1]))  # flipped
    write_image(flat / "added.png", np.ascontiguousarray(image[:, ::-1]))
    with (flat.parent / "labels.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["added.png", "Benign"])
    again = _config(tmp_path, flat, encoder, "stain=none")
    with caplog.at_level(logging.INFO):
        run_stages(again)
    assert _embedded(caplog) == 2
    store = FeatureStore(Lineage(again).features)
    assert store.root == Lineage(cfg).features and len(store) == 13
    sha1 = {e.image_id: e.sha1 for e in Lineage(again).entries}
    assert {store.rows[i].sha1 for i in (replaced, "added")} == {sha1[replaced], sha1["added"]}
    now = {i: torch.load(store.root / store.rows[i].path)["features"] for i in store}
    assert not torch.equal(now[replaced], kept[replaced])
    assert all(torch.equal(now[i], kept[i]) for i in kept if i != replaced)
    assert _targets(again)["added"] == CLASSES.index("Benign")
