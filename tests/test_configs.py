"""Every experiment and sweep config composes, and what it configures can be built."""

from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution

from breastnet.data.datamodule import BreastDataModule
from breastnet.inference.models import build_image_model
from breastnet.models.image_classifier import ImageClassifier
from breastnet.models.patch_classifier import PatchClassifier

from conftest import CONF, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))


def compose_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    """The composed config (with its hydra node, as a run sees it), paths in tmp_path."""
    return compose_config(tmp_path, "patch_model.net.weights=none", *overrides, keep_hydra=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_builds(
    experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """Data, patch model and image model build from each experiment, with no data on disk."""
    absent = tmp_path / "absent"
    monkeypatch.setenv("BREASTNET_DATA", str(absent))
    monkeypatch.setenv("BREASTNET_BACH_DEV", str(absent))
    cfg = compose_cfg(tmp_path, f"experiment={experiment}")
    assert isinstance(instantiate(cfg.data), BreastDataModule)
    assert not (tmp_path / "work").exists()  # building the DataModule reads and writes nothing
    assert isinstance(instantiate(cfg.patch_model), PatchClassifier)
    assert isinstance(build_image_model(cfg, feature_dim=16), ImageClassifier)


def _optuna_trials(params: list[str]) -> list[list[str]]:
    """Two trials at the ends of an Optuna search space: first choices and lower bounds, then
    last choices and upper bounds (fixed parameters in both)."""
    space, fixed = create_params_from_overrides(params)

    def end(dist: object, last: bool) -> object:
        if isinstance(dist, CategoricalDistribution):
            return dist.choices[-1 if last else 0]
        return dist.high if last else dist.low

    return [
        [f"{k}={end(d, last)}" for k, d in space.items()] + [f"{k}={v}" for k, v in fixed.items()]
        for last in (False, True)
    ]


@pytest.mark.parametrize("search", SEARCHES)
def test_search_jobs_compose(search: str, tmp_path: Path, one_thread: None) -> None:
    """Each job of a grid (each end of an Optuna space) composes and builds its image model,
    with the values the sweeper gives it; on top of an experiment too."""
    cfg = compose_cfg(tmp_path, f"hparams_search={search}")
    assert cfg.optimized_metric == "image/val_acc_best"
    assert list(cfg.stages) == ["image", "evaluate"]
    sweeper = cfg.hydra.sweeper
    params = [f"{k}={v}" for k, v in sweeper.params.items()]
    if "optuna" in sweeper._target_:
        assert sweeper.direction == "maximize" and sweeper.n_jobs == 1
        assert sweeper.sampler.seed is not None
        # with one trial per batch, any rate below 1.0 ends the study at the first failure
        assert sweeper.max_failure_rate == 1.0
        jobs = _optuna_trials(params)
    else:
        assert sweeper.max_batch_size is None  # one batch: a failed job does not stop the rest
        parsed = OverridesParser.create().parse_overrides(params)
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
        assert len(jobs) == 6  # 3 aggregators x 2 learning rates
    for job in jobs:
        job_cfg = compose_cfg(tmp_path, f"hparams_search={search}", "experiment=demo", *job)
        settings = dict(o.split("=", 1) for o in job)
        assert job_cfg.hydra.runtime.choices.image_model == settings["image_model"]
        for key, value in settings.items():
            if key.startswith("image_model."):
                assert str(OmegaConf.select(job_cfg, key)) == str(value)
        assert isinstance(build_image_model(job_cfg, feature_dim=16), ImageClassifier)


def test_a_missing_optimized_metric_raises_with_what_there_is() -> None:
    from breastnet.cli import optimized
    from breastnet.errors import ConfigError

    assert optimized({"image/val_acc_best": 0.75}, "image/val_acc_best") == 0.75
    assert optimized({"image/val_acc_best": 0.75}, None) is None
    with pytest.raises(ConfigError, match="'image/val_acc'.*image/val_acc_best"):
        optimized({"image/val_acc_best": 0.75}, "image/val_acc")
