"""Multi-process training on the CPU (gloo): `ddp` single runs and `ddp_spawn` in multiruns."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from breastnet.data.feature_store import FeatureStore
from breastnet.synthetic import write_synthetic_dataset
from breastnet.synthetic.rescan import rescan

from conftest import ROOT

pytestmark = pytest.mark.slow

TINY = [
    "experiment=demo",
    "data.tile_size=64",
    "data.stride=64",
    "data.patch_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.split=[0.5,0.25,0.25]",
    "patch_model=mobilenet_v2",
    "patch_model.net.weights=none",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.max_epochs=1",
    "logger=csv",
]


def breastnet(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    data = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=7)
    cmd = [
        sys.executable,
        "-m",
        "breastnet",
        *args,
        *TINY,
        f"data.data_dir={data}",
        f"paths.work_dir={tmp_path / 'work'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_ddp_whole_pipeline_two_processes(tmp_path: Path) -> None:
    """Every default stage, prepare to evaluate, then predict on an external set, on two
    `ddp` ranks: one report, one metrics.json, each rank a half of the global batch, every
    image embedded once."""
    out = breastnet(tmp_path, "trainer.strategy=ddp", "image.max_epochs=2")
    log = out.stdout + out.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    (patch_dir,) = (tmp_path / "work" / "patch").iterdir()
    assert (patch_dir / "DONE").is_file() and (patch_dir / "best.ckpt").is_file()
    patch_metrics = json.loads((patch_dir / "metrics.json").read_text())
    assert patch_metrics["patch/batch_per_device"] == 4  # data.batch_size=8 over 2 ranks
    (features_dir,) = (tmp_path / "work" / "features").iterdir()
    store = FeatureStore(features_dir)
    assert len(store) == 16  # every image once (no padding duplicates, none missing)
    assert len(list((features_dir / "images").rglob("*.pt"))) == 16
    assert not list((tmp_path / "work" / "features").glob("*.parts"))
    (report,) = (tmp_path / "work" / "reports").iterdir()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_images"] == 4  # the whole test split, each image once
    run_metrics = list((tmp_path / "logs").rglob("metrics.json"))
    assert len(run_metrics) == 1  # rank 0 alone writes the run's metrics.json
    assert json.loads(run_metrics[0].read_text())["eval/n_images"] == 4
    assert "patch epoch 1/1" in log  # a plain progress line, also when not on a terminal

    # predict on the same two ranks: an external set at half the pixel size, in 2-class
    # folders, with a crop smaller than a tile: one report, every file once.
    ext = tmp_path / "external"
    rescan(tmp_path / "demo", ext, mpp=0.21)
    rescan(tmp_path / "demo", ext / "crops", crop=(88, 58), image_ids=["Normal/n000"], tags=False)
    predicted = tmp_path / "predicted"
    done = breastnet(
        tmp_path,
        "trainer.strategy=ddp",
        "image.max_epochs=2",
        "stages=[predict]",
        f"predict.input={ext}",
        f"predict.output_dir={predicted}",
        "predict.label_map={Benign:non_carcinoma,Malignant:carcinoma}",
        "predict.fit=pad",  # the crop: tiled, padded with white
    )
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stdout + done.stderr
    with open(predicted / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image_id"] for r in rows) == sorted(
        p.relative_to(ext).with_suffix("").as_posix() for p in ext.rglob("*.*") if p.is_file()
    )
    assert {r["n_patches"] for r in rows} == {"12", "2"} and not any(r["error"] for r in rows)
    two_class = json.loads((predicted / "metrics.json").read_text())["two_class"]
    assert two_class["n_images"] == 17 and two_class["n_carcinoma"] == 8


def test_ddp_in_a_multirun_uses_spawn(tmp_path: Path) -> None:
    out = breastnet(
        tmp_path,
        "--multirun",
        "stages=[prepare,patch]",
        "trainer.strategy=ddp",
        "patch_model.optimizer.lr=0.01,0.02",
    )
    assert "using ddp_spawn instead" in out.stdout + out.stderr
    dirs = list((tmp_path / "work" / "patch").iterdir())
    assert len(dirs) == 2 and all((d / "DONE").is_file() for d in dirs)
