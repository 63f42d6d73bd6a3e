"""What a user sees when something is wrong: one message and exit status 1 for their mistakes,
a traceback for bugs, make targets that name the make variable."""

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from breastnet.data.bach import DataError, build_index

from conftest import ROOT, tissue_like, write_image

Cli = Callable[..., tuple[int, str]]


@pytest.fixture
def cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> Iterator[Cli]:
    """Run ``python -m breastnet ARGS`` in this process (no second torch import); returns its
    exit status and everything it printed. Hydra's global state and logging are undone after."""
    from hydra.core.global_hydra import GlobalHydra

    from breastnet.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*args: str) -> tuple[int, str]:
        paths = [f"paths.work_dir={tmp_path / 'work'}", f"paths.log_dir={tmp_path / 'logs'}"]
        monkeypatch.setattr(sys, "argv", ["breastnet", *args, *paths, "logger=none"])
        with pytest.raises(SystemExit) as exit_:
            main()
        out = capsys.readouterr()
        return exit_.value.code, out.out + out.err

    yield run
    GlobalHydra.instance().clear()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_missing_data_dir_is_one_message(cli: Cli, tmp_path: Path) -> None:
    status, out = cli("stages=[prepare]", f"data.data_dir={tmp_path / 'missing'}")
    assert status == 1
    assert "missing: data directory does not exist; set data.data_dir" in out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out


def test_stage_run_before_its_inputs_says_which_first(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    status, out = cli("stages=[image]", f"data.data_dir={tmp_path / 'data'}")
    assert status == 1
    assert "run the prepare stage first" in out and "Traceback" not in out


def test_unknown_stage_is_one_message(cli: Cli) -> None:
    status, out = cli("stages=[trian]")
    assert status == 1
    assert "unknown stage(s) ['trian']" in out and "Traceback" not in out


def test_demo_images_without_the_demo_settings(cli: Cli, tmp_path: Path) -> None:
    """512 px tiles on 64x48 images: the advice is the tiling or experiment=demo, never
    skip_bad, which would leave out every image."""
    for c, name in enumerate(["Normal", "Benign", "InSitu", "Invasive"]):
        write_image(tmp_path / "demo" / name / f"{c}.png", tissue_like(c))
    status, out = cli("stages=[prepare]", f"data.data_dir={tmp_path / 'demo'}")
    assert status == 1
    assert "4 of 4 images are smaller than one data.tile_size=512 px tile" in out
    assert "at most 48 px" in out and "ARGS=experiment=demo" in out
    assert "skip_bad" not in out and "Traceback" not in out


def test_a_bug_keeps_its_traceback(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(cfg: object) -> dict[str, float]:
        raise KeyError("a bug")

    monkeypatch.setattr("breastnet.cli.run_stages", bug)
    status, out = cli("stages=[prepare]")
    assert status == 1
    assert "Traceback" in out and "KeyError: 'a bug'" in out


def test_hydra_full_error_raises_user_errors_too(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(DataError, match="data directory does not exist"):
        cli("stages=[prepare]", f"data.data_dir={tmp_path / 'missing'}")


def test_multirun_runs_every_job_then_one_message(cli: Cli, tmp_path: Path) -> None:
    status, out = cli("-m", "stages=[prepare]", f"data.data_dir={tmp_path / 'a'},{tmp_path / 'b'}")
    assert status == 1
    assert "a: data directory does not exist" in out and "b: data directory does not exist" in out
    assert "Traceback" not in out


def test_most_images_too_small_advise_the_tiling_and_name_other_problems(
    tmp_path: Path,
) -> None:
    for c, name in enumerate(["Normal", "Benign", "InSitu", "Invasive"]):
        write_image(tmp_path / name / f"{c}.png", tissue_like(c, 40, 60))
    (tmp_path / "Normal" / "broken.png").write_text("not an image")
    with pytest.raises(DataError) as err:
        build_index(tmp_path, min_size=64, num_workers=1)
    message = str(err.value)
    assert "5 problem(s)" in message and "broken.png: cannot read image" in message
    assert "4 of 5 images are smaller than one data.tile_size=64 px tile" in message
    assert "at most 40 px" in message and "Fix or remove the other files listed." in message
    assert "skip_bad" not in message


MAKE = shutil.which("make")


def make(target: str, *variables: str, cwd: Path) -> subprocess.CompletedProcess:
    """``make -n TARGET`` with this repository's Makefile, from a folder without data/BACH."""
    env = {k: v for k, v in os.environ.items() if k != "BREASTNET_DATA"}
    cmd = [MAKE, "-f", str(ROOT / "Makefile"), "-n", "-o", ".venv/.installed", target, *variables]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_make_names_the_make_variable_to_set(tmp_path: Path) -> None:
    missing = make("prepare", cwd=tmp_path)
    assert missing.returncode != 0
    assert "make prepare: set DATA=<BACH folder>" in missing.stderr
    given = make("prepare", "DATA=/data/BACH", cwd=tmp_path)
    assert given.returncode == 0 and "data.data_dir=/data/BACH" in given.stdout
    no_input = make("predict", "DATA=/data/BACH", cwd=tmp_path)
    assert no_input.returncode != 0
    assert "make predict: set INPUT=<image file or folder>" in no_input.stderr
    both = make("predict", "DATA=/data/BACH", "INPUT=/new", cwd=tmp_path)
    assert both.returncode == 0 and "predict.input=/new" in both.stdout
