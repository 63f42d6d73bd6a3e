"""``python -m breastnet``: compose the config with Hydra, then run the chosen stages in order."""

import importlib
import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from breastnet import tracking
from breastnet.artifacts import write_json

log = logging.getLogger(__name__)

# The repository's conf/ (breastnet is installed editable, as DESIGN.md says).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# Pipeline order; a stage is the module breastnet.stages.<name> with `run(cfg) -> dict`.
PIPELINE = ("prepare", "patch", "features", "image", "evaluate", "predict")


def run_stages(cfg: DictConfig) -> dict[str, float]:
    """Run ``cfg.stages`` in pipeline order; returns every stage's metrics, merged."""
    unknown = [s for s in cfg.stages if s not in PIPELINE]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(PIPELINE)}")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    metrics: dict[str, float] = {}
    for name in (s for s in PIPELINE if s in cfg.stages):
        try:
            stage = importlib.import_module(f"breastnet.stages.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"breastnet.stages.{name}":
                raise
            raise ValueError(f"stage {name!r} is not available in this version") from e
        log.info("stage %s", name)
        metrics |= stage.run(cfg)
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
    write_json(Path(HydraConfig.get().runtime.output_dir) / "metrics.json", metrics)
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None
