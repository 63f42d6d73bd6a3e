"""Summarise a Hydra multirun (cross-validation folds, a grid, an Optuna study) in one place.

    python -m breastnet.summary logs/cv/<time> [--group-by image_model ...] [--metrics KEY ...]

A sweep leaves one job dir per run (``<sweep_dir>/<n>/``) with its overrides and its
``metrics.json``; this reads them all and writes into the sweep dir ``summary.json`` (every
job and every numeric metric), ``results.json`` (per metric its ``mean``, sample ``stdev``
and per-job ``values``, as eva writes them) and ``summary.md``, which it prints: each job's
split protocol, a row per job (with its training and test image counts), then mean ± sample
std per group of jobs, of the metrics a reader compares (accuracy, balanced accuracy, AUC,
the 2-class view; ``HEADLINE``). A job dir without ``metrics.json`` failed (or has not
finished yet): it is listed with the end of its log, and the other jobs are summarised all
the same. Jobs that trained on a limited number of batches (``debug=default``,
``trainer.limit_*_batches``) are marked: their numbers check a pipeline, they measure
nothing. A single run's dir (``logs/runs/<time>``) is summarised as a sweep of one job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from breastnet import wandb_mode
from breastnet.artifacts import write_json, write_text
from breastnet.logs import plural

log = logging.getLogger(__name__)

#: Lines of a failed job's log shown in the summary.
LOG_LINES = 20
#: The metrics summary.md shows (by the name after the stage's ``<stage>/``); the others are
#: in summary.json and results.json.
HEADLINE = (
    "image_accuracy",
    "balanced_accuracy",
    "macro_auc",
    "carcinoma_accuracy",
    "carcinoma_auc",
    "patch_acc_test",
    "test_acc",
    "val_acc_best",
)
#: The job table's image counts: (column, metrics.json keys, the first one present).
COUNTS = (
    ("train images", ("data/n_train_images",)),
    ("test images", ("data/n_test_images", "eval/n_images")),
)
#: Trainer settings that cut the batches of an epoch (``debug=default`` sets the limits).
LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "fast_dev_run")


def _overrides(job_dir: Path) -> dict[str, str]:
    """The job's command-line overrides as ``{key: value}`` (``+key`` as ``key``)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    lines = yaml.safe_load(path.read_text()) if path.is_file() else None
    pairs = (o.split("=", 1) for o in lines or [] if "=" in o and not o.startswith("~"))
    return {key.lstrip("+"): value for key, value in pairs}


def setting(job_dir: Path, overrides: dict[str, str], key: str) -> str | None:
    """The job's value of ``key``: its override, else its config group choice (``image_model``
    when left at the default), else the scalar in its saved config."""
    if key in overrides:
        return overrides[key]
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        choices = yaml.safe_load(hydra_yaml.read_text())["hydra"]["runtime"]["choices"]
        if key in choices:
            return choices[key]
    config_yaml = job_dir / ".hydra" / "config.yaml"
    node: Any = yaml.safe_load(config_yaml.read_text()) if config_yaml.is_file() else None
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return None if node is None or isinstance(node, dict | list) else str(node)


def _limits(job_dir: Path) -> list[str]:
    """The job's settings that limit its batches (``trainer.limit_train_batches=2``...), from
    its saved config; none for a full run."""
    config_yaml = job_dir / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_yaml.read_text()) if config_yaml.is_file() else None
    trainer = (config or {}).get("trainer") or {}

    def limits(key: str, value: Any) -> bool:  # an int is batches (1: one), a float a share
        if key == "fast_dev_run":
            return bool(value)
        return value is not None and not (isinstance(value, float) and value == 1.0)

    return [f"trainer.{k}={trainer[k]}" for k in LIMITS if limits(k, trainer.get(k))]


