"""A mistyped setting is one error naming the nearest known keys, before Hydra composes.

Hydra answers ``data.tile_sise=64`` with "To append to your config use +data.tile_sise=64",
and the ``+`` form then fails later with a raw ``TypeError`` from the object it builds. Here
each override's key is looked up in the config its group choices compose (``data=...``,
``experiment=...``), and an unknown one, or a ``+`` key that the node's ``_target_`` takes no
argument for, stops the run with the keys it most likely meant (difflib).
"""

import difflib
import inspect
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from breastnet.errors import ConfigError

_NEAREST = 3


def _nearest(name: str, known: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(name, known, n=_NEAREST, cutoff=0.6)


def _takes(target: str, name: str) -> list[str] | None:
    """The parameters of ``target`` when it takes no ``name`` (None: it does, or it cannot
    be inspected, which the run itself will then report)."""
    from hydra.utils import get_object

    try:
        parameters = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    if name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    return [p for p in parameters if p != "self"]


def unknown_key(cfg: DictConfig, key: str, add: bool = False) -> str | None:
    """Why ``key`` (``a.b.c``) is no setting of ``cfg``, with the nearest known keys; None
    when it is one (or is added, ``add``, where nothing says it cannot be)."""
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None  # inside a list or a value: OmegaConf judges that itself
        parent = ".".join(parts[:depth])
        where = parent or "the config"
        prefix = f"{parent}." if parent else ""
        if part in node.keys():  # noqa: SIM118 (`in node` is False for a ??? value)
            node = node._get_node(part)
            continue
        if add:
            target = node.get("_target_") if depth == len(parts) - 1 else None
            known = _takes(target, part) if target else None
            if known is None:
                return None
            near = [prefix + n for n in _nearest(part, known)]
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            return f"+{key}: {target} takes no argument {part!r}{hint}"
        known = [str(k) for k in node]
        near = [prefix + n for n in _nearest(part, known)]
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        listed = ", ".join(sorted(known))
        return f"{key}: {where} has no key {part!r}; {hint}(its keys: {listed})"
    return None


def check_overrides(args: Sequence[str], conf_dir: str, config_name: str = "config") -> None:
    """Fail on an override whose key the composed config does not have.

    Group choices (``data=synthetic``, ``+experiment=demo``; the first of a sweep) are
    composed first, so the keys checked are those of the groups chosen. Anything Hydra
    cannot parse or compose is left to Hydra, which reports it itself.

    Raises:
        ConfigError: naming the key and the nearest known ones.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(given)
    except Exception:  # a malformed override: Hydra's own message says what is wrong
        return
    choices, settings = [], []
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or o.package is not None or key.split(".")[0] == "hydra":
            continue
        if "/" in key or (Path(conf_dir) / key).is_dir():
            value = (
                next(o.sweep_string_iterator())
                if o.is_sweep_override()
                else o.get_value_element_as_str()
            )
            choices.append(f"{'+' if o.is_add() else ''}{key}={value}")
        else:
            settings.append(o)
    if not settings:
        return
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
            cfg = compose(config_name, overrides=choices)
    except Exception:  # an unknown group option or the like: Hydra reports it
        return
    for o in settings:
        add = o.is_add() or o.is_force_add()
        if problem := unknown_key(cfg, o.key_or_group, add):
            raise ConfigError(problem)
