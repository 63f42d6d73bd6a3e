"""One LightningDataModule for both models: index, split, stain work, tiling and loading.

``prepare_data`` does the long work once (index, split, stain reference, patch cache, all in
``work_dir`` and reused); ``setup`` only reads what it wrote, on every rank.

Modes: ``patch`` yields single patches with their image's label; ``image`` yields all patches
of an image in grid order, padded to the longest image of the batch with a mask;
``features`` yields an image's cached CNN feature sequence (from the features stage).
"""

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from breastnet.artifacts import config_hash, write_json
from breastnet.data import bach
from breastnet.data.bach import IndexEntry
from breastnet.data.splits import SIDES, load_or_make_split
from breastnet.data.stain import MacenkoNormalizer, StainReference, pick_reference
from breastnet.data.store import PatchCache, StainSettings, Tiling
from breastnet.data.transforms import build_transforms

log = logging.getLogger(__name__)

MODES = ("patch", "image", "features")
REFERENCE_DOWNSAMPLE = 4  # picking the reference needs stain matrices, not full resolution


def _to_tensor(patches: np.ndarray) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> uint8 [..., 3, S, S]; models normalise on the device."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(patches, -1, -3)))


class PatchDataset(Dataset):
    """One sample per tissue patch: ``{"x": uint8 [3, S, S], "y", "image_id", "pos"}``."""

    def __init__(
        self,
        cache: PatchCache,
        records: Sequence[dict],
        labels: Mapping[str, int],
        transform: Any,
        min_tissue: float = 0.0,
    ) -> None:
        self.cache, self.labels, self.transform = cache, labels, transform
        self.items = [
            (r["image_id"], k, tuple(r["positions"][k]))
            for r in records
            for k, tissue in enumerate(r["tissue"])
            if tissue >= min_tissue
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image_id, k, pos = self.items[i]
        patch = self.transform(image=np.array(self.cache.load(image_id)[k]))["image"]
        return {
            "x": _to_tensor(patch),
            "y": self.labels[image_id],
            "image_id": image_id,
            "pos": torch.tensor(pos),
        }


class ImageDataset(Dataset):
    """One sample per image: all its patches in row-major grid order with their (row, col)."""

    def __init__(
        self, cache: PatchCache, records: Sequence[dict], labels: Mapping[str, int], transform: Any
    ) -> None:
        self.cache, self.records, self.labels, self.transform = cache, records, labels, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        patches = np.stack(
            [
                self.transform(image=p)["image"]
                for p in np.array(self.cache.load(record["image_id"]))
            ]
        )
        return {
            "x": _to_tensor(patches),
            "y": self.labels[record["image_id"]],
            "image_id": record["image_id"],
            "pos": torch.tensor(record["positions"]),
        }


def pad_collate(samples: list[dict]) -> dict:
    """Batch variable-length sequences: pad every per-patch tensor, ``mask`` marks real patches.

    Patch tensors (``x``, ``probs``) are padded with zeros, positions with -1.
    """
    longest = max(len(s["x"]) for s in samples)
    batch: dict[str, Any] = {"mask": torch.zeros((len(samples), longest), dtype=torch.bool)}
    for key in (k for k in ("x", "pos", "probs") if k in samples[0]):
        first = samples[0][key]
        batch[key] = torch.full(
            (len(samples), longest, *first.shape[1:]), -1 if key == "pos" else 0, dtype=first.dtype
        )
    for b, s in enumerate(samples):
        n = len(s["x"])
        batch["mask"][b, :n] = True
        for key in ("x", "pos", "probs"):
            if key in batch:
                batch[key][b, :n] = s[key]
    batch["y"] = torch.tensor([s["y"] for s in samples])
    batch["image_id"] = [s["image_id"] for s in samples]
    return batch


class FeatureDataset(Dataset):
    """One sample per image: its cached CNN feature sequence and patch probabilities."""

    def __init__(self, images: Mapping[str, dict], image_ids: Sequence[str]) -> None:
        self.images, self.image_ids = images, list(image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict:
        image = self.images[self.image_ids[i]]
        return {
            "x": image["features"],  # N x D
            "probs": image["probs"],  # N x C
            "pos": image["positions"],  # N x 2
            "y": image["label"],
            "image_id": self.image_ids[i],
        }


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream.

    albumentations' Compose owns its RNG, which every forked worker would otherwise copy
    verbatim (identical augmentations in every worker). Do not touch OpenCV's or OpenMP's
    thread pools here: in a forked child, after the parent used them, that deadlocks.
    """
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


class EpochShuffle(Sampler[int]):
    """Shuffle, and seed the augmentations, from (seed, epoch) alone.

    Lightning creates (and prefetches from) the train iterator before ``on_train_epoch_start``
    when it resumes, but after it otherwise; seeding here, when the epoch is set, makes a run
    resumed from ``last.ckpt`` draw exactly what an uninterrupted run draws.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, None
        self.generator = torch.Generator()  # DataLoader workers' base seed comes from it
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:  # Lightning sets it again after a resumed prefetch
            return
        self.epoch = epoch
        self.generator.manual_seed(self.seed + epoch)
        if (transform := getattr(self.dataset, "transform", None)) is not None:
            transform.set_random_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[int]:
        order = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.dataset), generator=order).tolist()

    def __len__(self) -> int:
        return len(self.dataset)


