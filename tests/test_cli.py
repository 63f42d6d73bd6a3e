"""The Hydra app: every config composes, stages run in order, the command line works."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from breastnet.cli import run_stages
from breastnet.synthetic import write_synthetic_dataset

from conftest import ROOT, SMALL_RUN, compose_config


@pytest.mark.parametrize(
    ("group", "settings"),
    [
        ("stain=none", {"data.stain.method": "none"}),
        ("augment=none", {"data.augment.he_jitter": None, "data.augment.flip": False}),
        ("data=synthetic", {"data.tile_size": 128, "data.patch_size": 96}),
        ("debug=default", {"data.num_workers": 0, "data.prepare_workers": 0}),
    ],
)
def test_config_groups_compose(group: str, settings: dict, tmp_path: Path) -> None:
    """Choosing a group sets what its file says, each value other than the default's."""
    chosen, default = compose_config(tmp_path, group), compose_config(tmp_path)
    for key, value in settings.items():
        assert OmegaConf.select(chosen, key) == value != OmegaConf.select(default, key), key


def test_prepare_stage_on_generated_data(tmp_path: Path, capsys) -> None:
    data = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=1)
    cfg = compose_config(
        tmp_path,
        "stages=[prepare]",
        "experiment=demo",
        f"data.data_dir={data}",
        "data.tile_size=64",
        "data.stride=64",
        "data.patch_size=32",
        "data.prepare_workers=0",
        "data.split=[0.5,0.25,0.25]",
    )
    metrics = run_stages(cfg)
    assert metrics["data/n_images"] == 16 and metrics["data/n_patches"] == 16 * 12
    assert metrics["data/n_train_images"] == 8
    (index,) = (tmp_path / "work" / "index").glob("*.csv")
    # PNGs have no pixel size: an empty field, not 0.0
    assert {row["mpp"] for row in csv.DictReader(index.open())} == {""}
    (audit,) = (tmp_path / "work" / "splits").glob("*.audit.json")
    printed = capsys.readouterr().out
    assert f"leakage audit: {audit}: highest similarity 0." in printed
    assert "near-duplicate(s) at >= 0.9" in printed


def test_unknown_stage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['trian'\]"):
        run_stages(compose_config(tmp_path, "stages=[trian]"))


def test_command_line_prepare_then_reuse(tmp_path: Path) -> None:
    """`python -m breastnet` end to end, with spawned prepare workers; a rerun reuses all."""
    data = write_synthetic_dataset(tmp_path / "demo", 3, 256, 192, seed=2)
    cmd = [
        sys.executable,
        "-m",
        "breastnet",
        "stages=[prepare]",
        "experiment=demo",
        f"data.data_dir={data}",
        f"paths.work_dir={tmp_path / 'work'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "data.split=[0.34,0.33,0.33]",
        "data.prepare_workers=2",
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prepare: 12 of 12 images to normalise and tile" in first.stdout + first.stderr
    arrays = sorted((tmp_path / "work" / "cache").rglob("*.npy"))
    assert len(arrays) == 12
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "images to normalise and tile" not in second.stdout + second.stderr
    # 12 images of 256x192 in 128 px tiles: 2 patches each.
    assert "data/n_patches: 24.0" in second.stdout + second.stderr
    assert list((tmp_path / "logs" / "runs").iterdir())  # Hydra run dirs, not in work_dir


def test_bad_data_fails_with_the_file_named(tmp_path: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "demo", 3, 256, 192, seed=3)
    (data / "InSitu" / "is001.png").write_bytes(b"\x89PNG broken")
    cfg = compose_config(tmp_path, "experiment=demo", f"data.data_dir={data}", "stages=[prepare]")
    with pytest.raises(Exception, match=r"is001\.png: cannot read image"):
        run_stages(cfg)


def test_a_redirected_run_logs_lines_and_its_log_file_has_them(tmp_path: Path) -> None:
    """Under nohup or SLURM: no progress-bar frames (carriage returns) in the redirected
    output, and the run's cli.log holds the progress and result lines, not only stdout."""
    data = write_synthetic_dataset(tmp_path / "demo", 4, 256, 192, seed=4)
    settings = [s for s in SMALL_RUN if "enable_progress_bar" not in s]
    cmd = [sys.executable, "-m", "breastnet", "stages=[prepare,patch]", *settings]
    cmd += [
        f"data.data_dir={data}",
        f"paths.work_dir={tmp_path / 'work'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.max_epochs=1",
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "out.txt", "w") as out:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=out, timeout=600)
    output = (tmp_path / "out.txt").read_text()
    assert done.returncode == 0, output[-3000:]
    assert "\r" not in output
    assert "prepare: 16/16 img" in output  # the plain progress line instead of a bar
    (log,) = (tmp_path / "logs" / "runs").glob("*/cli.log")
    text = log.read_text()
    for line in ("prepare: 16/16 img", "leakage audit: ", "patch epoch 1/1: train_loss"):
        assert line in text, line
    assert "patch/test_acc: " in text
