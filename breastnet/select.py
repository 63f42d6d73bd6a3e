"""Choose a recipe among a sweep's configs on the training side, and report its test numbers.

    python -m breastnet.select SWEEP_DIR [--objective select/inner_balanced_accuracy] [--out F]

A sweep's jobs differ in candidate settings (``image_model``, ``features.view``, ``stain``...)
and possibly in outer fold (``data.fold`` with ``data.folds=K``) and ``seed``. Per outer fold
(once for a fixed split such as ``data.split=eva``) the config with the best objective,
averaged over its seeds, is chosen (higher is better; a tie goes to the config met first in
job order), and only the chosen config's test metrics are reported: per fold (mean ± sample
std over its seeds) and mean ± sample std over the folds. The objective must come from the
training side: a test metric is refused, a val metric (a few val images) warned about.

With ``select.inner_folds=K`` (``select=inner_cv``) each job's objective is K-fold CV inside
its own outer training side, so over a k-fold outer CV this is nested cross-validation: no
test image chooses anything. Writes ``results.json`` (default ``SWEEP_DIR/selection/``: the
sweep dir's own ``results.json`` is ``breastnet.summary``'s) and a markdown summary beside it,
which it prints. The configs' test numbers side by side (``breastnet.summary``) are a choice
made on the test side; ``test_side_note`` says so above such a table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from breastnet.artifacts import write_json, write_text
from breastnet.errors import ConfigError
from breastnet.summary import COUNTS, fmt, image_count, markdown_table, read_jobs, setting

log = logging.getLogger(__name__)

#: The image stage's inner-CV objective (``breastnet.stages.image.SELECT_METRIC``).
DEFAULT_OBJECTIVE = "select/inner_balanced_accuracy"
#: Overrides that repeat a config rather than make another one: the outer fold and the seed.
REPLICATES = ("data.fold", "seed")
#: The chosen config's test metrics in the markdown (results.json has every ``eval/`` one).
SHOWN = (("balanced accuracy", "eval/balanced_accuracy"), ("accuracy", "eval/image_accuracy"))
FIXED_SPLIT = "split"
"""The fold label of a sweep on one fixed split (no ``data.folds``)."""


def is_test_metric(name: str) -> bool:
    """Whether a metric is scored on test images: evaluate's and predict's (``eval/``,
    ``predict/``) and any ``<stage>/..test..`` (``image/test_acc``, ``patch/test_acc``,
    ``features/patch_acc_test``)."""
    stage, _, metric = name.rpartition("/")
    return stage in ("eval", "predict") or "test" in metric.split("_")


def is_val_metric(name: str) -> bool:
    """Whether a metric is scored on the val carve-out (``image/val_acc_best``...)."""
    return "val" in name.rpartition("/")[2].split("_")


def check_objective(objective: str) -> None:
    """Refuse a test metric as the objective; warn (one line) about a val metric.

    Raises:
        ConfigError: ``objective`` is scored on test images.
    """
    if is_test_metric(objective):
        raise ConfigError(
            f"--objective {objective} is scored on the test images: choosing by it is a choice "
            f"made on the test side; use {DEFAULT_OBJECTIVE} (select.inner_folds=K)"
        )
    if is_val_metric(objective):
        log.warning(
            "--objective %s is scored on a few val images carved out of the training side: "
            "a noisy choice; %s (select.inner_folds=K) scores every training image",
            objective,
            DEFAULT_OBJECTIVE,
        )


def config_key(overrides: dict[str, str | None]) -> tuple[tuple[str, str | None], ...]:
    """What makes a config: its overrides but the fold and the seed, in key order."""
    return tuple(sorted((k, v) for k, v in overrides.items() if k not in REPLICATES))


def test_side_note(rows: Sequence[dict[str, str | None]], metrics: Sequence[str]) -> str | None:
    """The line above a table whose rows (their overrides or group settings) are more than one
    config beside their test ``metrics``: reading a winner off it chooses on the test side.
    None when the rows differ in fold or seed only, or no metric is a test metric."""
    configs = {config_key(row) for row in rows}
    if len(configs) < 2 or not any(is_test_metric(m) for m in metrics):
        return None
    return (
        f"These {len(configs)} configs are compared on their test images: a choice among them "
        "is chosen on the test side; use python -m breastnet.select for a choice made on the "
        "training side."
    )


def _stats(values: list[float]) -> dict:
    """Mean, sample std (ddof=1; None for one value) and the values."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "stdev": std, "values": values}