class BreastDataModule(pl.LightningDataModule):
    """BACH images -> stain-normalised patch cache -> patch or image batches."""

    def __init__(
        self,
        data_dir: str,
        work_dir: str,
        stain: Mapping,
        augment: Mapping,
        mode: str = "patch",
        labels_csv: str | None = None,
        split: Sequence[float] = (0.7, 0.2, 0.1),
        folds: int | None = None,
        fold: int = 0,
        seed: int = 2019,
        tile_size: int = 512,
        stride: int = 512,
        patch_size: int = 299,
        min_tissue: float = 0.05,
        skip_bad: bool = False,
        batch_size: int = 32,
        num_workers: int = 2,
        prepare_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        features_path: str | None = None,
    ) -> None:
        """See ``conf/data/bach.yaml`` for what each setting means."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.work_dir = Path(work_dir).expanduser().resolve()
        self.tiling = Tiling(tile_size, stride, patch_size)
        self.batch_size_per_device = batch_size
        self.datasets: dict[str, Dataset] = {}
        self.entries: list[IndexEntry] = []
        self.split: dict[str, list[str]] = {}
        self.split_path: Path | None = None
        self.records: dict[str, dict] = {}
        self.stain = StainSettings()  # the fitted Macenko reference and solver settings
        self.cache: PatchCache | None = None
        self.features: dict | None = None

    @property
    def index_path(self) -> Path:
        return self.work_dir / "index.csv"

    # -- the long work, once ----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Index, split, pick the stain reference and fill the patch cache (all reused)."""
        hp = self.hparams
        previous = bach.read_index(self.index_path) if self.index_path.is_file() else None
        entries = bach.build_index(
            self.data_dir,
            hp.labels_csv,
            min_size=hp.tile_size,
            skip_bad=hp.skip_bad,
            num_workers=hp.prepare_workers,
            previous=previous,
        )
        bach.write_index(self.index_path, entries)
        self._locate(entries, build=True)

    def setup(self, stage: str | None = None) -> None:
        """Read what ``prepare_data`` wrote; build the datasets of each split side."""
        if self.datasets:
            return
        if not self.index_path.is_file():
            raise FileNotFoundError(
                f"{self.index_path} not found: run the prepare stage first "
                "(python -m breastnet 'stages=[prepare]')"
            )
        self._locate(bach.read_index(self.index_path), build=False)
        if self.trainer is not None:
            world = self.trainer.world_size
            if self.hparams.batch_size % world:
                raise ValueError(
                    f"data.batch_size={self.hparams.batch_size} is not divisible by the "
                    f"{world} devices"
                )
            self.batch_size_per_device = self.hparams.batch_size // world
        if self.hparams.mode == "features":  # cached CNN outputs: no patches, no augmentation
            for side in SIDES:
                self.datasets[side] = FeatureDataset(self._features(), self.split[side])
            return
        labels = {e.image_id: e.label_index for e in self.entries}
        augment = self._augment_kwargs()
        for side in SIDES:
            records = [self.records[i] for i in self.split[side] if i in self.records]
            transform = build_transforms(side == "train", **augment)
            if self.hparams.mode == "patch":
                self.datasets[side] = PatchDataset(
                    self.cache, records, labels, transform, self.hparams.min_tissue
                )
            else:
                self.datasets[side] = ImageDataset(self.cache, records, labels, transform)

    def _features(self) -> dict[str, dict]:
        """The features stage's output (``features_path``), loaded once."""
        if self.features is None:
            path = self.hparams.features_path
            if path is None or not Path(path).is_file():
                raise FileNotFoundError(f"features {path} not found: run the features stage first")
            self.features = torch.load(path, weights_only=False)
        return self.features["images"]

    @property
    def feature_dim(self) -> int:
        """Width of the cached feature vectors (2048 for Inception-V3)."""
        return next(iter(self._features().values()))["features"].shape[1]

    def _locate(self, entries: list[IndexEntry], build: bool) -> None:
        """Find (``build``: make) the split, stain reference and cache for these entries."""
        hp = self.hparams
        self.entries = entries
        self.split, self.split_path = load_or_make_split(
            self.work_dir, entries, tuple(hp.split), hp.folds, hp.fold, hp.seed
        )
        reference, reference_key = self._reference(entries, build)
        self.stain = stain = StainSettings(
            reference,
            **{k: hp.stain[k] for k in ("solver", "luminosity_threshold", "angular_percentile")},
        )
        key = config_hash({"tiling": vars(self.tiling), "stain": reference_key})
        self.cache = PatchCache(self.work_dir / "cache" / key)
        usable = [e for e in entries if e.usable]
        if build:
            self.records = self.cache.build(
                usable, self.tiling, stain, hp.prepare_workers, hp.skip_bad
            )
        else:
            self.records = self.cache.records()
            if missing := self.cache.missing(usable):
                raise FileNotFoundError(
                    f"{len(missing)} image(s) missing from the patch cache {self.cache.root} "
                    f"(e.g. {missing[0].path}): run the prepare stage first"
                )
        (log.info if build else log.debug)(
            "data: %d images (%s), split %s, cache %s",
            len(usable),
            ", ".join(f"{s} {len(self.split[s])}" for s in SIDES),
            self.split_path.name,
            self.cache.root,
        )

    def _reference(
        self, entries: list[IndexEntry], build: bool
    ) -> tuple[StainReference | None, dict]:
        """The fitted Macenko reference and the settings that identify it (None: no stain work)."""
        stain = self.hparams.stain
        if stain.method == "none":
            return None, {"method": "none"}
        if stain.method != "macenko":
            raise ValueError(f"stain.method must be macenko or none, got {stain.method!r}")
        settings = {
            "method": "macenko",
            "solver": stain.solver,
            "luminosity_threshold": stain.luminosity_threshold,
            "angular_percentile": stain.angular_percentile,
        }
        if stain.reference == "auto":
            settings["reference"] = "auto:" + bach.data_fingerprint(entries)
        else:
            path = Path(stain.reference).expanduser().resolve()
            settings["reference"] = str(path)
        path = self.work_dir / "stain" / f"{config_hash(settings)}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            return StainReference.from_dict(saved["reference"]), settings | {"sha1": saved["sha1"]}
        if not build:
            raise FileNotFoundError(f"{path} not found: run the prepare stage first")
        source = self._pick_reference(entries) if stain.reference == "auto" else None
        ref_path = Path(source.path if source else settings["reference"])
        image, _ = bach.read_rgb(ref_path)
        normalizer = MacenkoNormalizer(
            solver=stain.solver,
            luminosity_threshold=stain.luminosity_threshold,
            angular_percentile=stain.angular_percentile,
        ).fit(image)
        sha1 = source.sha1 if source else hashlib.sha1(ref_path.read_bytes()).hexdigest()
        write_json(
            path,
            {"reference": normalizer.reference.to_dict(), "path": str(ref_path), "sha1": sha1},
        )
        log.info("stain reference: %s", ref_path)
        return normalizer.reference, settings | {"sha1": sha1}

    def _pick_reference(self, entries: list[IndexEntry]) -> IndexEntry:
        """The most typical image's stains (label-free, over every usable image).

        Not per split or fold on purpose: then every fold shares one patch cache.
        """
        usable = [e for e in entries if e.usable]
        stain = self.hparams.stain

        def small(entry: IndexEntry) -> np.ndarray:
            image, _ = bach.read_rgb(entry.path)
            h, w = image.shape[:2]
            size = (w // REFERENCE_DOWNSAMPLE, h // REFERENCE_DOWNSAMPLE)
            return cv2.resize(image, size, interpolation=cv2.INTER_AREA)

        best = pick_reference(
            (small(e) for e in usable), stain.luminosity_threshold, stain.angular_percentile
        )
        return usable[best]

    def _augment_kwargs(self) -> dict:
        augment = self.hparams.augment
        jitter = augment.get("he_jitter")
        reference = self.stain.reference
        if jitter and reference is None:
            log.warning("augment.he_jitter needs stain normalisation (stain=macenko): not applied")
        return {
            "stain_matrix": reference.stain_matrix if reference else None,
            "he_jitter": tuple(jitter) if jitter else None,
            "rot90": augment.get("rot90", False),
            "flip": augment.get("flip", False),
        }

    # -- loaders ------------------------------------------------------------------------------
    def _loader(self, side: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[side]
        batch = self.batch_size_per_device
        workers = self.hparams.num_workers
        sampler = None
        if shuffle:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            sampler = EpochShuffle(dataset, self.hparams.seed, epoch)
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            generator=sampler.generator if sampler else None,
            # Inception-V3's aux BatchNorm cannot train on a batch of one.
            drop_last=shuffle and len(dataset) % batch == 1,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            worker_init_fn=seed_worker if workers > 0 else None,
            collate_fn=None if self.hparams.mode == "patch" else pad_collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def summary(self) -> dict[str, float]:
        """Counts for the logs and the stage's return value."""
        out: dict[str, float] = {"data/n_images": float(sum(len(v) for v in self.split.values()))}
        for side in SIDES:
            out[f"data/n_{side}_images"] = float(len(self.split[side]))
            out[f"data/n_{side}_samples"] = float(len(self.datasets.get(side, ())))
        out["data/n_patches"] = float(sum(r["shape"][0] for r in self.records.values()))
        return out
