"""Nested selection: the config is chosen by a training-side objective alone, only its test
numbers are reported, and a test metric never chooses (fabricated sweeps, and one real)."""

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from test_summary import write_job

from breastnet.errors import ConfigError
from breastnet.select import DEFAULT_OBJECTIVE, main, select, to_markdown
from breastnet.summary import summarize
from breastnet.synthetic import write_synthetic_dataset

from conftest import ROOT, SMALL_RUN

INNER = DEFAULT_OBJECTIVE
LINE = "among {n} configs; the test side chose nothing."
NOTE = "configs are compared on their test images: a choice among them is chosen on the test side"


def metrics(inner: float, balanced: float, accuracy: float, train: int = 30) -> dict:
    """A finished job's metrics.json: the inner objective, the test numbers, image counts."""
    return {
        INNER: inner,
        "image/val_acc_best": 0.5,
        "image/test_acc": accuracy,
        "eval/balanced_accuracy": balanced,
        "eval/image_accuracy": accuracy,
        "eval/protocol": "split-abc: 5-fold, by patient",
        "data/n_train_images": train,
        "data/n_test_images": 10,
    }


def write_sweep(sweep: Path, jobs: list[tuple[list[str], dict | None]]) -> Path:
    for num, (overrides, found) in enumerate(jobs):
        write_job(sweep / str(num), overrides, found)
    return sweep


# eva's split, 2 seeds: bilstm is the better config inside the training images, linear_probe
# only on the test images.
FIXED = [
    (["image_model=bilstm", "seed=1"], metrics(0.70, 0.60, 0.62)),
    (["image_model=bilstm", "seed=2"], metrics(0.72, 0.64, 0.66)),
    (["image_model=linear_probe", "seed=1"], metrics(0.50, 0.95, 0.96)),
    (["image_model=linear_probe", "seed=2"], metrics(0.52, 0.97, 0.98)),
]


def test_a_config_better_on_the_test_side_only_is_never_chosen(tmp_path: Path) -> None:
    result = select(write_sweep(tmp_path, FIXED))
    assert (result["n_configs"], result["test_side_chose"], result["over"]) == (2, False, "seeds")
    (fold,) = result["folds"]
    assert (fold["fold"], fold["chosen"], fold["settings"]) == (
        "split",
        0,
        {"image_model": "bilstm"},
    )
    assert fold["objective"] == pytest.approx(0.71) and fold["jobs"] == [0, 1]
    assert (fold["n_train_images"], fold["n_test_images"], fold["n_compared"]) == (30, 10, 2)
    balanced = result["test"]["eval/balanced_accuracy"]
    assert balanced["values"] == [0.60, 0.64]
    assert balanced["mean"] == pytest.approx(0.62)
    assert balanced["stdev"] == pytest.approx(np.std([0.60, 0.64], ddof=1))
    probe = result["candidates"][1]
    assert probe["objective"]["split"] == {
        "mean": pytest.approx(0.51),
        "jobs": {"2": 0.5, "3": 0.52},
    }
    # the other config's test numbers are nowhere, only its inner scores
    text = json.dumps(result) + to_markdown(result)
    for number in ("0.95", "0.96", "0.97", "0.98"):
        assert number not in text
    md = to_markdown(result)
    assert f"Chosen on the training side by {INNER} {LINE.format(n=2)}" in md
    assert (
        "| split | 0 | bilstm | 0.71 | 2 | 2 | 30 | 10 | 0.62 ± 0.02828 | 0.64 ± 0.02828 |" in md
    )


def nested_sweep(sweep: Path, seed: int = 0) -> Path:
    """3 outer folds x 3 configs x 2 seeds, inner and test scores at random."""
    rng = np.random.default_rng(seed)
    jobs = [
        (
            [f"image_model={model}", "data.folds=3", f"data.fold={fold}", f"seed={s}"],
            metrics(*rng.uniform(0.3, 0.9, 3).round(3)),
        )
        for model in ("bilstm", "attention", "linear_probe")
        for fold in range(3)
        for s in (1, 2)
    ]
    return write_sweep(sweep, jobs)


