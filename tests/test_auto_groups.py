"""``data.groups=auto`` groups by what the data in hand give: BACH's patients, a patient or
group column, else by image with one warning; no single odd file name stops a run."""

import csv
import json
import logging
import os
from pathlib import Path

import pytest

from breastnet import CLASSES
from breastnet.cli import run_stages
from breastnet.data.bach import DataError, IndexEntry
from breastnet.data.groups import resolve_groups, resolve_spec
from breastnet.data.splits import SplitSpec, load_or_make_split, make_split, split_name
from breastnet.lineage import Lineage
from breastnet.synthetic import write_synthetic_dataset

from conftest import ROOT, compose_config, tissue_like, write_image

PREFIX = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}
BACH_DEV_CSV = Path(
    os.environ.get(
        "BREASTNET_BACH_DEV_PATIENTS", ROOT.parent / "shared" / "data" / "bach-dev-patients.csv"
    )
)
WARNING = "data.groups=auto found no source groups"


def named(root: Path, names: dict[str, list[str]]) -> list[IndexEntry]:
    """Entries of files ``root/<class>/<name>.png`` (the files need not exist)."""
    return [
        IndexEntry(f"{c}/{n}", str(root / c / f"{n}.png"), c, sha1=f"{c}{n}")
        for c, ns in names.items()
        for n in ns
    ]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(WARNING)]


def test_bach_names_resolve_to_bachs_patients(tmp_path: Path) -> None:
    data = named(tmp_path, {c: [f"{PREFIX[c]}{i:03d}" for i in range(1, 101)] for c in CLASSES})
    assert resolve_spec(data, "auto") == "bach"
    assert resolve_groups(data, "auto") == resolve_groups(data, "bach")
    assert SplitSpec(groups="auto").resolved(data).groups == "bach"
    assert split_name(SplitSpec(groups="auto"), data) == split_name(SplitSpec(groups="bach"), data)


def test_a_patient_or_group_column_when_it_gives_every_image_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = named(tmp_path, {c: [f"slide{k}" for k in range(4)] for c in CLASSES})
    labels = tmp_path / "labels.csv"
    rows = [f"{e.image_id}.png,{e.label},S{e.image_id[-1]}\n" for e in data]
    labels.write_text("file,label,Group\n" + "".join(rows))
    assert resolve_spec(data, "auto", labels_csv=labels) == "Group"
    assert set(resolve_groups(data, "auto", labels_csv=labels).values()) == {
        "S0",
        "S1",
        "S2",
        "S3",
    }
    labels.write_text("file,label,Group\n" + "".join(rows[1:]))  # one image without a group
    with caplog.at_level(logging.WARNING):
        assert resolve_spec(data, "auto", labels_csv=labels) is None
    (message,) = warnings(caplog)
    assert "the 'Group' column of" in message and "leaves 1 image(s) without one" in message


def test_six_images_a_class_without_names_split_by_image_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = named(tmp_path, {c: [f"img{k:03d}" for k in range(6)] for c in CLASSES})
    spec = SplitSpec(groups="auto")
    with caplog.at_level(logging.WARNING):
        split, path = load_or_make_split(tmp_path, data, spec)
        assert load_or_make_split(tmp_path, data, spec) == (split, path)  # read back
    assert path.stem == split_name(SplitSpec(groups=None), data)  # by image, as null says
    assert [len(split[s]) for s in ("train", "val", "test")] == [16, 4, 4]
    (message,) = warnings(caplog)
    assert "no file has a BACH name, and there is no label CSV" in message
    for way in ("data.groups=<label-CSV column>", "data.groups=blocks:K", "'regex:<pattern>'"):
        assert way in message
    assert "optimistic" in message


def test_an_odd_file_name_with_bach_grouping_asked_for_names_the_fix(tmp_path: Path) -> None:
    data = named(tmp_path, {"Benign": ["b001", "alpha"]})
    with pytest.raises(DataError) as error:
        resolve_groups(data, "bach")
    assert "alpha.png: data.groups=bach needs a number in the file name" in str(error.value)
    assert "data.groups=auto" in str(error.value)


@pytest.mark.skipif(not BACH_DEV_CSV.is_file(), reason=f"{BACH_DEV_CSV} not found")
def test_bach_dev_with_its_bach_names_keeps_the_patient_split() -> None:
    """experiment=bach_cpu (renumbered files, ``data.bach_names=bach_name``): auto is BACH's
    patients, the same split, image for image, as ``data.groups=bach``."""
    with open(BACH_DEV_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    root = BACH_DEV_CSV.parent / "bach-dev"
    data = [
        IndexEntry(r["file"].rsplit(".", 1)[0], str(root / r["file"]), r["label"]) for r in rows
    ]
    names = {"bach_names": "bach_name", "labels_csv": str(BACH_DEV_CSV), "data_dir": str(root)}
    for settings in [{"folds": 5, "fold": k} for k in range(5)] + [{"split": "eva"}]:
        auto = SplitSpec(groups="auto", **names, **settings)
        bach = SplitSpec(groups="bach", **names, **settings)
        assert make_split(data, auto) == make_split(data, bach)
        assert split_name(auto, data) == split_name(bach, data)
        assert "-groups_bach-names_bach_name-" in split_name(auto, data)


def test_an_odd_file_name_beside_numbered_files_prepares_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """data=bach's default grouping on 6 generated images a class (b000-b005: no BACH
    patients) and one ``alpha.png``: by image, one warning, and the run goes on."""
    data = write_synthetic_dataset(tmp_path / "data", 6, 128, 128, seed=2)
    write_image(data / "Benign" / "alpha.png", tissue_like(5, 128, 128))
    cfg = compose_config(
        tmp_path,
        "stages=[prepare]",
        f"data.data_dir={data}",
        "data.tile_size=64",
        "data.stride=64",
        "data.patch_size=32",
        "data.prepare_workers=0",
        "logger=none",
    )
    assert cfg.data.groups == "auto"
    with caplog.at_level(logging.WARNING):
        metrics = run_stages(cfg)
        path = Lineage(cfg).split
    assert [metrics[f"data/n_{s}_images"] for s in ("train", "val", "test")] == [17, 4, 4]
    (message,) = warnings(caplog)
    assert f"5 of 25 files have no BACH name (e.g. {data / 'Benign' / 'alpha.png'}" in message
    assert path.is_file() and "groups_" not in path.name
    assert "Benign/alpha" in {i for ids in json.loads(path.read_text()).values() for i in ids}
