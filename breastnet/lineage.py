"""Artifact lineage: where each artifact of a config lives in ``work_dir``, and what keys it.

Every key is a short hash of the config subtree that shapes the artifact plus the keys of its
inputs, computed from the config and the data set's index alone (no DataModule, no model):

    index    <- data_dir, labels_csv
    split    <- index (data fingerprint), ratios/folds or the fixed split (eva, a split file's
                content), val share, split seed, source grouping
    inner    <- split, inner fold k of K (the out-of-fold patch models)
    stain    <- stain settings, the reference (auto: the data fingerprint; train: the split;
                a file: its sha1)
    cache    <- index key, stain, tiling (pixel size and fit rule when not the defaults)
    patch    <- cache, split (or inner split), augmentation, global batch, patch model,
                training settings, seed
    features <- patch, TTA; out-of-fold: the number of inner patch models
    image    <- features (end to end: patch), image model, image stage settings, seed
    report   <- image, evaluated split

Placement (devices, strategy, nodes) never enters a key: one and eight GPUs with the same
global ``data.batch_size`` train the same model and share its artifacts.
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from breastnet.artifacts import config_hash
from breastnet.data import bach
from breastnet.data.bach import IndexEntry
from breastnet.data.resolution import BACH_MPP
from breastnet.data.splits import SplitSpec, inner_name, split_name

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
STAIN_KEYS = ("method", "solver", "luminosity_threshold", "angular_percentile")
# image-stage keys of the out-of-fold features (the features key holds them).
OOF_KEYS = ("train_features", "oof_folds")
# stain.reference values that pick an image of the data: any (`auto`) or the training side's.
PICKED_REFERENCES = ("auto", "train")


def container(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (for hashing and saving)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def training_settings(trainer_cfg: Any) -> dict:
    """The trainer settings that shape a model (epochs, precision, clipping...)."""
    return {k: v for k, v in container(trainer_cfg).items() if k not in PLACEMENT_KEYS}


def index_key(
    data_dir: str | Path, labels_csv: str | None, label_map: Mapping[str, str] | None = None
) -> str:
    """Key of one data set: its resolved folder and label file (several share a work_dir),
    and the label map when there is one (keys made before label maps stay valid)."""
    folder = Path(data_dir).expanduser().resolve()
    labels = str(Path(labels_csv).expanduser().resolve()) if labels_csv else None
    key: dict[str, Any] = {"data_dir": str(folder), "labels_csv": labels}
    if label_map:
        key["label_map"] = container(label_map)
    return config_hash(key)


def index_path(
    work_dir: Path,
    data_dir: str | Path,
    labels_csv: str | None,
    label_map: Mapping[str, str] | None = None,
) -> Path:
    """``work_dir/index/<data set key>.csv``."""
    return Path(work_dir) / "index" / f"{index_key(data_dir, labels_csv, label_map)}.csv"


def stain_settings(stain: Any, entries: list[IndexEntry], split: str) -> dict:
    """What identifies a fitted Macenko reference (``method: none``: no stain work); ``split``
    is the split file's stem, which a reference picked from the training side depends on."""
    if stain["method"] == "none":
        return {"method": "none"}
    if stain["method"] != "macenko":
        raise ValueError(f"stain.method must be macenko or none, got {stain['method']!r}")
    settings = {k: stain[k] for k in STAIN_KEYS}
    if stain["reference"] == "auto":
        settings["reference"] = "auto:" + bach.data_fingerprint(entries)
    elif stain["reference"] == "train":
        settings["reference"] = "train:" + split
    else:
        path = Path(stain["reference"]).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"stain.reference={path} does not exist")
        settings["reference"] = hashlib.sha1(path.read_bytes()).hexdigest()
    return settings


def cache_dir(work_dir: Path, data: Mapping[str, Any], stain: dict) -> Path:
    """``work_dir/cache/<key>``: the data set (``data`` is ``cfg.data`` or the DataModule's
    settings), its tiling and its stain reference (``stain_settings``)."""
    tiling = {k: data[k] for k in ("tile_size", "stride", "patch_size")}
    # Pixel size and fit rule enter only when not BACH's and today's: every work dir made
    # before they existed keeps its cache and model keys (as oof_folds in the features key).
    if data["mpp"] != BACH_MPP:
        tiling["mpp"] = data["mpp"]
    if data["fit"] != "trim":
        tiling["fit"] = data["fit"]
    key = config_hash(
        {"data": index_key(data["data_dir"], data["labels_csv"]), "tiling": tiling, "stain": stain}
    )
    return Path(work_dir) / "cache" / key


def features_key(patch: str, tta: bool, oof_folds: int | None) -> str:
    """Key of the features of patch model ``patch`` (with the out-of-fold models' number)."""
    settings: dict[str, Any] = {"patch": patch, "tta": tta}
    if oof_folds:  # in-sample features keep the key they had before oof existed
        settings["oof_folds"] = oof_folds
    return config_hash(settings)


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
        data = self.cfg.data
        return index_path(self.work_dir, data.data_dir, data.labels_csv, data.get("label_map"))

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
        name = split_name(self.split_spec, bach.data_fingerprint(self.entries))
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

    @cached_property
    def patch(self) -> Path:
        cfg = self.cfg
        key = config_hash(
            {
                "cache": self.cache.name,
                "split": self.split.stem,
                "augment": container(cfg.augment),
                "batch": {k: cfg.data[k] for k in ("batch_size", "min_tissue")},
                "patch_model": container(cfg.patch_model),
                "trainer": training_settings(cfg.trainer),
                "seed": cfg.seed,
            }
        )
        return self.work_dir / "patch" / key

    @cached_property
    def features(self) -> Path:
        key = features_key(self.patch.name, self.cfg.features.tta, self.oof_folds)
        return self.work_dir / "features" / f"{key}.pt"

    @cached_property
    def image(self) -> Path:
        cfg = self.cfg
        upstream = self.patch.name if cfg.image.end_to_end else self.features.stem
        trainer = training_settings(cfg.trainer)
        trainer.pop("max_epochs", None)  # image.max_epochs replaces it
        stage = {k: v for k, v in container(cfg.image).items() if k not in OOF_KEYS}
        key = config_hash(
            {
                "upstream": upstream,
                "image_model": container(cfg.image_model),
                "image": stage,  # out-of-fold settings: in the features key already
                "trainer": trainer,
                "seed": cfg.seed,
            }
        )
        return self.work_dir / "image" / key

    def report(self, split: str) -> Path:
        """``work_dir/reports/<hash>`` of the image model evaluated on ``split``."""
        return self.work_dir / "reports" / config_hash({"image": self.image.name, "split": split})

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
        }