def _log_tail(job_dir: Path, lines: int = LOG_LINES) -> list[str]:
    """The last lines of the job's log (Hydra writes ``<job name>.log`` into the job dir)."""
    logs = sorted(job_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text(errors="replace").splitlines()[-lines:] if logs else []


def _job_dirs(sweep_dir: Path) -> list[tuple[int, Path]]:
    """The sweep's job dirs ``<n>/`` by number, or the dir itself as job 0 when it is a single
    run's dir (Hydra's ``.hydra/`` in it)."""
    numbered = [(int(d.name), d) for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()]
    if not numbered and (sweep_dir / ".hydra").is_dir():
        return [(0, sweep_dir)]
    return sorted(numbered)


def read_jobs(sweep_dir: Path) -> list[dict]:
    """Every job of the sweep, in job order: number, overrides, status, metrics, and the
    settings that limited its batches."""
    jobs = []
    for num, job_dir in _job_dirs(sweep_dir):
        job = {"num": num, "dir": str(job_dir), "overrides": _overrides(job_dir)}
        job["limited"] = _limits(job_dir)
        metrics_path = job_dir / "metrics.json"
        if metrics_path.is_file():
            job |= {"status": "ok", "metrics": json.loads(metrics_path.read_text())}
        else:
            job |= {"status": "failed", "metrics": {}, "log_tail": _log_tail(job_dir)}
        jobs.append(job)
    return jobs


def _numeric(metrics: dict) -> dict[str, float]:
    """The metrics that are numbers (not bools, strings, lists or dicts)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _group_stats(jobs: list[dict]) -> dict[str, dict]:
    """Mean, sample std (ddof=1, as papers and eva report it; None for one job), count and
    the values in job order of each numeric metric over ``jobs``."""
    values: dict[str, list[float]] = {}
    for job in jobs:
        for key, value in _numeric(job["metrics"]).items():
            values.setdefault(key, []).append(value)
    return {
        key: {
            "mean": float(np.mean(v)),
            "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "n": len(v),
            "values": v,
        }
        for key, v in sorted(values.items())
    }


def results(summary: dict) -> dict:
    """``results.json``: ``{metric: {"mean", "stdev", "values"}}`` over the finished jobs, or
    ``{group: {metric: ...}}`` when the summary groups them."""
    per_group = {
        group["name"]: {
            metric: {"mean": s["mean"], "stdev": s["std"], "values": s["values"]}
            for metric, s in group["metrics"].items()
        }
        for group in summary["groups"]
    }
    return per_group if summary["group_by"] else next(iter(per_group.values()))


def summarize(
    sweep_dir: Path, group_by: Sequence[str] = (), metrics: Sequence[str] | None = None
) -> dict:
    """Summarise the sweep in ``sweep_dir``; writes ``summary.json`` and ``summary.md`` there.

    Args:
        sweep_dir: the multirun dir (Hydra's ``hydra.sweep.dir``).
        group_by: override keys whose values make a group (e.g. ``image_model``); none: every
            job in one group, ``all``.
        metrics: the metric columns of ``summary.md`` (default: those of ``HEADLINE``, or
            every numeric one that varies when the jobs have none of them); ``summary.json``
            always has them all.

    Returns:
        ``{"sweep_dir", "group_by", "varying", "jobs": [...], "groups": [...]}``: per job its
        number, overrides, status, metrics (and ``log_tail`` when failed); per group its
        settings, job counts and ``{metric: {"mean", "std", "n", "values"}}`` over its
        finished jobs (``std`` with ddof=1).
    """
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(
            f"{sweep_dir} has no job dirs (<n>/) and is no run dir (no .hydra/): give a "
            "multirun's sweep dir (logs/multiruns/<time>, logs/cv/<time>) or a run's dir"
        )
    members: dict[tuple, list[dict]] = {}
    for job in jobs:
        job["settings"] = {k: setting(Path(job["dir"]), job["overrides"], k) for k in group_by}
        job["group"] = ", ".join(f"{k}={v}" for k, v in job["settings"].items()) or "all"
        members.setdefault(tuple(job["settings"].values()), []).append(job)
    groups = [
        {
            "name": group[0]["group"],
            "settings": group[0]["settings"],
            "n_jobs": len(group),
            "n_failed": sum(job["status"] != "ok" for job in group),
            "metrics": _group_stats([job for job in group if job["status"] == "ok"]),
        }
        for group in members.values()
    ]
    keys = dict.fromkeys(key for job in jobs for key in job["overrides"])  # command-line order
    varying = [key for key in keys if len({job["overrides"].get(key) for job in jobs}) > 1]
    summary = {
        "sweep_dir": str(sweep_dir),
        "group_by": list(group_by),
        "varying": varying,
        "jobs": jobs,
        "groups": groups,
    }
    write_json(sweep_dir / "summary.json", summary)
    write_json(sweep_dir / "results.json", results(summary))
    write_text(sweep_dir / "summary.md", to_markdown(summary, metrics))
    return summary


def fmt(value: float | None) -> str:
    """A metric in a markdown table: 4 significant digits, a dash for none."""
    return "—" if value is None else f"{value:.4g}"


def _short(value: object) -> object:
    """An override as passed, but a long float (an Optuna draw) to 4 significant digits."""
    if not isinstance(value, str) or "." not in value:
        return value
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def _cell(text: object) -> str:
    return "—" if text is None else str(text).replace("|", "\\|")


def markdown_table(header: Sequence[object], rows: list[list[object]]) -> list[str]:
    """A markdown table; a None cell is a dash, a ``|`` in a cell is escaped."""
    lines = [f"| {' | '.join(_cell(h) for h in header)} |", f"|{' --- |' * len(header)}"]
    return lines + [f"| {' | '.join(_cell(c) for c in row)} |" for row in rows]


def _metric_names(summary: dict, metrics: Sequence[str] | None) -> list[str]:
    """The markdown's metric columns: ``metrics``, else the headline ones the jobs have, else
    every numeric metric whose value differs between jobs."""
    if metrics:
        return list(metrics)
    found = sorted({k for job in summary["jobs"] for k in _numeric(job["metrics"])})
    headline = [k for k in found if k.rsplit("/", 1)[-1] in HEADLINE]
    if headline:
        return headline
    finished = [_numeric(job["metrics"]) for job in summary["jobs"] if job["status"] == "ok"]
    return [k for k in found if len({m.get(k) for m in finished}) > 1]


def image_count(metrics: dict, keys: Sequence[str]) -> int | None:
    """An image count of one job's ``metrics``: the first of ``keys`` it has."""
    found = next((metrics[k] for k in keys if isinstance(metrics.get(k), int | float)), None)
    return None if found is None else int(found)


def job_rows(summary: dict, metrics: Sequence[str] | None = None) -> tuple[list[str], list]:
    """The per-job table: header and rows (job, status, the image counts the jobs report, the
    overrides that vary, metrics)."""
    names = _metric_names(summary, metrics)
    jobs = summary["jobs"]
    counts = [
        (c, keys) for c, keys in COUNTS if any(image_count(j["metrics"], keys) for j in jobs)
    ]
    header = ["job", "status", *(c for c, _ in counts), *summary["varying"], *names]
    rows = []
    for job in jobs:
        values = _numeric(job["metrics"])
        rows.append(
            [job["num"], job["status"]]
            + [image_count(job["metrics"], keys) for _, keys in counts]
            + [job["overrides"].get(key) for key in summary["varying"]]
            + [values.get(name) for name in names]
        )
    return header, rows


def to_markdown(summary: dict, metrics: Sequence[str] | None = None) -> str:
    """The summary as markdown: jobs, then mean ± std per group, then the failed jobs' logs."""
    jobs, names = summary["jobs"], _metric_names(summary, metrics)
    failed = [job for job in jobs if job["status"] != "ok"]
    lines = [
        f"# Sweep {summary['sweep_dir']}",
        "",
        f"{plural(len(jobs), 'job')}: {len(jobs) - len(failed)} finished, {len(failed)} failed.",
        "",
        "## Jobs",
        "",
    ]
    limited = [job for job in jobs if job.get("limited")]
    if limited:
        settings = sorted({s for job in limited for s in job["limited"]})
        lines[-2:-2] = [
            f"**Limited batches** in job(s) {', '.join(str(j['num']) for j in limited)} "
            f"({', '.join(settings)}; `debug=default` sets them): a check that the pipeline "
            "runs, not a measure of any model.",
            "",
        ]
    header, rows = job_rows(summary, names)
    for row, job in zip(rows, jobs, strict=True):
        if job.get("limited"):
            row[1] = f"{row[1]} (limited)"
    n_text = len(header) - len(names)  # job, status, counts and overrides are shown as they are
    from breastnet.select import test_side_note  # it reads sweeps with this module

    finished = [job["overrides"] for job in jobs if job["status"] == "ok"]
    lines += [note, ""] if (note := test_side_note(finished, names)) else []
    lines += markdown_table(
        header,
        [r[:2] + [_short(v) for v in r[2:n_text]] + [fmt(v) for v in r[n_text:]] for r in rows],
    )

    group_by = summary["group_by"]
    over = f"by {', '.join(group_by)}" if group_by else "over all jobs"
    protocols = [(job["num"], job["metrics"].get("eval/protocol")) for job in jobs]
    if any(text for _, text in protocols):
        lines += ["", "## Protocol", ""]
        lines += [f"- job {num}: {text}" for num, text in protocols if text]
    lines += ["", f"## Mean ± sample std {over} (finished jobs; std with ddof=1)", ""]
    compared = [group["settings"] for group in summary["groups"] if group["metrics"]]
    lines += [note, ""] if (note := test_side_note(compared, names)) else []
    group_rows = []
    for group in summary["groups"]:
        stats = group["metrics"]
        counts = f"{group['n_jobs'] - group['n_failed']}"
        counts += f" (+{group['n_failed']} failed)" if group["n_failed"] else ""
        group_rows.append(
            [*(group["settings"].values() if group_by else ["all"]), counts]
            + [
                f"{fmt(stats[n]['mean'])} ± {fmt(stats[n]['std'])}" if n in stats else "—"
                for n in names
            ]
        )
    lines += markdown_table([*(group_by or ["group"]), "jobs", *names], group_rows)

    if failed:
        lines += ["", "## Failed jobs"]
        for job in failed:
            overrides = " ".join(f"{k}={v}" for k, v in job["overrides"].items())
            lines += ["", f"### Job {job['num']}: {overrides}", "", "```"]
            lines += job["log_tail"] or [f"(no log in {job['dir']})"]
            lines += ["```"]
    return "\n".join(lines) + "\n"


def log_to_wandb(summary: dict, sweep_dir: Path, group: str | None = None) -> None:
    """Log the summary as one extra W&B run beside the sweep's own runs (``job_type``
    ``summary``): the per-job table, and every group's mean/std/n as the run summary.

    The mode is the jobs' own (``breastnet.wandb_mode``: ``WANDB_MODE``, else online once
    logged in, else offline); the run's files land in ``sweep_dir/wandb``.
    """
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: no summary run logged")
        return
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "breastnet"),
        dir=str(sweep_dir),
        job_type="summary",
        group=group,
        name=f"summary-{Path(sweep_dir).name}",
        mode=wandb_mode(),
        config={"sweep_dir": str(sweep_dir), "group_by": summary["group_by"]},
    )
    header, rows = job_rows(summary)
    run.log({"jobs": wandb.Table(columns=header, data=rows)})
    for g in summary["groups"]:
        for metric, stats in g["metrics"].items():
            for stat, value in stats.items():
                run.summary[f"{g['name']}/{metric}/{stat}"] = value
    run.finish()


