"""The trained models of one config: checkpoints, patch and image models, their embedder.

Everything comes from ``work_dir`` as the earlier stages left it (``breastnet.lineage`` says
where); predict asks for the whole trained pipeline and quotes the command that trains it.
"""

import shlex
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from breastnet.artifacts import container, finished_metrics
from breastnet.data.feature_store import FeatureStore
from breastnet.errors import ConfigError
from breastnet.inference.embedder import Embedder, view_settings
from breastnet.lineage import Lineage
from breastnet.missing import other_keys
from breastnet.models.backbone import PatchNet
from breastnet.models.image_classifier import ImageClassifier
from breastnet.models.patch_classifier import PatchClassifier

# Overrides that say what to predict, not which model: left out of the training command.
_PREDICT_ONLY = ("stages", "predict.", "paths.output_dir", "hydra.")


def _best_checkpoint(cfg: DictConfig, out_dir: Path, stage: str) -> Path:
    if finished_metrics(out_dir) is None:
        raise FileNotFoundError(
            f"no finished {stage} model in {out_dir}: run the {stage} stage first"
            + other_keys(cfg, stage, out_dir)
        )
    return out_dir / "best.ckpt"


def load_patch_model(cfg: DictConfig, lineage: Lineage) -> PatchClassifier:
    """The best checkpoint of the patch stage for this config, on the CPU, in eval mode; a
    frozen encoder (``patch_model.freeze``) as its weights file gives it."""
    if lineage.frozen:
        return instantiate(cfg.patch_model).eval()
    checkpoint = _best_checkpoint(cfg, lineage.patch, "patch")
    net = instantiate(cfg.patch_model.net, weights="none")  # the checkpoint holds the weights
    model = PatchClassifier.load_from_checkpoint(
        checkpoint, net=net, map_location="cpu", weights_only=False
    )
    return model.eval()


def build_image_model(
    cfg: DictConfig, feature_dim: int, backbone: PatchNet | None = None
) -> ImageClassifier:
    """The ImageClassifier of ``cfg.image_model`` for features of width ``feature_dim``."""
    settings = container(cfg.image_model)
    if "feature_dim" in settings["aggregator"]:  # the parameter-free ones read probabilities
        settings["aggregator"]["feature_dim"] = feature_dim
    return instantiate(OmegaConf.create(settings), backbone=backbone)


def load_image_model(cfg: DictConfig, lineage: Lineage) -> ImageClassifier:
    """The best checkpoint of the image stage for this config, on the CPU, in eval mode."""
    checkpoint = _best_checkpoint(cfg, lineage.image, "image")
    # End to end, the CNN is part of the model and its width sizes the aggregator; else the
    # features store's width does (no need to build a ViT-g for its width).
    if cfg.image.end_to_end:
        net: PatchNet | None = instantiate(cfg.patch_model.net, weights="none")
        width = net.feature_dim
    else:
        net, width = None, FeatureStore(lineage.features).width
    model = build_image_model(cfg, width, net)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    return model.eval()


def used_checkpoints(lineage: Lineage, image_model: ImageClassifier) -> list[Path]:
    """The checkpoints behind the image model's outputs, for a report's provenance: the patch
    model's, which embedded the patches (cached features or ``image_embedder``), unless the
    image model has its own CNN (end to end), and the image model's. A frozen encoder's
    weights file counts as its patch model."""
    patch = [] if image_model.backbone is not None else [lineage.patch / "best.ckpt"]
    if lineage.frozen:
        weights = Path(str(lineage.cfg.patch_model.net.weights)).expanduser()
        patch = [weights] if weights.is_file() else []
    return [*patch, lineage.image / "best.ckpt"]


def image_embedder(cfg: DictConfig, lineage: Lineage, image_model: ImageClassifier) -> Embedder:
    """Patches to image probabilities: end to end with the image model's own CNN (single
    views of the tiles, as it learnt), else with the patch model's and the features stage's
    TTA and view settings (the rows the image model learnt from)."""
    chunk = cfg.features.batch_size
    if image_model.backbone is not None:
        return Embedder(image_model.backbone, image_model.aggregator, chunk)
    net = load_patch_model(cfg, lineage).net
    views = view_settings(cfg)
    return Embedder(net, image_model.aggregator, chunk, tta=cfg.features.tta, **views)


def training_command(folds: Sequence[int] = ()) -> str:
    """The command that trains the pipeline predict needs: this run's settings without the
    predict ones (``...`` where Hydra did not compose this run); with ``folds``, the
    multirun that trains those folds of its cross-validation."""
    if HydraConfig.initialized():
        task = HydraConfig.get().overrides.task
        skip = (*_PREDICT_ONLY, "data.fold=") if folds else _PREDICT_ONLY
        kept = [shlex.quote(o) for o in task if not o.lstrip("+~").startswith(skip)]
    else:
        kept = ["<the same experiment= and settings>"]
    if not folds:
        return " ".join(["python -m breastnet", *kept])
    return " ".join(["python -m breastnet -m", *kept, f"data.fold={','.join(map(str, folds))}"])


def is_trained(lineage: Lineage) -> bool:
    """Whether the whole pipeline of this lineage has been trained (its image model)."""
    return lineage.index.is_file() and finished_metrics(lineage.image) is not None


def require_trained(cfg: DictConfig, lineage: Lineage) -> None:
    """Predict needs the whole trained pipeline of these settings, not only prepare's output.

    Raises:
        ConfigError: quoting the command that trains it, with this run's ``experiment=``
            and settings, and the image models of other settings in ``work_dir``.
    """
    if is_trained(lineage):
        return
    others = other_keys(cfg, "image", lineage.image) if lineage.index.is_file() else ""
    raise ConfigError(
        f"predict needs the pipeline trained with these settings, and {lineage.work_dir} has "
        "no trained image model for them. Train it first with the same experiment and "
        f"settings (all stages: prepare, patch, features, image, evaluate):\n  "
        f"{training_command()}\nthen run predict with those settings again{others}."
    )
