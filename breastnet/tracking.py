"""W&B tracking beyond what Lightning's ``WandbLogger`` logs by itself.

The Trainer logs curves and test metrics; this adds the resolved config, every stage's returned
numbers in the run summary, and after evaluate or predict the confusion matrix and ROC as W&B
charts, the report's PNGs, and a table of the misclassified images. All stages of one job share
one W&B run (``wandb.run``), each under its own key prefix (``patch/``, ``features/``,
``image/``, ``eval/``, ``predict/``); the CLI finishes it at the end of the job, so each sweep
job or fold gets its own run.
"""

import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet import CLASSES
from breastnet.artifacts import container
from breastnet.logs import say
from breastnet.report import ImageResult, Report
from breastnet.report.metrics import headline
from breastnet.report.result import label_name


def uses_wandb(cfg: DictConfig) -> bool:
    """Whether ``cfg.logger`` is Lightning's WandbLogger."""
    logger = cfg.get("logger")
    return bool(logger) and str(logger.get("_target_", "")).endswith("WandbLogger")


def wandb_run(cfg: DictConfig) -> Any:
    """This job's W&B run, else None. Started here when no Trainer has (evaluate or predict
    alone), with the logger's settings and the resolved config, as a Trainer's run has it."""
    if not uses_wandb(cfg):
        return None
    import wandb

    if wandb.run is None:
        logger = instantiate(cfg.logger)
        logger.log_hyperparams(container(cfg))
        return logger.experiment
    return wandb.run


def log_summary(cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Put a stage's returned numbers (those of metrics.json) into the W&B run's summary."""
    if metrics and (run := wandb_run(cfg)) is not None:
        run.summary.update(metrics)


def sync_command(run_dir: str | Path) -> str:
    """The command that uploads an offline run: its own folder, absolute, so it works from
    any directory (a plain ``wandb sync`` looks in ./wandb, and the runs are in the run
    dirs)."""
    return f"wandb sync {shlex.quote(str(Path(run_dir).resolve()))}"


def finish() -> None:
    """End the job's W&B run, if one was started (a no-op without wandb); an offline run
    is followed by the command that uploads it."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return
    settings = wandb.run.settings
    offline, run_dir = settings._offline, settings.sync_dir
    wandb.finish()
    if offline:
        say(f"W&B run saved offline; to upload it: {sync_command(run_dir)}")


def confusion_chart(confusion: list[list[int]]) -> Any:
    """The report's confusion matrix (rows true) as the chart ``wandb.plot.confusion_matrix``
    draws, from the counts in metrics.json rather than counted again from predictions."""
    import wandb

    rows = [[CLASSES[i], CLASSES[j], int(n)] for (i, j), n in np.ndenumerate(confusion)]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
    fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
    return wandb.plot_table(
        "wandb/confusion_matrix/v1", table, fields, {"title": "Confusion Matrix Curve"}
    )


def roc_chart(curves: dict[int, tuple[np.ndarray, np.ndarray]]) -> Any:
    """The report's one-vs-rest ROC curves (``Report.roc_curves``) as a W&B chart.
    ``wandb.plot.roc_curve`` needs pandas, and indexes the probabilities by the rank of a
    class among those present, not by its index."""
    import wandb

    table = wandb.Table(columns=["class", "fpr", "tpr"])
    for c, (fpr, tpr) in curves.items():
        for x, y in zip(fpr, tpr, strict=True):
            table.add_data(CLASSES[c], round(float(x), 4), round(float(y), 4))
    return wandb.plot_table(
        "wandb/area-under-curve/v0",
        table,
        {"x": "fpr", "y": "tpr", "class": "class"},
        {
            "title": "ROC",
            "x-axis-title": "false positive rate",
            "y-axis-title": "true positive rate",
        },
    )


def log_report(cfg: DictConfig, report: Report, results: list[ImageResult], prefix: str) -> None:
    """Send a report to W&B: summary metrics, confusion/ROC charts, PNGs, misclassified table."""
    run = wandb_run(cfg)
    if run is None:
        return
    import wandb

    rows: dict[str, Any] = {
        f"{prefix}/{name.replace('/', '_')}": wandb.Image(str(path), caption=name)
        for name, path in report.figures.items()
    }
    if report.metrics is not None:
        if (confusion := report.metrics["confusion_matrix"]) is not None:  # 4-class labels
            rows[f"{prefix}/confusion_matrix_chart"] = confusion_chart(confusion)
            rows[f"{prefix}/roc_chart"] = roc_chart(report.roc_curves)
        # Here too, not only from the stage's return: predict fails after its report when any
        # file did, and the numbers of the files that worked belong in the summary.
        run.summary.update({f"{prefix}/{k}": v for k, v in headline(report.metrics).items()})
    table = wandb.Table(
        columns=["image_id", "path", "true", "predicted", "probability", "heatmap"]
    )
    by_id = {r.image_id: r for r in results}
    for image_id in report.misclassified:
        r = by_id[image_id]
        heatmap = report.figures.get(f"heatmap/{image_id}")
        table.add_data(
            image_id,
            r.path,
            label_name(r, CLASSES),
            CLASSES[r.predicted],
            float(r.probs.max()),
            wandb.Image(str(heatmap)) if heatmap else None,
        )
    rows[f"{prefix}/misclassified"] = table
    run.log(rows)
