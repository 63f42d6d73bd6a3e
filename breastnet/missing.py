"""What a missing artifact's message adds: the nearest artifact of that stage in ``work_dir``
and the override that reaches it.

A setting that enters a key (``debug=default``'s batch limits, a learning rate, the tiling)
moves every artifact after it to a new key, so "features/<key> not found" reads as if
nothing had been built when a model of other settings is right there. The artifacts of that
stage are ranked by how few settings differ from this run's; the message's first line gives
the overrides that reach the nearest, then at most ``SHOWN - 1`` others follow.
"""

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from breastnet.artifacts import container
from breastnet.data.feature_store import FeatureStore
from breastnet.lineage import OOF_KEYS, PLACEMENT_KEYS, features_key

# Top-level settings that key no artifact (where things go, what runs, what is reported).
_UNKEYED = frozenset(
    {"paths", "hydra", "stages", "predict", "evaluate", "logger", "callbacks", "tags"}
    | {"run_group", "optimized_metric", "distributed", "run", "sweep", "job", "audit"}
)
# Settings inside keyed groups that still key nothing: where a run executes and logs, and
# how fast it reads (``breastnet.lineage``).
_UNKEYED_SETTINGS = frozenset(
    {f"trainer.{k}" for k in PLACEMENT_KEYS}
    | {"data.work_dir", "data.num_workers", "data.prepare_workers", "data.pin_memory"}
    | {"data.persistent_workers", "features.batch_size", "features.images_per_batch"}
)
# What the patch models and their features do not depend on: the image stage's settings
# (but for the out-of-fold ones, which key the features).
_AFTER_FEATURES = ("image_model.", "image.")
SHOWN = 3  # artifacts named in a message, the nearest first
_QUOTED = 4  # differing settings quoted for each of the others


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _settings(cfg: DictConfig | dict, stage: str) -> dict[str, Any]:
    """The flat ``a.b.c -> value`` settings of a config that can enter a ``stage`` key."""
    node = cfg if isinstance(cfg, dict) else {k: container(cfg[k]) for k in cfg}
    flat = _flat({k: v for k, v in node.items() if k not in _UNKEYED})
    before_image = stage in ("patch", "features")
    return {
        k: v
        for k, v in flat.items()
        if ".".join(k.split(".")[:2]) not in _UNKEYED_SETTINGS  # trainer.strategy.* too
        and not (
            before_image
            and k.startswith(_AFTER_FEATURES)
            and k.removeprefix("image.") not in OOF_KEYS
        )
    }


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
        features = cfg.get("features", {})
        key = features_key(patch, features.get("tta", False), oof, features.get("view", "tiles"))
        if FeatureStore.is_complete(work_dir / "features" / key):
            found[key] = cfg
    return found


def _value(value: Any) -> str:
    """A value as a Hydra override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _reach(changed: list[str], mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    """The overrides that turn this run's ``changed`` settings into ``theirs``: ``add
    data.split=eva`` (``+key=value`` for a key this run lacks), ``drop key`` for one it has
    and they do not."""
    sets = [f"{'' if k in mine else '+'}{k}={_value(theirs[k])}" for k in changed if k in theirs]
    drops = [k for k in changed if k not in theirs]
    said = [f"add {' '.join(sets)}"] if sets else []
    if drops:
        said.append(f"drop {', '.join(drops)} (or add {' '.join(f'~{k}' for k in drops)})")
    return "; ".join(said)


def other_keys(cfg: DictConfig, stage: str, missing: Path) -> str:
    """The text a "not found" message ends with: the ``stage`` artifact of ``work_dir``
    nearest to this run (fewest differing settings) and the overrides that reach it on the
    first line, then up to ``SHOWN - 1`` others with what differs; "" when there are none.
    Placement settings (devices, ``default_root_dir``, logging) key nothing and are never
    named."""
    work_dir = Path(cfg.data.work_dir).expanduser().resolve()
    others = {k: v for k, v in _saved_configs(work_dir, stage).items() if k not in str(missing)}
    if not others:
        return ""
    mine = _settings(cfg, stage)
    differing = {}
    for key, saved in others.items():
        theirs = _settings(saved, stage)
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        differing[key] = (changed, theirs)
    ranked = sorted(differing, key=lambda k: (len(differing[k][0]), k))
    nearest = ranked[0]
    changed, theirs = differing[nearest]
    if changed:
        away = f"{len(changed)} setting{'s' if len(changed) > 1 else ''} away"
        reach = _reach(changed, mine, theirs)
    else:  # the data or breastnet's artifact format differ, not a setting
        away, reach = "the same settings", "the data or the artifact format differ"
    lines = [f"; the nearest, {work_dir / stage / nearest} ({away}): {reach}"]
    for key in ranked[1:SHOWN]:
        changed, theirs = differing[key]
        quoted = ", ".join(f"{k}={_value(theirs.get(k))}" for k in changed[:_QUOTED])
        more = f" and {len(changed) - _QUOTED} more" if len(changed) > _QUOTED else ""
        lines.append(f"  also {key}: {len(changed)} away ({quoted}{more})")
    if len(ranked) > SHOWN:
        lines.append(f"  and {len(ranked) - SHOWN} farther in {work_dir / stage}")
    return "\n".join(lines)