#: The sweep dir of the multirun this process runs (``SweepHint``), until ``sweep_hint`` says it.
_sweep_dir: Path | None = None


class SweepHint(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): note a multirun's sweep dir when it
    starts, so the CLI can say at its end, also when a job failed (Hydra then skips
    ``on_multirun_end``), where the jobs are and how to summarise them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir
        _sweep_dir = Path(str(config.hydra.sweep.dir))


def sweep_hint() -> str | None:
    """After a multirun, once: its sweep dir and the command that summarises it."""
    global _sweep_dir
    found, _sweep_dir = _sweep_dir, None
    if found is None:
        return None
    return f"sweep: {found}; summary: python -m breastnet.summary {shlex.quote(str(found))}"


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: summarise a sweep dir, print the markdown, optionally log it to W&B; a dir with
    nothing to summarise is one line on stderr and exit status 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun dir (hydra.sweep.dir)")
    parser.add_argument(
        "--group-by", nargs="+", default=[], metavar="KEY", help="override keys to group by"
    )
    parser.add_argument(
        "--metrics", nargs="+", metavar="KEY", help="metric columns of the markdown"
    )
    parser.add_argument("--wandb", action="store_true", help="also log one W&B summary run")
    parser.add_argument(
        "--wandb-group", help="W&B group of that run (default: the jobs' run_group)"
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(f"breastnet.summary: {args.sweep_dir} is not a directory")
    try:
        summary = summarize(args.sweep_dir, args.group_by, args.metrics)
    except FileNotFoundError as e:
        if e.errno is not None:  # the OS's, not ours: keep its traceback
            raise
        sys.exit(f"breastnet.summary: {e}")
    print(to_markdown(summary, args.metrics), end="")
    if args.wandb:
        jobs = summary["jobs"]
        run_groups = {setting(Path(j["dir"]), j["overrides"], "run_group") for j in jobs}
        default = run_groups.pop() if len(run_groups) == 1 else None
        log_to_wandb(summary, args.sweep_dir, args.wandb_group or default)


if __name__ == "__main__":
    main()