def _fold_of(job: dict) -> str:
    """The job's outer fold (``data.fold`` when ``data.folds`` is set), else ``FIXED_SPLIT``."""
    job_dir, overrides = Path(job["dir"]), job["overrides"]
    if setting(job_dir, overrides, "data.folds") in (None, "null", "None"):
        return FIXED_SPLIT
    return setting(job_dir, overrides, "data.fold") or "0"


def _label(fold: str) -> str:
    return fold if fold == FIXED_SPLIT else f"fold {fold}"


def _fold_order(fold: str) -> tuple[int, str]:
    return (int(fold), "") if fold.isdigit() else (sys.maxsize, fold)


def _count(jobs: list[dict], keys: Sequence[str]) -> int | None:
    """An image count (``summary.image_count``) of the first of ``jobs`` that has it."""
    found = (image_count(job["metrics"], keys) for job in jobs)
    return next((n for n in found if n is not None), None)


def _test_metrics(jobs: list[dict]) -> dict[str, dict]:
    """Each numeric ``eval/`` metric of ``jobs`` (a config's seeds in one fold): its stats."""
    values: dict[str, list[float]] = {}
    for job in jobs:
        for key, value in job["metrics"].items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if key.startswith("eval/") and numeric:
                values.setdefault(key, []).append(float(value))
    return {key: _stats(v) for key, v in sorted(values.items())}


def _check_jobs(jobs: list[dict], objective: str, sweep_dir: Path) -> list[dict]:
    """The finished jobs, each with the objective (a failed one is warned about).

    Raises:
        ConfigError: no job finished, or a finished job lacks the objective.
    """
    finished = [job for job in jobs if job["status"] == "ok"]
    if failed := [str(job["num"]) for job in jobs if job["status"] != "ok"]:
        log.warning(
            "job(s) %s have no metrics.json (failed or unfinished): left out of the choice",
            ", ".join(failed),
        )
    if not finished:
        raise ConfigError(f"{sweep_dir}: no job finished (no <n>/metrics.json) to choose among")
    if lacking := [job for job in finished if objective not in job["metrics"]]:
        found = sorted({k for j in finished for k in j["metrics"] if not is_test_metric(k)})
        raise ConfigError(
            f"--objective {objective} is not in the metrics.json of job(s) "
            f"{', '.join(str(j['num']) for j in lacking)} in {sweep_dir} (training-side metrics "
            f"found: {', '.join(found) or 'none'}); run the sweep with select=inner_cv "
            "(select.inner_folds=K) or name one of those"
        )
    return finished