def test_permuting_the_test_metrics_leaves_the_choice(tmp_path: Path) -> None:
    """As if the test labels were permuted: the test numbers move between jobs, the choice
    stays, and what is reported is the chosen jobs' new numbers."""
    sweep = nested_sweep(tmp_path / "sweep")
    before = select(sweep)
    chosen = [(f["fold"], f["chosen"], f["jobs"]) for f in before["folds"]]
    paths = sorted(sweep.glob("*/metrics.json"))
    found = [json.loads(p.read_text()) for p in paths]
    tested = [{k: v for k, v in m.items() if k.startswith("eval/")} for m in found]
    for trial in range(3):
        random.Random(trial).shuffle(tested)
        for path, m, test in zip(paths, found, tested, strict=True):
            path.write_text(json.dumps(m | test))
        after = select(sweep)
        assert [(f["fold"], f["chosen"], f["jobs"]) for f in after["folds"]] == chosen
        assert [c["objective"] for c in after["candidates"]] == [
            c["objective"] for c in before["candidates"]
        ]
        for fold in after["folds"]:
            values = [tested[paths.index(sweep / f"{j}/metrics.json")] for j in fold["jobs"]]
            assert fold["test"]["eval/balanced_accuracy"]["values"] == [
                v["eval/balanced_accuracy"] for v in values
            ]


def cv_job(model: str, fold: int, seed: int, scores: tuple | None) -> tuple[list[str], dict]:
    """One job of a 3-fold CV: its overrides and metrics (None: it failed)."""
    overrides = [f"image_model={model}", "data.folds=3", f"data.fold={fold}", f"seed={seed}"]
    return overrides, None if scores is None else metrics(*scores)


PROBE, MEAN = "linear_probe", "mean_features"
# 3 outer folds, 2 configs, 2 seeds in folds 0 and 1, one in fold 2 where the configs tie;
# scores: (inner objective, test balanced accuracy, test accuracy).
NESTED = [
    # fold 0: probe inner 0.6 beats mean 0.55
    cv_job(PROBE, 0, 1, (0.6, 0.7, 0.8)),
    cv_job(PROBE, 0, 2, (0.6, 0.5, 0.6)),
    cv_job(MEAN, 0, 1, (0.5, 0.9, 0.9)),
    cv_job(MEAN, 0, 2, (0.6, 0.9, 0.9)),
    # fold 1: mean 0.8 (its one finished seed) beats probe 0.7
    cv_job(PROBE, 1, 1, (0.7, 0.9, 0.9)),
    cv_job(PROBE, 1, 2, (0.7, 0.9, 0.9)),
    cv_job(MEAN, 1, 1, (0.8, 0.4, 0.5)),
    cv_job(MEAN, 1, 2, None),
    # fold 2: a tie, to the config met first in job order (linear_probe)
    cv_job(PROBE, 2, 1, (0.5, 0.3, 0.4)),
    cv_job(MEAN, 2, 1, (0.5, 0.9, 0.9)),
]


