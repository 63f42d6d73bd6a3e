"""``python -m breastnet``: compose the config with Hydra, then run the chosen stages in order.

A user error (bad data, a missing input, a stage run before the one it needs, a mistyped
setting) ends the run with its message and exit status 1; any other exception keeps its
traceback, and ``HYDRA_FULL_ERROR=1`` shows the traceback of both. ``--help`` lists the
stages, the experiments and example commands (``conf/hydra/default.yaml``); torch,
Lightning and the stages are imported only once a run starts, so ``--help`` is quick.
"""

import importlib
import logging
import os
import sys
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from breastnet.errors import ConfigError, is_user_error, unwrap
from breastnet.logs import remove_unused_run_dir, setup_run_logging
from breastnet.summary import sweep_hint
from breastnet.threads import configure_torch, passive_openmp
from breastnet.typos import check_overrides

log = logging.getLogger(__name__)

# The repository's conf/ (breastnet is installed editable: docs/architecture.md).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# Pipeline order; a stage is the module breastnet.stages.<name> with `run(cfg) -> dict`.
PIPELINE = ("prepare", "patch", "features", "image", "evaluate", "predict")


def run_stages(cfg: DictConfig, done: list[str] | None = None) -> dict[str, float]:
    """Run ``cfg.stages`` in pipeline order on every rank; returns every stage's metrics
    (also into the W&B summary, from rank 0); ``done`` gets each stage's name as it ends.

    Each stage is seeded with ``seed`` + its place in the pipeline, so a stage run alone draws
    what it draws inside the whole pipeline; every rank waits for the others after each stage.
    """
    import pytorch_lightning as pl

    from breastnet import distributed, tracking
    from breastnet.models.resolve import resolve_at_startup

    unknown = [s for s in cfg.stages if s not in PIPELINE]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(PIPELINE)}")
    distributed.launch(cfg)
    resolve_at_startup(cfg)  # the weights every stage after prepare keys by: before any stage
    metrics: dict[str, float] = {}
    for name in (s for s in PIPELINE if s in cfg.stages):
        try:
            stage = importlib.import_module(f"breastnet.stages.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"breastnet.stages.{name}":
                raise
            raise ConfigError(f"stage {name!r} is not available in this version") from e
        log.info("stage %s", name)
        pl.seed_everything(cfg.seed + PIPELINE.index(name), workers=True, verbose=False)
        returned = stage.run(cfg)
        # inside the failure broadcast: a W&B error on rank 0 stops every rank at once
        distributed.on_rank_zero(partial(tracking.log_summary, cfg, returned))
        metrics |= returned
        if done is not None:
            done.append(name)
    if distributed.rank() == 0:
        for key, value in metrics.items():
            log.info("%s: %s", key, value)
    return metrics


class JobFailed(CompactHydraException):
    """A sweep job's user error: Hydra prints its message alone when the sweep ends."""


def main() -> float | None:
    """Entry point: a mistyped setting is one message (``breastnet.typos``) before Hydra
    composes, which would advise its ``+`` form; then ``run``; after a multirun, where its
    jobs are and the command that summarises them (also when a job failed)."""
    passive_openmp()  # before torch is imported: waiting threads sleep on a shared machine
    try:
        check_overrides(sys.argv[1:], CONF_DIR)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        return run()
    finally:
        if hint := sweep_hint():
            print(hint, flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def run(cfg: DictConfig) -> float | None:
    """The composed run: metrics go to the run dir's metrics.json and, as
    ``cfg.optimized_metric``, to Hydra sweepers. A single run that fails on a user error
    before any stage ended leaves no run dir behind when it holds nothing but Hydra's files
    and the log (the error was printed)."""
    from breastnet import distributed, tracking
    from breastnet.artifacts import write_json
    from breastnet.quiet import quiet_known_noise

    setup_run_logging()  # Hydra has configured logging by now
    quiet_known_noise(cfg)
    multirun = distributed.in_multirun()
    done: list[str] = []
    try:
        configure_torch()  # before any work: threads sized to the CPUs this job may use
        metrics = run_stages(cfg, done)
    except Exception as e:
        # Hydra's own switch for full tracebacks (it tests for exactly "1").
        if not is_user_error(e) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            if multirun:  # Hydra shows a single run's error itself
                log.exception("job failed")  # into the job's log, which breastnet.summary shows
            raise
        log.error("%s", unwrap(e))  # on the console and in the job's log
        if multirun:  # the other jobs go on; the sweep ends with this message and status 1
            raise JobFailed(str(e)) from e
        if not done and distributed.rank() == 0 and not _run_dir_chosen():
            remove_unused_run_dir(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(1)
    finally:
        tracking.finish()  # one W&B run per job, also for sweep jobs sharing this process
    out = Path(HydraConfig.get().runtime.output_dir) / "metrics.json"
    distributed.on_rank_zero(lambda: write_json(out, metrics))
    return optimized(metrics, cfg.optimized_metric)


def _run_dir_chosen() -> bool:
    """Whether the command line names the run dir (``hydra.run.dir=``): a dir of the user's,
    which may hold earlier runs' logs, is never removed."""
    return any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra)


def optimized(metrics: dict[str, float], name: str | None) -> float | None:
    """The metric a sweeper optimises (None when the run sets none).

    Raises:
        ConfigError: the run's stages did not produce it (a typo, or a stage left out): a
            sweeper would otherwise record None and compare trials on nothing.
    """
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name!r} is not among this run's metrics "
            f"({', '.join(sorted(metrics)) or 'none'}): check its name and cfg.stages"
        )
    return metrics[name]