def select(sweep_dir: Path, objective: str = DEFAULT_OBJECTIVE) -> dict:
    """Choose per outer fold the config with the best mean ``objective`` over its seeds, from
    the jobs' training-side metrics alone, and gather the chosen ones' test metrics.

    Returns:
        results.json's content: ``objective``, ``n_configs``, ``candidates`` (per config its
        overrides, the varying ``settings``, jobs and objective per fold: mean and per job),
        ``folds`` (per fold the chosen config, its objective, seeds, image counts, protocol
        and ``test`` metrics over its seeds), ``test`` (the chosen ones' ``{metric: {mean,
        stdev, values}}`` over the folds, or over the seeds on one split; ``over`` says which)
        and ``test_side_chose: false``.

    Raises:
        ConfigError: a test metric as ``objective``, no job dirs, no finished job, a finished
            job without the objective, or configs of one fold tested on different splits.
    """
    check_objective(objective)
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir) if sweep_dir.is_dir() else []
    if not jobs:
        raise ConfigError(
            f"{sweep_dir} has no job dirs (<n>/): give a multirun's sweep dir "
            "(logs/multiruns/<time>, logs/cv/<time>, logs/sweeps/<name>)"
        )
    finished = _check_jobs(jobs, objective, sweep_dir)
    configs: dict[tuple, dict] = {}  # in job order: the tie-break
    cells: dict[tuple[str, int], list[dict]] = {}  # (fold, config): its finished jobs
    for job in jobs:
        key = config_key(job["overrides"])
        config = configs.setdefault(key, {"config": len(configs), "overrides": dict(key)})
        config.setdefault("jobs", []).append(job["num"])
        if job["status"] == "ok":
            cells.setdefault((_fold_of(job), config["config"]), []).append(job)
    varying = [
        k
        for k in dict.fromkeys(k for key in configs for k, _ in key)
        if len({c["overrides"].get(k) for c in configs.values()}) > 1
    ]
    candidates = list(configs.values())
    for config in candidates:
        config["settings"] = {k: config["overrides"].get(k) for k in varying}
        config["objective"] = {
            fold: {
                "mean": float(np.mean([j["metrics"][objective] for j in cell])),
                "jobs": {str(j["num"]): j["metrics"][objective] for j in cell},
            }
            for (fold, c), cell in cells.items()
            if c == config["config"]
        }
    folds = []
    for fold in sorted({f for f, _ in cells}, key=_fold_order):
        compared = [c for c in candidates if fold in c["objective"]]
        chosen = max(compared, key=lambda c: (c["objective"][fold]["mean"], -c["config"]))
        protocols = {cells[fold, c["config"]][0]["metrics"].get("eval/protocol") for c in compared}
        if len(protocols - {None}) > 1:
            raise ConfigError(
                f"{sweep_dir}: the configs of fold {fold} were tested on different splits "
                f"({'; '.join(sorted(protocols - {None}))}): a choice compares configs on one "
                "outer split; keep data.* split settings out of the candidates"
            )
        picked = cells[fold, chosen["config"]]
        folds.append(
            {
                "fold": fold,
                "n_compared": len(compared),
                "chosen": chosen["config"],
                "settings": chosen["settings"],
                "objective": chosen["objective"][fold]["mean"],
                "jobs": [j["num"] for j in picked],
                "seeds": [j["overrides"].get("seed") for j in picked],
                "protocol": next(iter(protocols - {None}), None),
                **{
                    f"n_{column.split()[0]}_images": _count(picked, keys)
                    for column, keys in COUNTS
                },
                "test": _test_metrics(picked),
            }
        )
    if len(folds) == 1:
        over, test = "seeds", folds[0]["test"]
    else:
        per_fold = [{k: s["mean"] for k, s in f["test"].items()} for f in folds]
        names = sorted({k for f in per_fold for k in f})
        over = "folds"
        test = {k: _stats([f[k] for f in per_fold if k in f]) for k in names}
    first = finished[0]
    inner = setting(Path(first["dir"]), first["overrides"], "select.inner_folds")
    return {
        "sweep_dir": str(sweep_dir),
        "objective": objective,
        "higher_is_better": True,
        "inner_folds": int(inner) if inner and inner.isdigit() else None,
        "outer_folds": None if folds[0]["fold"] == FIXED_SPLIT else len(folds),
        "n_configs": len(candidates),
        "varying": varying,
        "candidates": candidates,
        "folds": folds,
        "over": over,
        "test": test,
        "failed_jobs": [job["num"] for job in jobs if job["status"] != "ok"],
        "limited_jobs": [job["num"] for job in finished if job["limited"]],
        "test_side_chose": False,
    }


def _pm(stats: dict | None) -> str:
    """``mean ± std`` (the mean alone for one value)."""
    if stats is None:
        return "—"
    return fmt(stats["mean"]) + ("" if stats["stdev"] is None else f" ± {fmt(stats['stdev'])}")


