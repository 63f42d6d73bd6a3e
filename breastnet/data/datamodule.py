"""One LightningDataModule for both models: index, split, stain work, tiling and loading.

``prepare_data`` does the long work once (index, split, stain reference, patch cache, all in
``work_dir`` and reused); ``setup`` only reads what it wrote, on every rank.

Modes: ``patch`` yields single patches with their image's label; ``image`` yields all patches
of an image in grid order, padded to the longest image of the batch with a mask;
``features`` yields an image's cached CNN feature sequence (from the features stage).
"""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from breastnet import lineage
from breastnet.data import bach
from breastnet.data.bach import IndexEntry
from breastnet.data.datasets import FeatureDataset, ImageDataset, PatchDataset, pad_collate
from breastnet.data.reference import stain_reference
from breastnet.data.resolution import BACH_MPP
from breastnet.data.sampling import EpochShuffle
from breastnet.data.splits import SIDES, SplitSpec, load_or_make_split
from breastnet.data.store import PatchCache, StainSettings, Tiling
from breastnet.data.transforms import build_transforms

log = logging.getLogger(__name__)

MODES = ("patch", "image", "features")


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
        label_map: Mapping[str, str] | None = None,
        split: Sequence[float] | str = (0.7, 0.2, 0.1),
        folds: int | None = None,
        fold: int = 0,
        seed: int = 2019,
        split_seed: int | None = None,
        groups: str | None = None,
        split_file: str | None = None,
        val_fraction: float = 0.2,
        bach_names: str | None = None,
        tile_size: int = 512,
        stride: int = 512,
        patch_size: int = 299,
        mpp: float = BACH_MPP,
        fit: str = "trim",
        min_tissue: float = 0.05,
        skip_bad: bool = False,
        batch_size: int = 32,
        num_workers: int = 2,
        prepare_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        features_path: str | None = None,
        inner_fold: tuple[int, int] | None = None,
    ) -> None:
        """See ``conf/data/bach.yaml`` for what each setting means; ``inner_fold`` (k, K), set
        by the patch and features stages, selects inner split k of K (out-of-fold models)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.save_hyperparameters(logger=False)
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.work_dir = Path(work_dir).expanduser().resolve()
        self.tiling = Tiling(tile_size, stride, patch_size, mpp, fit)
        self.datasets: dict[str, Dataset] = {}
        self.entries: list[IndexEntry] = []
        self.split: dict[str, list[str]] = {}
        self.split_path: Path | None = None
        self.split_spec: SplitSpec | None = None
        self.records: dict[str, dict] = {}
        self.stain = StainSettings()  # the fitted Macenko reference and solver settings
        self.cache: PatchCache | None = None
        self.features: dict | None = None

    @property
    def index_path(self) -> Path:
        """This data set's index (one per data set: several share a work_dir)."""
        hp = self.hparams
        return lineage.index_path(self.work_dir, self.data_dir, hp.labels_csv, hp.label_map)

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def batch_size_per_device(self) -> int:
        """``batch_size`` is the global batch: each of the trainer's ranks takes its share."""
        batch, world = self.hparams.batch_size, self.world_size
        if batch % world:
            raise ValueError(f"data.batch_size={batch} is not divisible by the {world} devices")
        return batch // world

    # -- the long work, once ----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Index, split, pick the stain reference and fill the patch cache (all reused)."""
        hp = self.hparams
        previous = bach.read_index(self.index_path) if self.index_path.is_file() else None
        entries = bach.build_index(
            self.data_dir,
            hp.labels_csv,
            min_size=hp.tile_size if hp.fit == "trim" else 1,  # pad and overlap take any size
            mpp=hp.mpp,
            skip_bad=hp.skip_bad,
            num_workers=hp.prepare_workers,
            previous=previous,
            label_map=hp.label_map,
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

    def inference_images(
        self, sides: Sequence[str] = SIDES, image_ids: Sequence[str] | None = None
    ) -> tuple[ImageDataset, list[str]]:
        """Every image of ``sides`` (or the ``image_ids``) as an un-augmented ``ImageDataset``,
        and its ids in order."""
        if image_ids is None:
            image_ids = [i for side in sides for i in self.split[side]]
        ids = [i for i in image_ids if i in self.records]
        labels = {e.image_id: e.label_index for e in self.entries}
        transform = build_transforms(False, **self._augment_kwargs())
        return ImageDataset(self.cache, [self.records[i] for i in ids], labels, transform), ids

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
        self.split_spec = spec = SplitSpec.from_data(hp | {"data_dir": self.data_dir})
        outer, outer_path = load_or_make_split(self.work_dir, entries, spec)
        self.split, self.split_path = (
            (outer, outer_path)
            if hp.inner_fold is None
            else load_or_make_split(self.work_dir, entries, spec, hp.inner_fold)
        )
        settings = lineage.stain_settings(hp.stain, entries, outer_path.stem)
        self.stain = stain = StainSettings(
            stain_reference(self.work_dir, entries, hp.stain, settings, outer["train"], build),
            **{k: hp.stain[k] for k in ("solver", "luminosity_threshold", "angular_percentile")},
        )
        self.cache = PatchCache(lineage.cache_dir(self.work_dir, hp, settings))
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
        """Each rank's loader. Training shuffles with ``EpochShuffle``; val/test give every
        sample to exactly one rank (no padding duplicates skewing a small test set)."""
        dataset = self.datasets[side]
        batch, world = self.batch_size_per_device, self.world_size
        rank = self.trainer.global_rank if self.trainer is not None else 0
        workers = self.hparams.num_workers
        sampler: DistributedSampler | None = None
        if shuffle:
            # The epoch Lightning will set (processed, not completed epochs): resuming from an
            # end-of-epoch checkpoint it makes the iterator, and with workers prefetches from
            # it, before it sets the sampler's epoch, while current_epoch still says one less.
            epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0
            sampler = EpochShuffle(dataset, self.hparams.seed, epoch, world, rank)
        elif world > 1:
            sampler = UnrepeatedDistributedSampler(dataset, world, rank, shuffle=False)
        per_rank = len(sampler) if sampler is not None else len(dataset)
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            # An iterator draws its workers' base seed from this generator, not from the
            # global RNG that EpochSeed reseeds (Lightning makes the iterator before that
            # reseed when it resumes, after it otherwise: dropout would differ).
            generator=torch.Generator().manual_seed(self.hparams.seed),
            # Inception-V3's aux BatchNorm cannot train on a batch of one.
            drop_last=shuffle and per_rank % batch == 1,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
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
