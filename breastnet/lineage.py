"""Artifact lineage: where each artifact of a config lives in ``work_dir``, and what keys it.

Every key is a short hash of the config subtree that shapes the artifact plus the keys of its
inputs, computed from the config and the data set's index alone (no DataModule, no model),
salted with ``FORMAT`` (bumped when what an artifact holds changes, so no old one is reused):

    index    <- data_dir, labels_csv, label_map, and what makes a file usable: the smallest
                size (a tile under fit=trim, else 1 px), mpp, skip_bad
    split    <- index (data fingerprint), ratios/folds or the fixed split (eva: its BACH
                names; a split file's content), val share, split seed, the resolved groups
    inner    <- split, inner fold k of K (the out-of-fold patch models)
    stain    <- stain settings, the reference (auto: the images' contents, not their labels;
                train: the split; a file: its sha1)
    cache    <- index key, stain, tiling (pixel size and fit rule when not the defaults)
    patch    <- cache, split (or inner split), augmentation, global batch, patch model
                (its weights file by content hash), training settings, seed; a frozen
                encoder: cache, network and precision alone (every split and every
                labelling shares its features: the store holds no label);
                ``patch.refit``: the model chosen on val (those keys), refitted
    features <- patch, TTA; out-of-fold: the number of inner patch models
    image    <- features (end to end: patch), image model, image stage settings, seed;
                after a frozen encoder also the split
    report   <- image, evaluated split
    predict  <- image, predict.input (resolved), predict.fit, predict.mpp (its resume parts);
                an ensemble's: every member's predict key

docs/architecture.md, "Artifact keys", has the table of what moves which key.

Placement (devices, strategy, nodes) never enters a key: one and eight GPUs with the same
global ``data.batch_size`` train the same model and share its artifacts.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from breastnet.artifacts import artifact_key, container
from breastnet.data import bach
from breastnet.data.bach import IndexEntry
from breastnet.data.keys import cache_dir, index_path, stain_settings
from breastnet.data.splits import SplitSpec, inner_name, split_name
from breastnet.models.weights import weights_fingerprint

# Trainer keys that say where a run executes, not what it learns: left out of model keys.
PLACEMENT_KEYS = frozenset(
    {
        "_target_",
        "accelerator",
        "devices",
        "num_nodes",
        "strategy",
        "sync_batchnorm",
        "default_root_dir",
        "log_every_n_steps",
        "enable_progress_bar",
        "enable_model_summary",
    }
)
# Network settings that change only what trains (a frozen encoder's key leaves them out).
TRAINING_NET_KEYS = ("freeze_bn", "train_from", "train_blocks")
# image-stage keys of the out-of-fold features (the features key holds them).
OOF_KEYS = ("train_features", "oof_folds")


def training_settings(trainer_cfg: Any) -> dict:
    """The trainer settings that shape a model (epochs, precision, clipping...)."""
    return {k: v for k, v in container(trainer_cfg).items() if k not in PLACEMENT_KEYS}


def patch_model_settings(patch_model: Any) -> dict:
    """The patch model's settings as a key sees them: a weights file by its content hash, not
    its path (a copy elsewhere keeps the key, another file under the same name does not);
    the untouched defaults ``freeze`` and ``layer_decay`` left out, as before they existed."""
    settings = container(patch_model)
    settings["net"]["weights"] = weights_fingerprint(settings["net"].get("weights"))
    for key in ("freeze", "layer_decay"):
        if not settings.get(key):
            settings.pop(key, None)
    return settings


def features_key(patch: str, tta: bool, oof_folds: int | None, view: str = "tiles") -> str:
    """Key of the features of patch model ``patch`` (with the out-of-fold models' number and
    ``features.view``)."""
    settings: dict[str, Any] = {"patch": patch, "tta": tta}
    if oof_folds:  # in-sample features keep the key they had before oof existed
        settings["oof_folds"] = oof_folds
    if view != "tiles":  # tile features keep the key they had before views existed
        settings["view"] = view
    return artifact_key(settings)


@dataclass(frozen=True)
class Lineage:
    """Every artifact path of one composed config (``cfg.data`` etc.); with ``inner`` (k, K),
    those of out-of-fold patch model k of K (its split and patch model)."""

    cfg: DictConfig
    inner: tuple[int, int] | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.cfg.data.work_dir).expanduser().resolve()

    @property
    def index(self) -> Path:
        return index_path(self.work_dir, self.cfg.data)

    @cached_property
    def entries(self) -> list[IndexEntry]:
        """The data set's index, as the prepare stage wrote it."""
        if not self.index.is_file():
            raise FileNotFoundError(
                f"{self.index} not found for data_dir={self.cfg.data.data_dir}: run the "
                "prepare stage first (python -m breastnet 'stages=[prepare]')"
            )
        return bach.read_index(self.index)

    @cached_property
    def outer_split(self) -> Path:
        """The split file of ``data.split``/``data.folds`` (the one the report scores)."""
        name = split_name(self.split_spec, self.entries)
        return self.work_dir / "splits" / f"{name}.json"

    @cached_property
    def split_spec(self) -> SplitSpec:
        """The settings of ``outer_split``."""
        return SplitSpec.from_data(container(self.cfg.data))

    @cached_property
    def split(self) -> Path:
        """The split this lineage's patch model trains on: the outer one or an inner one."""
        if self.inner is None:
            return self.outer_split
        return self.outer_split.with_name(f"{inner_name(self.outer_split.stem, *self.inner)}.json")

    @property
    def oof_folds(self) -> int | None:
        """K when the image model trains on out-of-fold features, else None."""
        settings = self.cfg.image
        if settings.train_features not in ("in_sample", "oof"):
            raise ValueError(
                f"image.train_features must be in_sample or oof, got {settings.train_features!r}"
            )
        return settings.oof_folds if settings.train_features == "oof" else None

    def inner_models(self) -> list["Lineage"]:
        """The lineages of the K out-of-fold patch models (none for in-sample features)."""
        k = self.oof_folds
        return [Lineage(self.cfg, (i, k)) for i in range(k)] if k else []

    @cached_property
    def stain(self) -> dict:
        return stain_settings(self.cfg.data.stain, self.entries, self.outer_split.stem)

    @cached_property
    def cache(self) -> Path:
        return cache_dir(self.work_dir, self.cfg.data, self.stain)

    @property
    def frozen(self) -> bool:
        """Whether the patch network is a fixed encoder (``patch_model.freeze``): no patch
        training, so nothing of the training settings shapes its features."""
        return bool(self.cfg.patch_model.get("freeze", False))

    @property
    def refit(self) -> bool:
        """Whether the patch model is retrained on train + val after model selection
        (``patch.refit``; not the out-of-fold models, nor a frozen encoder)."""
        return bool(self.cfg.patch.get("refit")) and self.inner is None and not self.frozen

    @cached_property
    def patch(self) -> Path:
        """``work_dir/patch/<key>``: the patch model that embeds the images: ``selection``, or
        with ``patch.refit`` its refit on train + val for as many epochs as it chose."""
        if not self.refit:
            return self.selection
        return self.work_dir / "patch" / artifact_key({"refit": self.selection.name})

    @cached_property
    def selection(self) -> Path:
        """``work_dir/patch/<key>``: the patch model chosen on val (a run with and without
        ``patch.refit`` shares it); for a frozen encoder only the key (no checkpoint is
        written), of the cache and network alone."""
        cfg = self.cfg
        model = patch_model_settings(cfg.patch_model)
        if self.frozen:  # what trains and how is moot, and so is the split: every image is
            # embedded alike, so the folds and seeds of a sweep share one set of features
            net = {k: v for k, v in model["net"].items() if k not in TRAINING_NET_KEYS}
            precision = str(cfg.trainer.precision)  # bf16 and fp32 features differ
            settings = {"cache": self.cache.name, "encoder": net, "precision": precision}
            return self.work_dir / "patch" / artifact_key(settings)
        found = artifact_key(
            {
                "cache": self.cache.name,
                "split": self.split.stem,
                "augment": container(cfg.data.augment),  # what the DataModule applies
                "batch": {k: cfg.data[k] for k in ("batch_size", "min_tissue")},
                "patch_model": model,
                "trainer": training_settings(cfg.trainer),
                # early stopping; refit: a model of its own, after this one
                "patch": {k: v for k, v in container(cfg.patch).items() if k != "refit"},
                "seed": cfg.seed,
            }
        )
        return self.work_dir / "patch" / found

    @cached_property
    def features(self) -> Path:
        """``work_dir/features/<key>/``: the features store (``breastnet.data.feature_store``)."""
        settings = self.cfg.features
        key = features_key(self.patch.name, settings.tta, self.oof_folds, settings.view)
        return self.work_dir / "features" / key

    @cached_property
    def image(self) -> Path:
        cfg = self.cfg
        upstream = self.patch.name if cfg.image.end_to_end else self.features.stem
        trainer = training_settings(cfg.trainer)
        trainer.pop("max_epochs", None)  # image.max_epochs replaces it
        stage = {k: v for k, v in container(cfg.image).items() if k not in OOF_KEYS}
        settings = {
            "upstream": upstream,
            "image_model": container(cfg.image_model),
            "image": stage,  # out-of-fold settings: in the features key already
            "trainer": trainer,
            "seed": cfg.seed,
        }
        if self.frozen:  # a trained patch model's key holds its split; a frozen one's does not
            settings["split"] = self.split.stem
        found = artifact_key(settings)
        return self.work_dir / "image" / found

    def report(self, split: str) -> Path:
        """``work_dir/reports/<hash>`` of the image model evaluated on ``split``."""
        return self.work_dir / "reports" / artifact_key({"image": self.image.name, "split": split})

    def predict_parts(self) -> Path:
        """Where an interrupted predict keeps its per-image outputs to resume from: keyed by
        the image model, the input (another folder never reuses them for equal ids), and the
        tiling settings of predict."""
        settings = self.cfg.predict
        source = Path(settings.input).expanduser().resolve() if settings.input else None
        found = artifact_key({"input": str(source), "fit": settings.fit, "mpp": settings.mpp})
        return Path(settings.output_dir) / ".parts" / f"{self.image.name}-{found}"

    def keys(self) -> dict[str, str]:
        """Each artifact's key by name (what the tests and ``--info`` compare)."""
        return {
            "index": self.index.stem,
            "split": self.split.stem,
            "cache": self.cache.name,
            "patch": self.patch.name,
            "features": self.features.stem,
            "image": self.image.name,
            "report": self.report(self.cfg.evaluate.split).name,
            "predict": self.predict_parts().name,
        }


def ensemble_parts(members: Sequence[Lineage]) -> Path:
    """Where an ensemble's predict keeps its resume parts: keyed by every member's predict key
    (its image model and predict's input settings), never one model's parts folder."""
    key = artifact_key({"members": [m.predict_parts().name for m in members]})
    return members[0].predict_parts().with_name(f"ensemble-{key}")
