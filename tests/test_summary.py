"""Summaries of a multirun dir: per-job table, mean ± std per group, failed jobs with logs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from breastnet.summary import log_to_wandb, main, summarize

from conftest import ROOT

# (overrides, metrics) per job; job 3 failed: no metrics.json, only the end of its log.
JOBS = [
    (
        ["image_model=bilstm", "data.fold=0", "seed=1"],
        {"image/test_acc": 0.6, "image/val_acc_best": 0.7, "eval/per_class": {"Normal": 1.0}},
    ),
    (
        ["image_model=bilstm", "data.fold=1", "seed=1"],
        {"image/test_acc": 0.8, "image/val_acc_best": 0.75, "note": "x", "flag": True},
    ),
    (["image_model=mean", "data.fold=0", "seed=1"], {"image/test_acc": 0.5, "n_images": 40}),
    (["image_model=mean", "data.fold=1", "seed=1"], None),
]


def approx_stats(expected: dict):
    """pytest.approx over a metric's stats, its list of values included."""
    return {k: pytest.approx(v) for k, v in expected.items()}


LOG = [f"[2026-01-01 00:00:{i:02d}][breastnet.cli][INFO] - line {i}" for i in range(30)]


def write_job(job_dir: Path, overrides: list[str], metrics: dict | None, **hydra: dict) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    for name, content in hydra.items():
        (job_dir / ".hydra" / f"{name}.yaml").write_text(yaml.safe_dump(content))
    if metrics is None:
        (job_dir / "cli.log").write_text("\n".join([*LOG, "ValueError: fold 1 broke"]) + "\n")
    else:
        (job_dir / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep_dir = tmp_path / "sweep"
    for num, (overrides, metrics) in enumerate(JOBS):
        write_job(sweep_dir / str(num), overrides, metrics)
    (sweep_dir / ".submitit").mkdir()  # not a job
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    return sweep_dir


def test_one_group(sweep: Path) -> None:
    summary = summarize(sweep)
    assert json.loads((sweep / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [j["num"] for j in summary["jobs"]] == [0, 1, 2, 3]
    assert [j["status"] for j in summary["jobs"]] == ["ok", "ok", "ok", "failed"]
    assert summary["jobs"][1]["overrides"] == {
        "image_model": "bilstm",
        "data.fold": "1",
        "seed": "1",
    }
    assert summary["varying"] == ["image_model", "data.fold"]  # seed is the same everywhere
    failed = summary["jobs"][3]
    assert failed["log_tail"] == [*LOG[-19:], "ValueError: fold 1 broke"]

    (group,) = summary["groups"]
    assert (group["name"], group["n_jobs"], group["n_failed"]) == ("all", 4, 1)
    test_acc = [0.6, 0.8, 0.5]
    # the sample std (ddof=1), as papers and eva quote it, and the values in job order
    assert group["metrics"]["image/test_acc"] == approx_stats(
        {"mean": np.mean(test_acc), "std": np.std(test_acc, ddof=1), "n": 3, "values": test_acc}
    )
    assert group["metrics"]["image/val_acc_best"] == approx_stats(
        {"mean": 0.725, "std": 0.05 / 2**0.5, "n": 2, "values": [0.7, 0.75]}
    )
    assert group["metrics"]["n_images"] == {"mean": 40.0, "std": None, "n": 1, "values": [40]}
    saved = json.loads((sweep / "results.json").read_text())
    assert saved["image/test_acc"] == approx_stats(
        {"mean": np.mean(test_acc), "stdev": np.std(test_acc, ddof=1), "values": test_acc}
    )
    # dicts, strings and booleans are not numbers
    assert set(group["metrics"]) == {"image/test_acc", "image/val_acc_best", "n_images"}

    md = (sweep / "summary.md").read_text()
    assert "4 jobs: 3 finished, 1 failed." in md
    header = "| job | status | image_model | data.fold | image/test_acc | image/val_acc_best |"
    assert header in md
    assert "| 1 | ok | bilstm | 1 | 0.8 | 0.75 |" in md
    assert "| 3 | failed | mean | 1 | — | — |" in md
    assert "n_images" not in md  # a count, not a result: in the JSON only
    assert "| all | 3 (+1 failed) | 0.6333 ± 0.1528 | 0.725 ± 0.03536 |" in md
    assert "### Job 3: image_model=mean data.fold=1 seed=1" in md
    assert "ValueError: fold 1 broke" in md and LOG[10] not in md


def test_group_by(sweep: Path) -> None:
    groups = {g["name"]: g for g in summarize(sweep, ["image_model"])["groups"]}
    assert list(groups) == ["image_model=bilstm", "image_model=mean"]
    bilstm, mean = groups["image_model=bilstm"], groups["image_model=mean"]
    assert bilstm["settings"] == {"image_model": "bilstm"}
    assert bilstm["metrics"]["image/test_acc"] == approx_stats(
        {"mean": 0.7, "std": 0.2 / 2**0.5, "n": 2, "values": [0.6, 0.8]}
    )
    assert (mean["n_jobs"], mean["n_failed"]) == (2, 1)
    assert mean["metrics"]["image/test_acc"] == {"mean": 0.5, "std": None, "n": 1, "values": [0.5]}
    saved = json.loads((sweep / "results.json").read_text())
    assert saved["image_model=bilstm"]["image/test_acc"]["values"] == [0.6, 0.8]
    md = (sweep / "summary.md").read_text()
    assert "| image_model | jobs | image/test_acc |" in md
    assert "| bilstm | 2 | 0.7 ± 0.1414 |" in md
    assert "| mean | 1 (+1 failed) | 0.5 ± — |" in md


def test_group_by_a_default(tmp_path: Path) -> None:
    """A key left at its default groups by the job's config choice or value."""
    for fold in range(2):
        write_job(
            tmp_path / str(fold),
            [f"data.fold={fold}"],
            {"acc": 0.5 + fold / 10},
            hydra={"hydra": {"runtime": {"choices": {"image_model": "bilstm"}}}},
            config={"data": {"fold": fold, "folds": 2}},
        )
    summary = summarize(tmp_path, ["image_model", "data.folds"])
    (group,) = summary["groups"]
    assert group["settings"] == {"image_model": "bilstm", "data.folds": "2"}
    assert group["metrics"]["acc"] == approx_stats(
        {"mean": 0.55, "std": 0.1 / 2**0.5, "n": 2, "values": [0.5, 0.6]}
    )


def test_no_jobs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no job dirs"):
        summarize(tmp_path)


def test_cli_prints_chosen_metrics(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    main([str(sweep), "--group-by", "image_model", "--metrics", "image/val_acc_best"])
    out = capsys.readouterr().out
    assert out == (sweep / "summary.md").read_text()
    assert "| image_model | jobs | image/val_acc_best |" in out
    assert "| bilstm | 2 | 0.725 ± 0.03536 |" in out and "image/test_acc" not in out


def test_aggregators_script(sweep: Path) -> None:
    """experiments/aggregators/summarize.py (the command in its RESULTS.md) still works."""
    script = ROOT / "experiments" / "aggregators" / "summarize.py"
    out = subprocess.run(
        [sys.executable, str(script), str(sweep)], capture_output=True, text=True, check=True
    ).stdout
    assert (
        "| image_model | jobs | image/test_acc | image/val_acc_best | features/patch_acc_test |"
        in out
    )
    assert "| bilstm | 2 | 0.7 ± 0.1414 | 0.725 ± 0.03536 | — |" in out


def test_wandb_summary_run(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_to_wandb(summarize(sweep, ["image_model"]), sweep, group="cv-test")
    wandb.teardown()  # the service may still be writing the run's file until it stops
    (run_dir,) = (sweep / "wandb").glob("offline-run-*")
    (table,) = (run_dir / "files" / "media" / "table").glob("jobs_*.table.json")
    jobs = json.loads(table.read_text())
    assert jobs["columns"][:4] == ["job", "status", "image_model", "data.fold"]
    assert [row[1] for row in jobs["data"]] == ["ok", "ok", "ok", "failed"]
    records = next(run_dir.glob("*.wandb")).read_bytes()
    for text in ("cv-test", "summary", "image_model=bilstm/image/test_acc/mean"):
        assert text.encode() in records


def test_a_single_run_dir_is_one_job(tmp_path: Path) -> None:
    """``python -m breastnet.summary logs/runs/<time>``: the run's own dir, summarised."""
    run = tmp_path / "runs" / "2026-01-01_00-00-00"
    metrics = {"eval/balanced_accuracy": 0.6, "data/n_train_images": 32, "eval/n_images": 4}
    write_job(run, ["experiment=demo"], metrics)
    summary = summarize(run)
    assert [(j["num"], j["status"], j["dir"]) for j in summary["jobs"]] == [(0, "ok", str(run))]
    md = (run / "summary.md").read_text()
    assert "| job | status | train images | test images | eval/balanced_accuracy |" in md
    assert "| 0 | ok | 32 | 4 | 0.6 |" in md


def test_nothing_to_summarise_is_one_line(tmp_path: Path) -> None:
    for target in (tmp_path / "missing", tmp_path):
        done = subprocess.run(
            [sys.executable, "-m", "breastnet.summary", str(target)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith(f"breastnet.summary: {target} ")


def test_limited_batches_are_marked_and_counts_shown(tmp_path: Path) -> None:
    """A `debug=default` CV: two batches per loop, numbers that measure nothing, said so."""
    limits = {"limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2}
    for fold in range(2):
        counts = {"data/n_train_images": 30 + fold, "data/n_test_images": 10 - fold}
        write_job(
            tmp_path / str(fold),
            [f"data.fold={fold}", "debug=default"],
            {"eval/balanced_accuracy": 0.25, **counts},
            config={"trainer": {"max_epochs": 1, "limit_val_batches": 1.0} | limits},
        )
    summary = summarize(tmp_path)
    assert summary["jobs"][0]["limited"] == [f"trainer.{k}=2" for k in limits]
    md = (tmp_path / "summary.md").read_text()
    assert "**Limited batches** in job(s) 0, 1 (trainer.limit_test_batches=2, " in md
    assert "| job | status | train images | test images | data.fold |" in md
    assert "| 1 | ok (limited) | 31 | 9 | 1 | 0.25 |" in md


def test_full_runs_are_not_marked(sweep: Path) -> None:
    write_job(sweep / "4", ["data.fold=2"], {"x": 1.0}, config={"trainer": {"max_epochs": 9}})
    summary = summarize(sweep)
    assert all(job["limited"] == [] for job in summary["jobs"])
    md = (sweep / "summary.md").read_text()
    assert "Limited" not in md and "train images" not in md
