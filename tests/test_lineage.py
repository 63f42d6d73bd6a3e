"""Which config change moves which artifact: keys come from the config and the index alone."""

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate

from breastnet import CLASSES, artifacts
from breastnet.artifacts import config_hash
from breastnet.cli import run_stages
from breastnet.data import prepare
from breastnet.data.bach import DataError, build_index
from breastnet.lineage import Lineage

from conftest import compose_config, tissue_like, write_image

BASE = [
    "experiment=demo",
    "data.tile_size=32",
    "data.stride=32",
    "data.patch_size=32",
    "data.prepare_workers=0",
    "data.split=[0.5,0.25,0.25]",
    "patch_model.net.weights=none",
    "logger=none",
]
ARTIFACTS = ("index", "split", "cache", "patch", "features", "image", "report", "predict")
DOWNSTREAM = {a: set(ARTIFACTS[ARTIFACTS.index(a) :]) for a in ARTIFACTS}

# override -> the artifacts whose keys it must change (all others must stay)
TABLE = {
    # what makes a file usable keys the index too (the same usable images: the same split)
    "data.tile_size=16": DOWNSTREAM["cache"] | {"index"},
    "data.mpp=0.25": DOWNSTREAM["cache"] | {"index"},
    "data.fit=overlap": DOWNSTREAM["cache"] | {"index"},
    "data.fit=pad": DOWNSTREAM["cache"] | {"index"},
    "data.skip_bad=true": {"index"},
    # predict's own settings key its resume parts alone: the trained models are still found,
    # and another input folder never reuses the parts of the first for equal image ids
    "predict.fit=trim": {"predict"},
    "predict.mpp=0.3": {"predict"},
    "predict.input=/data/elsewhere": {"predict"},
    "stain=none": DOWNSTREAM["cache"],
    # a relabel names another index and split, but tiles nothing again (the stain reference
    # is picked from the pixels alone): the cache stays, what trained on labels moves
    "data.label_map={InSitu:Invasive,Invasive:InSitu}": DOWNSTREAM["split"] - {"cache"}
    | {"index"},
    "data.split_seed=7": DOWNSTREAM["split"] - {"cache"},
    "data.groups=blocks:1": DOWNSTREAM["split"] - {"cache"},
    "data.folds=2": DOWNSTREAM["split"] - {"cache"},
    "patch_model.optimizer.lr=0.5": DOWNSTREAM["patch"],
    "data.batch_size=32": DOWNSTREAM["patch"],
    "patch.early_stopping_patience=2": DOWNSTREAM["patch"],
    # the chosen model keeps its key (shared with runs without refit); its refit embeds
    "patch.refit=true": DOWNSTREAM["patch"],
    # the augmentation the DataModule applies (data.augment, ${augment} by default)
    "augment=none": DOWNSTREAM["patch"],
    "data.augment={he_jitter:[0.7,1.3],rot90:true,flip:false}": DOWNSTREAM["patch"],
    "trainer.precision=bf16-mixed": DOWNSTREAM["patch"],
    "+trainer.gradient_clip_val=1.0": DOWNSTREAM["patch"],
    "features.tta=true": DOWNSTREAM["features"],
    "features.view=tiles": set(),  # the default: stores from before views keep their key
    "features.view=whole": DOWNSTREAM["features"],
    "features.view=both": DOWNSTREAM["features"],
    "image.train_features=oof": DOWNSTREAM["features"],
    "stain.reference=train": DOWNSTREAM["cache"],
    "image_model=attention": DOWNSTREAM["image"],
    "image.max_epochs=3": DOWNSTREAM["image"],
    "image.end_to_end=true": DOWNSTREAM["image"],
    "evaluate.split=val": {"report"},
    # where a run executes, with the same global batch: nothing
    "trainer.devices=2": set(),
    "trainer.strategy=ddp": set(),
    "trainer.accelerator=gpu": set(),
    "data.num_workers=0": set(),
    "trainer.max_epochs=3": DOWNSTREAM["patch"],
}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BACH layout, indexed (prepare), and the tmp root its config uses."""
    root = tmp_path_factory.mktemp("lineage")
    data = root / "bach"
    for c, name in enumerate(CLASSES):
        for i in range(4):
            write_image(data / name / f"{name[:2].lower()}{i:03d}.png", tissue_like(10 * c + i))
    run_stages(compose_config(root, *BASE, f"data.data_dir={data}", "stages=[prepare]"))
    return root, data


def keys(indexed: tuple[Path, Path], *overrides: str) -> dict[str, str]:
    """The keys of a config; a setting that keys an index of its own is indexed first."""
    root, data = indexed
    cfg = compose_config(root, *BASE, f"data.data_dir={data}", *overrides)
    prepare.build_index(Path(cfg.data.work_dir), cfg.data)
    return Lineage(cfg).keys()


@pytest.mark.parametrize("override", sorted(TABLE))
def test_what_a_change_moves(indexed: tuple[Path, Path], override: str) -> None:
    base, changed = keys(indexed), keys(indexed, override)
    moved = {name for name in ARTIFACTS if base[name] != changed[name]}
    assert moved == TABLE[override]


# A label-CSV column edited in place (the same settings, the same index key) -> the two
# values swapped: the split, and what was made on it, must move.
CSV_EDITS = {
    # a corrected BACH-name column: two images trade eva's sides
    "bach_name": (
        ("data.split=eva", "data.val_fraction=0", "data.bach_names=bach_name"),
        ("b001.tif", "b042.tif"),
    ),
    # a corrected group column: two images trade patients
    "patient": (("data.groups=patient",), ("PNormal0", "PBenign0")),
}
BACH_NUMBERS = {  # per class two BACH images eva trains on, two it reports
    "Normal": ("n001", "n011", "n050", "n051"),
    "Benign": ("b001", "b011", "b042", "b043"),
    "InSitu": ("is001", "is011", "is041", "is042"),
    "Invasive": ("iv001", "iv011", "iv042", "iv043"),
}


@pytest.mark.parametrize("column", sorted(CSV_EDITS))
def test_a_label_csv_column_corrected_in_place_moves_the_split(
    indexed: tuple[Path, Path], tmp_path: Path, column: str
) -> None:
    overrides, (a, b) = CSV_EDITS[column]
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "file,label,bach_name,patient\n"
        + "".join(
            f"{c}/{c[:2].lower()}{i:03d}.png,{c},{name}.tif,P{c}{i}\n"
            for c in CLASSES
            for i, name in enumerate(BACH_NUMBERS[c])
        )
    )
    base = keys(indexed, f"data.labels_csv={labels}", *overrides)
    labels.write_text(labels.read_text().replace(a, "\0").replace(b, a).replace("\0", b))
    changed = keys(indexed, f"data.labels_csv={labels}", *overrides)
    moved = {name for name in ARTIFACTS if base[name] != changed[name]}
    assert moved == DOWNSTREAM["split"] - {"cache"}


def test_a_frozen_encoder_shares_its_features_across_splits(indexed: tuple[Path, Path]) -> None:
    """A fixed encoder embeds every image alike: the folds of a sweep reuse one features
    store, and each fold still trains and reports its own image model."""
    frozen = ("data.folds=2", "patch_model.freeze=true")
    folds = [keys(indexed, *frozen, f"data.fold={k}") for k in range(2)]
    assert folds[0]["features"] == folds[1]["features"]
    assert folds[0]["split"] != folds[1]["split"]
    for name in ("image", "report", "predict"):
        assert folds[0][name] != folds[1][name]
    trained = [keys(indexed, "data.folds=2", f"data.fold={k}") for k in range(2)]
    assert trained[0]["features"] != trained[1]["features"]


@pytest.mark.parametrize(
    ("override", "moves"),
    [
        # labels and sides are joined from the index: the features stay, the image model moves
        ("data.label_map={InSitu:Invasive,Invasive:InSitu}", {"index", "split", "image"}),
        ("stain=none", {"cache", "patch", "features", "image"}),
        # bf16 features are not fp32 features
        ("trainer.precision=bf16-mixed", {"patch", "features", "image"}),
        # what trains is moot for a fixed encoder
        ("patch_model.optimizer.lr=0.5", set()),
    ],
)
def test_what_moves_a_frozen_encoders_features(
    indexed: tuple[Path, Path], override: str, moves: set[str]
) -> None:
    base = keys(indexed, "patch_model.freeze=true")
    changed = keys(indexed, "patch_model.freeze=true", override)
    moved = {name for name in ARTIFACTS if base[name] != changed[name]}
    assert moved - {"report", "predict"} == moves  # those follow the image model


def test_a_format_version_moves_every_key(
    indexed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The salt of every key: an artifact whose content changes for the same settings is
    rebuilt (the split is named by the data it splits, not by a key)."""
    base = keys(indexed)
    monkeypatch.setattr(artifacts, "FORMAT", artifacts.FORMAT + 1)
    changed = keys(indexed)
    assert {name for name in ARTIFACTS if base[name] != changed[name]} == set(ARTIFACTS) - {
        "split"
    }