def protocol_line(result: dict) -> str:
    """The protocol in words: nested CV over K outer folds, or one fixed split."""
    objective, inner = result["objective"], result["inner_folds"]
    inside = f"{inner}-fold CV inside each training side, " if inner else ""
    scored = f"{objective} ({inside}no test image)"
    if result["outer_folds"]:
        nested = "nested cross-validation" if inner else "outer cross-validation"
        return (
            f"{nested}: {result['outer_folds']} outer folds (data.fold), a config chosen in "
            f"each by {scored}, scored on that fold's test images"
        )
    return f"one fixed split: a config chosen by {scored}, scored on its test images"


def to_markdown(result: dict) -> str:
    """The selection as markdown: what chose, the configs' objectives (never their test
    numbers), the chosen one per fold with its test numbers, and their mean ± std."""
    n, objective, folds = result["n_configs"], result["objective"], result["folds"]
    lines = [
        f"# Selection in {result['sweep_dir']}",
        "",
        f"Chosen on the training side by {objective} among {n} configs; the test side chose "
        "nothing.",
        "",
        f"Protocol: {protocol_line(result)}.",
    ]
    lines += [f"- {_label(f['fold'])}: {f['protocol']}" for f in folds if f["protocol"]]
    if result["limited_jobs"]:
        jobs = ", ".join(map(str, result["limited_jobs"]))
        lines += ["", f"**Limited batches** in job(s) {jobs}: numbers that measure nothing."]
    if result["failed_jobs"]:
        jobs = ", ".join(map(str, result["failed_jobs"]))
        lines += ["", f"Job(s) {jobs} failed and were left out of the choice."]
    varying, fold_names = result["varying"], [f["fold"] for f in folds]
    lines += ["", f"## Configs: {objective} (mean over seeds; their test numbers unshown)", ""]
    lines += markdown_table(
        ["config", *varying, *map(_label, fold_names)],
        [
            [c["config"], *c["settings"].values()]
            + [fmt(c["objective"].get(f, {}).get("mean")) for f in fold_names]
            for c in result["candidates"]
        ],
    )
    names = [(label, key) for label, key in SHOWN if key in result["test"]]
    lines += ["", "## Chosen per fold, its test numbers (mean ± std over seeds)", ""]
    lines += markdown_table(
        ["fold", "config", *varying, "objective", "compared", "seeds", "train images"]
        + ["test images", *(label for label, _ in names)],
        [
            [f["fold"], f["chosen"], *f["settings"].values(), fmt(f["objective"])]
            + [f["n_compared"], len(f["jobs"]), f["n_train_images"], f["n_test_images"]]
            + [_pm(f["test"].get(key)) for _, key in names]
            for f in folds
        ],
    )
    if result["over"] == "folds":
        over = f"mean ± sample std over {len(folds)} folds (each the mean over its seeds)"
    else:
        seeds = len(folds[0]["jobs"])
        over = f"mean ± sample std over {seeds} seeds" if seeds > 1 else "one run"
    lines += ["", f"## The chosen configs' test numbers: {over}", ""]
    lines += markdown_table(
        [label for label, _ in names], [[_pm(result["test"][k]) for _, k in names]]
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: choose, write results.json and the markdown beside it, print the markdown; bad
    input is one line on stderr and exit status 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun dir (hydra.sweep.dir)")
    parser.add_argument(
        "--objective",
        default=DEFAULT_OBJECTIVE,
        help=f"training-side metric to choose by, higher is better (default {DEFAULT_OBJECTIVE})",
    )
    parser.add_argument(
        "--out", type=Path, help="results JSON (default SWEEP_DIR/selection/results.json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="breastnet.select: %(levelname)s: %(message)s")
    try:
        result = select(args.sweep_dir, args.objective)
    except ConfigError as e:
        sys.exit(f"breastnet.select: {e}")
    out = args.out or args.sweep_dir / "selection" / "results.json"
    write_json(out, result)
    markdown = to_markdown(result)
    write_text(out.with_suffix(".md"), markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
