"""``python -m breastnet``: compose the config with Hydra, then run the chosen stages in order."""

import importlib
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from breastnet import distributed, tracking
from breastnet.artifacts import write_json

log = logging.getLogger(__name__)

# The repository's conf/ (breastnet is installed editable, as DESIGN.md says).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# Pipeline order; a stage is the module breastnet.stages.<name> with `run(cfg) -> dict`.
PIPELINE = ("prepare", "patch", "features", "image", "evaluate", "predict")


def run_stages(cfg: DictConfig) -> dict[str, float]:
    """Run ``cfg.stages`` in pipeline order on every rank; returns every stage's metrics
    (also into the W&B summary, from rank 0).

    Each stage is seeded with ``seed`` + its place in the pipeline, so a stage run alone draws
    what it draws inside the whole pipeline; every rank waits for the others after each stage.
    """
    unknown = [s for s in cfg.stages if s not in PIPELINE]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(PIPELINE)}")
    distributed.launch(cfg)
    metrics: dict[str, float] = {}
    for name in (s for s in PIPELINE if s in cfg.stages):
        try:
            stage = importlib.import_module(f"breastnet.stages.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"breastnet.stages.{name}":
                raise
            raise ValueError(f"stage {name!r} is not available in this version") from e
        log.info("stage %s", name)
        pl.seed_everything(cfg.seed + PIPELINE.index(name), workers=True, verbose=False)
        returned = stage.run(cfg)
        if distributed.rank() == 0:
            tracking.log_summary(cfg, returned)
        metrics |= returned
        distributed.barrier()
    if distributed.rank() == 0:
        for key, value in metrics.items():
            log.info("%s: %s", key, value)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Entry point: metrics go to the run dir's metrics.json and, as
    ``cfg.optimized_metric``, to Hydra sweepers."""
    try:
        metrics = run_stages(cfg)
    except Exception:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # Hydra shows a single run's error itself
            log.exception("job failed")  # into the job's log, which breastnet.summary shows
        raise
    finally:
        tracking.finish()  # one W&B run per job, also for sweep jobs sharing this process
    if distributed.rank() == 0:
        write_json(Path(HydraConfig.get().runtime.output_dir) / "metrics.json", metrics)
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None
