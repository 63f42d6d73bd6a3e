"""What every run printed without saying anything: Lightning's device lines, its warnings about
the checkpoint dir and srun, an empty run dir after each mistake; and what a multirun did not
print: where its jobs are."""

import logging
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment
from test_cli_errors import Cli, cli  # noqa: F401 (the in-process CLI fixture)

from breastnet.logs import OUT, plural, remove_unused_run_dir, setup_run_logging
from breastnet.quiet import quiet_known_noise
from breastnet.summary import summarize

from conftest import ROOT, compose_config, tiny_bach  # noqa: F401 (a fixture)


def _shown(emit: Callable[[], None], tmp_path: Path) -> list[str]:
    """The warnings ``emit`` shows once the CLI's filters are installed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise(compose_config(tmp_path))
        emit()
    return [str(w.message) for w in caught]


def test_device_lines_once_and_only_a_gpu(tmp_path: Path) -> None:
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def shown(message: str) -> bool:
        return logger.filter(logger.makeRecord(logger.name, 20, "x.py", 1, message, (), None))

    quiet_known_noise(compose_config(tmp_path))
    assert not shown("GPU available: False, used: False")
    assert not shown("TPU available: False, using: 0 TPU cores")
    assert shown("GPU available: True (cuda), used: True")
    assert not shown("GPU available: True (cuda), used: True")  # the next stage's Trainer
    assert shown("patch epoch 1/8: train_loss 1.2 (3 s)")
    quiet_known_noise(compose_config(tmp_path))  # the next job of a sweep
    assert shown("GPU available: True (cuda), used: True")


def test_checkpoint_dir_not_empty_is_dropped(tmp_path: Path) -> None:
    """Lightning's own check, on a stage dir holding what breastnet writes before a fit."""
    stage_dir = tmp_path / "work" / "patch" / "c7c81ae152"
    stage_dir.mkdir(parents=True)
    (stage_dir / "config.yaml").write_text("a: 1\n")
    checkpoint = ModelCheckpoint(dirpath=stage_dir)

    def emit() -> None:
        checkpoint._ModelCheckpoint__warn_if_dir_not_empty(stage_dir)
        warnings.warn_explicit(
            "another one", UserWarning, "x.py", 1, "pytorch_lightning.callbacks.model_checkpoint"
        )

    assert _shown(emit, tmp_path) == ["another one"]


def test_srun_hint_only_inside_a_slurm_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host with srun (a login node): no hint outside a job, the hint inside one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    for name in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert _shown(SLURMEnvironment._validate_srun_used, tmp_path) == []
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # a job script that forgot srun
    (hint,) = _shown(SLURMEnvironment._validate_srun_used, tmp_path)
    assert hint.startswith("The `srun` command is available on your system but is not used")


def test_lightning_lines_reach_the_log_file_once(tmp_path: Path) -> None:
    """Lightning imported after Hydra set up logging (the CLI imports it lazily) adds no
    handler of its own and propagates: its lines must not reach the file twice."""
    loggers = [logging.getLogger(), logging.getLogger("pytorch_lightning"), OUT]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    file = logging.FileHandler(tmp_path / "cli.log")
    loggers[0].addHandler(file)
    loggers[1].handlers, loggers[1].propagate = [], True
    try:
        setup_run_logging()
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("patch epoch 1/1")
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved, strict=True):
            logger.handlers, logger.propagate = handlers, propagate
        file.close()
    assert (tmp_path / "cli.log").read_text().count("patch epoch 1/1") == 1


def test_only_a_run_dir_of_hydra_files_and_logs_is_removed(tmp_path: Path) -> None:
    def run_dir(name: str, *files: str) -> Path:
        path = tmp_path / name
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra" / "config.yaml").write_text("a: 1\n")
        for file in files:
            (path / file).parent.mkdir(parents=True, exist_ok=True)
            (path / file).write_text("x\n")
        return path

    empty = run_dir("empty", "cli.log")
    assert remove_unused_run_dir(empty) and not empty.exists()
    for files in (["cli.log", "wandb/offline-run-1/run.wandb"], ["metrics.json"]):
        kept = run_dir(files[-1].split("/")[0], *files)
        assert not remove_unused_run_dir(kept) and (kept / files[-1]).is_file()
    not_hydra = tmp_path / "mine"
    (not_hydra / "notes").mkdir(parents=True)
    assert not remove_unused_run_dir(not_hydra / "notes") and (not_hydra / "notes").is_dir()


def test_a_mistake_leaves_no_run_dir_behind(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    status, out = cli("stages=[trian]")
    assert status == 1 and "unknown stage(s) ['trian']" in out
    assert list((tmp_path / "logs" / "runs").iterdir()) == []
    chosen = tmp_path / "logs" / "mine"
    status, _ = cli("stages=[trian]", f"hydra.run.dir={chosen}")
    assert status == 1 and (chosen / "cli.log").is_file()  # a dir the user named stays


def test_a_run_that_did_work_keeps_its_run_dir(
    cli: Cli,  # noqa: F811
    tiny_bach: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    status, out = cli(
        "stages=[prepare,image]",
        "experiment=demo",
        f"data.data_dir={tiny_bach}",
        "data.tile_size=32",
        "data.stride=32",
        "data.patch_size=32",
        "data.prepare_workers=0",
        "data.split=[0.5,0.25,0.25]",
        "audit.enabled=false",
    )
    assert status == 1 and "stage first" in out  # features (and patch) before image
    (run_dir,) = (tmp_path / "logs" / "runs").iterdir()
    assert "stage prepare" in (run_dir / "cli.log").read_text()


def test_a_multirun_ends_with_its_sweep_dir_and_summary_command(
    cli: Cli,  # noqa: F811
    tmp_path: Path,
) -> None:
    status, out = cli("-m", "stages=[prepare]", f"data.data_dir={tmp_path / 'a'},{tmp_path / 'b'}")
    assert status == 1  # both jobs failed, and still:
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    assert f"sweep: {sweep}; summary: python -m breastnet.summary {sweep}\n" in out
    assert [job["status"] for job in summarize(sweep)["jobs"]] == ["failed", "failed"]


def test_help_imports_no_torch() -> None:
    """``python -m breastnet --help`` took 12 s importing torch and Lightning for nothing."""
    heavy = "{'torch', 'pytorch_lightning', 'matplotlib'}"
    code = f"import sys, breastnet.cli; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_plural() -> None:
    assert [plural(n, "patch") for n in (0, 1, 2)] == ["0 patches", "1 patch", "2 patches"]
    assert plural(1, "image") == "1 image" and plural(3, "image") == "3 images"
    assert plural(2, "child", "children") == "2 children"
