"""What a missing artifact's message adds: the other keys of that stage in ``work_dir`` and
the settings that differ from this run's.

A setting that enters a key (``debug=default``'s batch limits, a learning rate, the tiling)
moves every artifact after it to a new key, so "features/<key> not found" reads as if
nothing had been built when a model of other settings is right there.
"""

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from breastnet.artifacts import container
from breastnet.data.feature_store import FeatureStore
from breastnet.lineage import features_key

# Top-level settings that key no artifact (where things go, what runs, what is reported).
_UNKEYED = frozenset(
    {"paths", "hydra", "stages", "predict", "evaluate", "logger", "callbacks", "tags"}
    | {"run_group", "optimized_metric", "distributed", "run", "sweep", "job", "audit"}
)
_SHOWN = 6  # differing settings quoted per key


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _settings(cfg: DictConfig | dict) -> dict[str, Any]:
    """The flat ``a.b.c -> value`` settings of a config that can enter an artifact key."""
    node = cfg if isinstance(cfg, dict) else {k: container(cfg[k]) for k in cfg}
    return _flat({k: v for k, v in node.items() if k not in _UNKEYED})


def _saved_configs(work_dir: Path, stage: str) -> dict[str, dict]:
    """Key -> the resolved config of each finished ``stage`` artifact in ``work_dir`` (patch
    and image models keep theirs; a features file is matched to its patch model's)."""
    models = {}
    folder = work_dir / ("patch" if stage == "features" else stage)
    for saved in sorted(folder.glob("*/config.yaml")):
        models[saved.parent.name] = OmegaConf.to_container(OmegaConf.load(saved))
    if stage != "features":
        return models
    found = {}
    for patch, cfg in models.items():
        image = cfg.get("image", {})
        oof = image.get("oof_folds") if image.get("train_features") == "oof" else None
        key = features_key(patch, cfg.get("features", {}).get("tta", False), oof)
        if FeatureStore.is_complete(work_dir / "features" / key):
            found[key] = cfg
    return found


def other_keys(cfg: DictConfig, stage: str, missing: Path) -> str:
    """The sentence a "not found" message ends with: the other ``stage`` artifacts of
    ``work_dir`` and, for each, the settings it was made with that this run changes; ""
    when there are none."""
    work_dir = Path(cfg.data.work_dir).expanduser().resolve()
    others = {k: v for k, v in _saved_configs(work_dir, stage).items() if k not in str(missing)}
    if not others:
        return ""
    mine = _settings(cfg)
    described = []
    for key, saved in others.items():
        theirs = _settings(saved)
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        shown = ", ".join(f"{k}={theirs.get(k)} (here {mine.get(k)})" for k in changed[:_SHOWN])
        more = f" and {len(changed) - _SHOWN} more" if len(changed) > _SHOWN else ""
        described.append(f"{key} made with {shown or 'the same settings'}{more}")
    return (
        f". {work_dir / stage} holds {stage} of other settings, which key another artifact: "
        + "; ".join(described)
        + ". Run with those settings to use it, or run the earlier stages for these"
    )
