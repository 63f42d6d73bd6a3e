"""What a user sees when something is wrong: one message and exit status 1 for their mistakes,
a traceback for bugs, make targets that name the make variable, no known library noise."""

import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from breastnet.data.bach import DataError, build_index
from breastnet.quiet import WandbLogger, quiet_known_noise

from conftest import ROOT, compose_config, tissue_like, write_image

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
    def bug(cfg: object, *_: object) -> dict[str, float]:
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


def _shown(emit: Callable[[], None], freeze_bn: bool, tmp_path: Path) -> list[str]:
    """The warnings ``emit`` shows once the CLI's filters are installed."""
    cfg = compose_config(tmp_path, f"patch_model.net.freeze_bn={str(freeze_bn).lower()}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise(cfg)
        emit()
    return [str(w.message) for w in caught]


def test_known_noise_is_filtered_and_nothing_else(tmp_path: Path) -> None:
    from pytorch_lightning.utilities._pytree import _tree_flatten
    from pytorch_lightning.utilities.warnings import PossibleUserWarning

    def emit() -> None:
        _tree_flatten(1)  # Lightning's own use of torch's deprecated LeafSpec
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1
        )
        for message, category, module in [
            ("There is a wandb run already in progress", UserWarning, "loggers.wandb"),
            (
                "The number of training batches (2) is smaller than the logging interval",
                PossibleUserWarning,
                "loops.fit_loop",
            ),
            (
                "Found 52 module(s) in eval mode at the start of training.",
                PossibleUserWarning,
                "loops.fit_loop",
            ),
        ]:
            warnings.warn_explicit(message, category, "x.py", 1, f"pytorch_lightning.{module}")

    # only the LeafSpec warning raised here (not by Lightning) and, without freeze_bn, the
    # eval-mode one are left
    assert _shown(emit, False, tmp_path) == [
        "`isinstance(treespec, LeafSpec)` is deprecated",
        "Found 52 module(s) in eval mode at the start of training.",
    ]
    assert _shown(emit, True, tmp_path) == ["`isinstance(treespec, LeafSpec)` is deprecated"]


def test_litlogger_tip_is_dropped_other_lightning_lines_kept(tmp_path: Path) -> None:
    quiet_known_noise(compose_config(tmp_path))
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.INFO, "x.py", 1, message, (), None)

    assert not logger.filter(record("💡 Tip: For seamless cloud logging and ..."))
    assert logger.filter(record("patch epoch 1/8: train_loss 1.2000 (3 s)"))


def test_wandb_logger_passes_no_anonymous_setting(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, "logger=wandb")
    logger = instantiate(cfg.logger, save_dir=str(tmp_path), mode="offline")
    assert isinstance(logger, WandbLogger) and "anonymous" not in logger._wandb_init


def test_mistyped_setting_names_the_nearest_key(cli: Cli) -> None:
    status, out = cli("data.tile_sise=64")
    assert status == 1
    assert "data.tile_sise: data has no key 'tile_sise'; did you mean data.tile_size?" in out
    assert "+data.tile_sise" not in out  # Hydra's advice to append it never comes
    status, out = cli("+data.tile_sise=64")
    assert status == 1 and "TypeError" not in out
    assert "takes no argument 'tile_sise'; did you mean data.tile_size?" in out
    status, out = cli("experiment=demo", "predict.lable_map={a: b}", "seeed=1")
    assert status == 1 and "did you mean predict.label_map?" in out


def test_help_lists_stages_experiments_and_examples(monkeypatch, capsys) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from breastnet.cli import PIPELINE, main

    monkeypatch.setattr(sys, "argv", ["breastnet", "--help"])
    try:
        main()
    except SystemExit as e:
        assert not e.code
    finally:
        GlobalHydra.instance().clear()
    out = capsys.readouterr().out
    assert all(f"\n  {stage} " in out for stage in PIPELINE)
    experiments = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert f"experiment: {', '.join(experiments)}" in out
    assert out.count("\n  python -m breastnet ") == 3


def test_predict_before_training_quotes_the_training_command(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    image = write_image(tmp_path / "in" / "x.png", tissue_like(0))
    status, out = cli(
        "stages=[predict]",
        "experiment=demo",
        f"data.data_dir={tmp_path / 'data'}",
        f"predict.input={image}",
    )
    assert status == 1 and "run the prepare stage first" not in out
    assert "Train it first with the same experiment and settings" in out
    assert f"python -m breastnet experiment=demo data.data_dir={tmp_path / 'data'}" in out
    assert "predict.input" not in out.split("python -m breastnet")[1]


def test_debug_keeps_third_party_loggers_at_info(cli: Cli, tmp_path: Path) -> None:
    status, _ = cli("debug=default", "stages=[prepare]", f"data.data_dir={tmp_path / 'none'}")
    assert status == 1
    assert logging.getLogger("breastnet.data.bach").getEffectiveLevel() == logging.DEBUG
    for name in ("PIL", "PIL.PngImagePlugin", "matplotlib", "pytorch_lightning"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.INFO, name