def test_nested_k_fold_choices_and_mean_std(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result = select(write_sweep(tmp_path, NESTED))
    assert "job(s) 7 have no metrics.json" in caplog.text
    assert (result["n_configs"], result["outer_folds"], result["over"]) == (2, 3, "folds")
    assert result["failed_jobs"] == [7]
    folds = result["folds"]
    assert [(f["fold"], f["chosen"], f["jobs"]) for f in folds] == [
        ("0", 0, [0, 1]),
        ("1", 1, [6]),
        ("2", 0, [8]),
    ]
    assert [f["objective"] for f in folds] == pytest.approx([0.6, 0.8, 0.5])
    assert [f["seeds"] for f in folds] == [["1", "2"], ["1"], ["1"]]
    assert folds[0]["test"]["eval/balanced_accuracy"] == {
        "mean": pytest.approx(0.6),
        "stdev": pytest.approx(0.2 / 2**0.5),
        "values": [0.7, 0.5],
    }
    per_fold = [0.6, 0.4, 0.3]  # each fold's mean over its seeds
    assert result["test"]["eval/balanced_accuracy"] == {
        "mean": pytest.approx(np.mean(per_fold)),
        "stdev": pytest.approx(np.std(per_fold, ddof=1)),
        "values": pytest.approx(per_fold),
    }
    accuracy = [0.7, 0.5, 0.4]
    assert result["test"]["eval/image_accuracy"]["mean"] == pytest.approx(np.mean(accuracy))
    md = to_markdown(result)
    assert "nested cross-validation: 3 outer folds" not in md  # no select.inner_folds saved
    assert "outer cross-validation: 3 outer folds (data.fold)" in md
    assert "| config | image_model | fold 0 | fold 1 | fold 2 |" in md
    assert "| 1 | mean_features | 0.55 | 0.8 | 0.5 |" in md
    assert "| 1 | 1 | mean_features | 0.8 | 2 | 1 | 30 | 10 | 0.4 | 0.5 |" in md
    assert "over 3 folds (each the mean over its seeds)" in md
    assert "| 0.4333 ± 0.1528 | 0.5333 ± 0.1528 |" in md


def test_test_side_objectives_are_refused_val_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sweep = write_sweep(tmp_path / "sweep", FIXED)
    for objective in ("eval/balanced_accuracy", "image/test_acc", "features/patch_acc_test"):
        with pytest.raises(ConfigError, match=f"--objective {objective} is scored on the test"):
            select(sweep, objective)
        with pytest.raises(SystemExit) as exited:
            main([str(sweep), "--objective", objective])
        assert str(exited.value.code).startswith("breastnet.select: --objective ")
        assert "\n" not in str(exited.value.code)
    with caplog.at_level(logging.WARNING):
        result = select(sweep, "image/val_acc_best")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("--objective image/val_acc_best is scored on a few val images")
    assert "\n" not in warning
    assert result["folds"][0]["chosen"] == 0  # a tie at 0.5: the first config
    with pytest.raises(
        ConfigError, match=r"select/missing is not in the metrics.json of job\(s\)"
    ):
        select(sweep, "select/missing")


def test_the_cli_writes_results_and_prints_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from breastnet.stages.image import SELECT_METRIC

    assert DEFAULT_OBJECTIVE == SELECT_METRIC
    sweep = write_sweep(tmp_path / "sweep", FIXED)
    main([str(sweep)])
    saved = json.loads((sweep / "selection" / "results.json").read_text())
    assert (saved["objective"], saved["n_configs"], saved["test_side_chose"]) == (INNER, 2, False)
    out = capsys.readouterr().out
    assert out == (sweep / "selection" / "results.md").read_text()
    assert LINE.format(n=2) in out
    with pytest.raises(SystemExit, match="has no job dirs"):
        main([str(tmp_path / "missing")])


def test_summary_says_when_configs_are_compared_on_the_test_side(tmp_path: Path) -> None:
    summarize(write_sweep(tmp_path / "configs", FIXED), ["image_model"])
    md = (tmp_path / "configs" / "summary.md").read_text()
    note = (
        "These 2 configs are compared on their test images: a choice among them is chosen on "
        "the test side; use python -m breastnet.select for a choice made on the training side."
    )
    assert md.count(note) == 2  # above the jobs and above the groups
    assert md.index(note) < md.index("| job | status |")
    # folds and seeds of one config: no choice among configs to make
    cv = [(o[1:], m) for o, m in NESTED if o[0] == f"image_model={PROBE}"]
    summarize(write_sweep(tmp_path / "cv", cv), ["data.fold"])
    assert NOTE not in (tmp_path / "cv" / "summary.md").read_text()
    # configs, but no test metric shown
    summarize(tmp_path / "configs", metrics=["image/val_acc_best"])
    assert NOTE not in (tmp_path / "configs" / "summary.md").read_text()


@pytest.mark.slow
def test_a_real_multirun_is_chosen_on_its_inner_objective(tmp_path: Path) -> None:
    """``python -m breastnet -m`` over two image models on a frozen encoder's features with
    select.inner_folds=3, then ``python -m breastnet.select`` on its sweep dir."""
    torch.manual_seed(0)
    encoder = tmp_path / "mobilenet_v2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), encoder)
    data = write_synthetic_dataset(tmp_path / "demo", 16, 256, 192, seed=7)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "breastnet", "-m", *SMALL_RUN]
    cmd += [
        f"data.data_dir={data}",
        f"paths.work_dir={tmp_path / 'work'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={sweep}",
        "patch_model.freeze=true",
        f"patch_model.net.weights={encoder}",
        "stages=[prepare,features,image,evaluate]",
        "image.max_epochs=5",
        "select.inner_folds=3",
        "image_model=mean_features,linear_probe",
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = tmp_path / "results.json"
    chose = subprocess.run(
        [sys.executable, "-m", "breastnet.select", str(sweep), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chose.returncode == 0, chose.stderr
    result = json.loads(out.read_text())
    assert (result["n_configs"], result["inner_folds"], result["test_side_chose"]) == (2, 3, False)
    inner = {
        c["settings"]["image_model"]: c["objective"]["split"]["mean"] for c in result["candidates"]
    }
    jobs = [json.loads((sweep / str(n) / "metrics.json").read_text()) for n in range(2)]
    assert sorted(inner.values()) == sorted(j[INNER] for j in jobs)
    (fold,) = result["folds"]
    assert fold["objective"] == max(inner.values())
    assert inner[fold["settings"]["image_model"]] == max(inner.values())
    picked = jobs[fold["jobs"][0]]
    assert fold["test"]["eval/balanced_accuracy"]["values"] == [picked["eval/balanced_accuracy"]]
    assert fold["n_train_images"] == picked["data/n_train_images"] == 32
    assert "among 2 configs; the test side chose nothing." in chose.stdout
    assert "one fixed split: a config chosen by select/inner_balanced_accuracy (3-fold CV" in (
        chose.stdout
    )
