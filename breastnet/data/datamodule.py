"""One LightningDataModule for both models: datasets, loaders and each rank's batch size.

It only loads: ``setup`` reads, on every rank, what the prepare stage built
(``breastnet.data.prepare``: index, split, stain reference, patch cache). Lightning's
``prepare_data`` hook is left as it is (it does nothing), so no fit or test ever rebuilds an
artifact that another job reads.

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

from breastnet.data import prepare
from breastnet.data.bach import DataError
from breastnet.data.datasets import FeatureDataset, ImageDataset, PatchDataset, pad_collate
from breastnet.data.feature_store import FeatureStore, missing_message
from breastnet.data.prepare import PreparedData
from breastnet.data.resolution import BACH_MPP
from breastnet.data.sampling import EpochShuffle
from breastnet.data.splits import SIDES
from breastnet.data.store import Tiling
from breastnet.data.transforms import build_transforms

log = logging.getLogger(__name__)

MODES = ("patch", "image", "features")


class BreastDataModule(pl.LightningDataModule):
    """The prepare stage's patch cache (or the features store) -> patch, image or feature
    batches."""

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
        refit: bool = False,
    ) -> None:
        """See ``conf/data/bach.yaml`` for what each setting means; ``inner_fold`` (k, K), set
        by the patch and features stages, selects inner split k of K (out-of-fold models);
        ``refit``, set by the patch stage, trains on train + val (``patch.refit``)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.save_hyperparameters(logger=False)
        self.tiling = Tiling.from_data(self.hparams)
        self.datasets: dict[str, Dataset] = {}
        self.prepared: PreparedData | None = None  # what setup read of the prepare stage's work
        self.features: FeatureStore | None = None

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

    def setup(self, stage: str | None = None) -> None:
        """Read what the prepare stage built; build the datasets of each split side."""
        if self.datasets:
            return
        hp = self.hparams
        self.prepared = found = prepare.load(hp, hp.inner_fold, hp.refit)
        if self.hparams.mode == "features":  # cached CNN outputs: no patches, no augmentation
            store, wanted = self._features(), found.contents()
            if stale := store.stale(wanted):
                raise DataError(missing_message(store.root, stale, len(wanted)))
            for side in SIDES:
                ids = list(found.contents([side]))
                self.datasets[side] = FeatureDataset(store, ids, found.labels)
            return
        labels, augment = found.labels, self._augment_kwargs(self.hparams.mode == "patch")
        for side in SIDES:
            records = [found.records[i] for i in found.split[side] if i in found.records]
            transform = build_transforms(side == "train", **augment)
            if self.hparams.mode == "patch":
                self.datasets[side] = PatchDataset(
                    found.cache, records, labels, transform, self.hparams.min_tissue
                )
            else:
                self.datasets[side] = ImageDataset(found.cache, records, labels, transform)

    def inference_images(
        self, sides: Sequence[str] = SIDES, image_ids: Sequence[str] | None = None
    ) -> tuple[ImageDataset, list[str]]:
        """Every image of ``sides`` (or the ``image_ids``) as an un-augmented ``ImageDataset``,
        and its ids in order."""
        found = self.prepared
        if image_ids is None:
            image_ids = [i for side in sides for i in found.split[side]]
        ids = [i for i in image_ids if i in found.records]
        records = [found.records[i] for i in ids]
        transform = build_transforms(False, **self._augment_kwargs())
        return ImageDataset(found.cache, records, found.labels, transform), ids

    def _features(self) -> FeatureStore:
        """The features stage's store (``features_path``), its manifest read once."""
        if self.features is None:
            self.features = FeatureStore(Path(str(self.hparams.features_path)))
        return self.features

    @property
    def feature_dim(self) -> int:
        """Width of the cached feature vectors (2048 for Inception-V3)."""
        return self._features().width

    def _augment_kwargs(self, training: bool = False) -> dict:
        """The transforms' settings; ``training``: patches a CNN trains on now, where an H&E
        jitter that cannot apply is said (a frozen encoder or inference never jitters)."""
        augment = self.hparams.augment
        jitter = augment.get("he_jitter")
        reference = self.prepared.stain.reference
        if training and jitter and reference is None:
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
        split, records = self.prepared.split, self.prepared.records
        out: dict[str, float] = {"data/n_images": float(sum(len(v) for v in split.values()))}
        for side in SIDES:
            out[f"data/n_{side}_images"] = float(len(split[side]))
            out[f"data/n_{side}_samples"] = float(len(self.datasets.get(side, ())))
        out["data/n_patches"] = float(sum(r["shape"][0] for r in records.values()))
        return out
