"""Prepare builds the patch cache once, resumes, reuses it; the loaders yield the right batches."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from breastnet.data import keys, store
from breastnet.data.bach import read_index
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.prepare import build
from breastnet.data.sampling import EpochShuffle
from breastnet.synthetic import write_synthetic_dataset

STAIN = {"method": "macenko", "reference": "auto", "solver": "lstsq"}
STAIN |= {"luminosity_threshold": 0.8, "angular_percentile": 99}
AUGMENT = {"he_jitter": [0.7, 1.3], "rot90": True, "flip": True}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 generated images per class, 256x192: a 4x3 grid of 64 px tiles."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), 5, 256, 192, seed=0)


@pytest.fixture
def make_dm(synthetic_dir: Path, tmp_path: Path) -> Callable[..., BreastDataModule]:
    def make(**overrides) -> BreastDataModule:
        kw = dict(
            data_dir=str(synthetic_dir),
            work_dir=str(tmp_path / "work"),
            stain=OmegaConf.create(STAIN | overrides.pop("stain", {})),
            augment=OmegaConf.create(AUGMENT),
            split=[0.6, 0.2, 0.2],
            tile_size=64,
            stride=64,
            patch_size=32,
            batch_size=8,
            num_workers=0,
            prepare_workers=0,
        )
        return BreastDataModule(**(kw | overrides))

    return make


def test_prepare_writes_index_split_reference_and_cache(make_dm) -> None:
    dm = make_dm()
    build(dm.hparams)
    dm.setup()
    found = dm.prepared
    index = keys.index_path(found.work_dir, dm.hparams)
    assert len(read_index(index)) == 20 and index.parent.name == "index"
    assert [len(found.split[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert len(list((found.work_dir / "stain").glob("*.json"))) == 1
    assert len(found.records) == 20
    patches = found.cache.load("Invasive/iv000")
    assert patches.shape == (12, 32, 32, 3) and patches.dtype == np.uint8
    record = found.records["Invasive/iv000"]
    assert record["positions"][:5] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    assert dm.summary()["data/n_patches"] == 240.0
    cache_json = json.loads((found.cache.root / "cache.json").read_text())
    assert cache_json["tiling"] == {
        "tile_size": 64,
        "stride": 64,
        "patch_size": 32,
        "mpp": 0.42,
        "fit": "trim",
    }
    assert len(cache_json["stain"]["reference"]["stain_matrix"]) == 2


def test_patch_and_image_batches(make_dm) -> None:
    dm = make_dm()
    build(dm.hparams)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 3, 32, 32) and batch["x"].dtype == torch.uint8
    assert batch["y"].dtype == torch.int64 and batch["pos"].shape == (8, 2)
    image_dm = make_dm(mode="image", batch_size=2)
    image_dm.setup()  # reads what the first prepare wrote
    batch = next(iter(image_dm.val_dataloader()))
    assert batch["x"].shape == (2, 12, 3, 32, 32) and batch["mask"].all()
    assert batch["pos"][0, -1].tolist() == [2, 3]
    labels = image_dm.prepared.labels
    assert batch["y"].tolist() == [labels[i] for i in batch["image_id"]]


def test_second_prepare_reuses_everything(make_dm, monkeypatch: pytest.MonkeyPatch) -> None:
    build(make_dm().hparams)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(store, "_prepare_one", fail)
    monkeypatch.setattr("breastnet.data.bach.read_rgb", fail)
    dm = make_dm(batch_size=16, num_workers=1)  # loader settings do not shape the cache
    assert len(build(dm.hparams).records) == 20


def test_tiling_change_builds_a_new_cache(make_dm) -> None:
    first = build(make_dm().hparams).cache
    second = build(make_dm(patch_size=48).hparams).cache
    assert first.root != second.root
    assert second.load("Normal/n000").shape == (12, 48, 48, 3)
    unstained = build(make_dm(stain={"method": "none"}).hparams).cache
    assert unstained.root not in (first.root, second.root)


def test_interrupted_prepare_resumes(make_dm, monkeypatch: pytest.MonkeyPatch) -> None:
    real = store._prepare_one
    calls: list[str] = []

    def interrupted(entry, *args):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(entry.image_id)
        return real(entry, *args)

    monkeypatch.setattr(store, "_prepare_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(make_dm().hparams)
    done = list(calls)
    calls.clear()

    def counted(entry, *args):
        calls.append(entry.image_id)
        return real(entry, *args)

    monkeypatch.setattr(store, "_prepare_one", counted)
    records = build(make_dm().hparams).records
    assert len(done) == 7 and len(calls) == 13 and not set(done) & set(calls)
    assert len(records) == 20


def test_a_failing_image_keeps_the_others(make_dm, monkeypatch: pytest.MonkeyPatch) -> None:
    real = store._prepare_one

    def flaky(entry, *args):
        if entry.image_id == "Benign/b002":
            raise OSError("disk hiccup")
        return real(entry, *args)

    monkeypatch.setattr(store, "_prepare_one", flaky)
    dm = make_dm()
    with pytest.raises(Exception, match=r"(?s)1 image\(s\) failed .*b002\.png: disk hiccup"):
        build(dm.hparams)
    (cache,) = (Path(dm.hparams.work_dir) / "cache").iterdir()
    assert len(store.PatchCache(cache).records()) == 19  # the others are cached
    records = build(make_dm(skip_bad=True).hparams).records
    assert len(records) == 19 and "Benign/b002" not in records
    loading = make_dm(skip_bad=True)
    loading.setup()  # after prepare: no "run the prepare stage first"
    assert "Benign/b002" not in loading.prepared.records and len(loading.datasets["train"]) > 0


def test_white_image_and_background_tiles(make_dm, synthetic_dir: Path, tmp_path: Path) -> None:
    import shutil

    from conftest import write_image

    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    image = np.full((192, 256, 3), 255, np.uint8)
    write_image(data / "Normal" / "white.png", image)
    dm = make_dm(data_dir=str(data), min_tissue=0.05, split=[0.3, 0.3, 0.4])
    build(dm.hparams)  # Macenko cannot estimate stains of a blank image: no crash
    dm.setup()
    white = dm.prepared.cache.load("Normal/white")
    assert (np.asarray(white) >= 250).all()
    assert dm.prepared.records["Normal/white"]["tissue"] == [0.0] * 12
    side = next(s for s in ("train", "val", "test") if "Normal/white" in dm.prepared.split[s])
    assert all(item[0] != "Normal/white" for item in dm.datasets[side].items)


def test_setup_before_prepare_says_what_to_run(make_dm) -> None:
    with pytest.raises(FileNotFoundError, match="run the prepare stage first"):
        make_dm().setup()


def _epoch_batches(dm: BreastDataModule, epoch: int, loader: DataLoader) -> dict:
    """What each patch drew in one epoch, by its index: ``{i: uint8 patch}``."""
    sampler = loader.sampler
    sampler.set_epoch(epoch)
    order = [i for i, _ in sampler]
    patches = torch.cat([b["x"] for b in loader])
    return {i: p.numpy() for i, p in zip(order, patches, strict=True)}


def test_augmentation_depends_on_seed_epoch_and_sample_only(make_dm) -> None:
    """Workers (persistent or not) and ranks never change what a sample draws, so a resumed
    run or another worker count sees the same augmented patches; epochs do change it."""
    dm = make_dm()
    build(dm.hparams)
    dm.setup()
    plain = dm.train_dataloader()
    workers = make_dm(num_workers=2, persistent_workers=True)
    workers.setup()
    loader = workers.train_dataloader()
    assert loader.persistent_workers
    first = _epoch_batches(dm, 0, plain)
    assert all(np.array_equal(first[i], p) for i, p in _epoch_batches(workers, 0, loader).items())
    again = _epoch_batches(workers, 1, loader)
    assert all(np.array_equal(again[i], p) for i, p in _epoch_batches(dm, 1, plain).items())
    assert sum(not np.array_equal(first[i], again[i]) for i in first) > len(first) // 2
    # Two ranks share one permutation: disjoint halves that cover every sample.
    halves = [EpochShuffle(dm.datasets["train"], 2019, 3, 2, r) for r in (0, 1)]
    seen = [[i for i, _ in h] for h in halves]
    assert set(seen[0]) | set(seen[1]) == set(range(len(dm.datasets["train"])))
    assert len(seen[0]) == len(seen[1])


def test_a_jitter_that_cannot_apply_is_said_where_a_cnn_trains(
    make_dm, caplog: pytest.LogCaptureFixture
) -> None:
    """stain=none has no stain matrix to jitter: said when patches train a CNN, not by the
    stages that only embed or score (a frozen encoder's features, evaluate, predict)."""
    build(make_dm(stain={"method": "none"}).hparams)
    make_dm(stain={"method": "none"}, mode="image").setup()
    assert "he_jitter" not in caplog.text
    make_dm(stain={"method": "none"}).setup()
    assert "augment.he_jitter needs stain normalisation" in caplog.text


def test_another_tiling_indexes_without_decoding_again(
    make_dm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tile size keys an index of its own (what is usable differs), but no file is decoded
    and hashed twice in one work dir."""
    from breastnet.data import prepare

    first = prepare.build_index(Path(make_dm().hparams.work_dir), make_dm().hparams)
    decoded = []
    monkeypatch.setattr("breastnet.data.bach._validate", lambda path: decoded.append(path))
    other = make_dm(tile_size=32, stride=32).hparams
    entries = prepare.build_index(Path(other.work_dir), other)
    assert decoded == [] and [e.sha1 for e in entries] == [e.sha1 for e in first]
    assert keys.index_path(Path(other.work_dir), other) != keys.index_path(
        Path(other.work_dir), make_dm().hparams
    )