def test_two_files_of_one_image_id_are_an_error_naming_both(tmp_path: Path) -> None:
    for c, name in enumerate(CLASSES):
        for i in range(2):
            write_image(tmp_path / name / f"{name[:2].lower()}{i:03d}.png", tissue_like(c + i))
    twin = write_image(tmp_path / "Benign" / "be000.tif", tissue_like(99))
    with pytest.raises(DataError) as error:
        build_index(tmp_path, num_workers=0)
    assert str(twin) in str(error.value) and str(twin.with_suffix(".png")) in str(error.value)
    assert "'Benign/be000'" in str(error.value)


@pytest.mark.parametrize(
    "override",
    [
        "stain=none",
        "data.groups=blocks:1",
        "data.folds=2",
        "stain.reference=train",
        "data.fit=pad",
    ],
)
def test_the_datamodule_uses_the_lineage_paths(indexed: tuple[Path, Path], override: str) -> None:
    """Prepare writes the split and cache where the lineage says later stages find them."""
    root, data = indexed
    cfg = compose_config(root, *BASE, f"data.data_dir={data}", override)
    prepared = prepare.build(cfg.data)
    lineage = Lineage(cfg)
    assert lineage.index.is_file() and prepared.entries == lineage.entries
    assert prepared.split_path == lineage.split and prepared.cache.root == lineage.cache


