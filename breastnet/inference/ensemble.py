"""The models predict runs: one config's, or a cross-validation's K fold models as one.

``predict.ensemble=cv`` with ``data.folds=K`` averages the image probabilities of the models
of ``data.fold=0..K-1`` (``make cv``): each saw (K-1)/K of the images, their mean uses every
image and varies less than any one of them. Each file is tiled once for the members that
share a patch cache (stain reference and tiling), and each member's output is kept apart in
the resume parts, so the mean is taken once every member is done.
"""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.data.store import StainSettings
from breastnet.errors import ConfigError
from breastnet.inference.embedder import MEMBER_KEYS, Embedder, StackedEmbedder, stack, unstack
from breastnet.inference.files import ImageFiles
from breastnet.inference.models import (
    image_embedder,
    is_trained,
    load_image_model,
    require_trained,
    training_command,
    used_checkpoints,
)
from breastnet.inference.runner import predict_images
from breastnet.lineage import Lineage, ensemble_parts
from breastnet.models.image_classifier import ImageClassifier

ENSEMBLES = ("cv",)


@dataclass(frozen=True)
class Member:
    """One trained model of the predictor: its config, artifacts and image model."""

    cfg: DictConfig
    lineage: Lineage
    model: ImageClassifier

    def checkpoints(self) -> list[Path]:
        return used_checkpoints(self.lineage, self.model)

    def embedder(self) -> Embedder:
        return image_embedder(self.cfg, self.lineage, self.model)

    def stain(self) -> StainSettings:
        """The stain reference its training images were normalised to."""
        datamodule = instantiate(self.cfg.data, mode="image")
        datamodule.setup()
        return datamodule.prepared.stain


def member_configs(cfg: DictConfig) -> list[DictConfig]:
    """This config alone, or with ``predict.ensemble=cv`` one per fold of ``data.folds``."""
    ensemble = cfg.predict.get("ensemble")
    if ensemble is None:
        return [cfg]
    if ensemble not in ENSEMBLES:
        raise ConfigError(f"predict.ensemble must be null or one of {ENSEMBLES}, got {ensemble!r}")
    if not cfg.data.get("folds"):
        raise ConfigError(
            "predict.ensemble=cv averages the fold models of a cross-validation: set "
            "data.folds=K as the CV trained them (make cv FOLDS=K)"
        )
    members = []
    for k in range(cfg.data.folds):
        member = copy.deepcopy(cfg)
        member.data.fold = k
        members.append(member)
    return members


def require_folds(lineages: list[Lineage]) -> None:
    """An ensemble needs every fold model trained.

    Raises:
        ConfigError: naming the missing folds and quoting the multirun that trains them.
    """
    missing = [k for k, lineage in enumerate(lineages) if not is_trained(lineage)]
    if not missing:
        return
    folds = len(lineages)
    raise ConfigError(
        f"predict.ensemble=cv averages the {folds} fold models of data.folds={folds}, and "
        f"{lineages[0].work_dir} has no trained image model for fold(s) "
        f"{', '.join(map(str, missing))} with these settings. Train them first with the same "
        f"experiment and settings:\n  {training_command(missing)}\nthen run predict with "
        "predict.ensemble=cv again."
    )


def load_members(cfg: DictConfig) -> list[Member]:
    """The trained models of the predictor, loaded; an untrained one is an error that says
    how to train it."""
    configs = member_configs(cfg)
    lineages = [Lineage(c) for c in configs]
    if len(configs) == 1:
        require_trained(cfg, lineages[0])
    else:
        require_folds(lineages)
    return [
        Member(c, lineage, load_image_model(c, lineage))
        for c, lineage in zip(configs, lineages, strict=True)
    ]


def ensemble_facts(cfg: DictConfig, members: list[Member]) -> dict[str, Any]:
    """What the provenance says of the predictor: nothing for one model."""
    if len(members) == 1:
        return {}
    return {"ensemble": cfg.predict.ensemble, "members": len(members)}


def cache_groups(members: list[Member]) -> list[list[int]]:
    """The members by patch cache (stain reference and tiling), first come first: each
    group's files are tiled once."""
    groups: dict[str, list[int]] = {}
    for i, member in enumerate(members):
        groups.setdefault(member.lineage.cache.name, []).append(i)
    return list(groups.values())


def parts_dir(members: list[Member]) -> Path:
    """Where this predict keeps its per-image resume parts: one model's, or the ensemble's
    (keyed by every member), never the parts of another model in the same output dir."""
    if len(members) == 1:
        return members[0].lineage.predict_parts()
    return ensemble_parts([m.lineage for m in members])


def predict_members(
    cfg: DictConfig, members: list[Member], dataset: ImageFiles
) -> list[dict[str, dict[str, Any]]]:
    """Each member's output of every file of ``dataset`` (normalised to the first member's
    stain reference), by image id, on rank 0; empty dicts on the other ranks."""
    ids, parts = dataset.image_ids, parts_dir(members)
    if len(members) == 1:
        return [predict_images(cfg, members[0].embedder(), dataset, ids, parts, "predict")]
    found: list[dict[str, dict[str, Any]]] = [{} for _ in members]
    for n, group in enumerate(cache_groups(members)):
        files = dataset if n == 0 else dataset.restained(members[group[0]].stain())
        embedder = StackedEmbedder([members[i].embedder() for i in group])
        folds = "-".join(map(str, group))
        outputs = predict_images(cfg, embedder, files, ids, parts / folds, f"predict ({folds})")
        for image_id, output in outputs.items():
            for i, own in zip(group, unstack(output, len(group)), strict=True):
                found[i][image_id] = own
    return found


def mean_output(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """One image's output averaged over the members; a member's error is the image's."""
    if failed := [o for o in outputs if o.get("error")]:
        return failed[0]
    stacked = stack(outputs)
    return stacked | {k: stacked[k].mean(0) for k in MEMBER_KEYS if k in stacked}


def mean_outputs(per_member: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every image's output averaged over the members (``predict_members``'s)."""
    return {i: mean_output([outputs[i] for outputs in per_member]) for i in per_member[0]}