def test_inner_models_have_their_own_split_and_patch_keys(indexed: tuple[Path, Path]) -> None:
    root, data = indexed
    cfg = compose_config(root, *BASE, f"data.data_dir={data}", "image.train_features=oof")
    outer = Lineage(cfg)
    inner = outer.inner_models()
    assert [m.inner for m in inner] == [(k, 5) for k in range(5)]
    assert len({m.patch for m in [outer, *inner]}) == 6
    assert {m.cache for m in inner} == {outer.cache}  # the same patches, other training sides
    datamodule = instantiate(cfg.data, inner_fold=(1, 2))
    datamodule.setup()
    assert datamodule.prepared.split_path == Lineage(cfg, (1, 2)).split
    assert datamodule.prepared.split_path.stem == f"{outer.split.stem}-inner1of2"


def test_another_data_set_gets_its_own_index_and_cache(
    indexed: tuple[Path, Path], tmp_path: Path
) -> None:
    root, data = indexed
    other = tmp_path / "other"
    other.symlink_to(data, target_is_directory=True)
    cfg = compose_config(root, *BASE, f"data.data_dir={other.resolve()}")
    assert (
        Lineage(cfg).index == Lineage(compose_config(root, *BASE, f"data.data_dir={data}")).index
    )
    cfg = compose_config(root, *BASE, f"data.data_dir={tmp_path / 'elsewhere'}")
    assert Lineage(cfg).index.stem != keys(indexed)["index"]
    with pytest.raises(FileNotFoundError, match="run the prepare stage first"):
        _ = Lineage(cfg).cache


def test_a_train_reference_is_picked_among_the_training_images(
    indexed: tuple[Path, Path],
) -> None:
    root, data = indexed
    picked = set()
    for fold in (0, 1):
        cfg = compose_config(
            root,
            *BASE,
            f"data.data_dir={data}",
            "stain.reference=train",
            "data.folds=2",
            f"data.fold={fold}",
        )
        prepared = prepare.build(cfg.data)
        saved = root / "work" / "stain" / f"{config_hash(Lineage(cfg).stain)}.json"
        path = json.loads(saved.read_text())["path"]
        train = {e.path for e in prepared.entries if e.image_id in prepared.split["train"]}
        assert path in train
        picked.add(prepared.cache.root)
    assert len(picked) == 2  # a cache per split: the two folds' references differ in key
