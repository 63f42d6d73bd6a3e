"""The three datasets the DataModule serves (patches, images, cached features) and the
collate function that pads variable-length image sequences into one batch."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from breastnet.data.feature_store import FeatureStore
from breastnet.data.store import PatchCache


def to_tensor(patches: np.ndarray) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> uint8 [..., 3, S, S]; models normalise on the device."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(patches, -1, -3)))


class _AugmentedDataset(Dataset):
    """A dataset indexed by ``i`` or by ``(i, seed)``: the seed reseeds the transform first.

    ``EpochShuffle`` hands out ``(i, seed)`` pairs, so what a sample draws is fixed by
    (seed, epoch, i): the same in any DataLoader worker, persistent or not, on any rank, and
    after a resume from ``last.ckpt``.
    """

    transform: Any = None

    def _index(self, key: int | tuple[int, int]) -> int:
        if isinstance(key, tuple):
            key, seed = key
            if self.transform is not None:
                self.transform.set_random_seed(seed)
        return key


class PatchDataset(_AugmentedDataset):
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

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        image_id, k, pos = self.items[self._index(key)]
        patch = self.transform(image=np.array(self.cache.load(image_id)[k]))["image"]
        return {
            "x": to_tensor(patch),
            "y": self.labels[image_id],
            "image_id": image_id,
            "pos": torch.tensor(pos),
        }


class ImageDataset(_AugmentedDataset):
    """One sample per image: all its patches in row-major grid order with their (row, col)."""

    def __init__(
        self, cache: PatchCache, records: Sequence[dict], labels: Mapping[str, int], transform: Any
    ) -> None:
        self.cache, self.records, self.labels, self.transform = cache, records, labels, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        record = self.records[self._index(key)]
        patches = np.stack(
            [
                self.transform(image=p)["image"]
                for p in np.array(self.cache.load(record["image_id"]))
            ]
        )
        return {
            "x": to_tensor(patches),
            "y": self.labels[record["image_id"]],
            "image_id": record["image_id"],
            "pos": torch.tensor(record["positions"]),
        }


def pad_collate(samples: list[dict]) -> dict:
    """Batch variable-length sequences: pad every per-patch tensor, ``mask`` marks real patches.

    Per-patch tensors (``x``, ``probs``, ``tissue``) are padded with zeros, positions with -1;
    ``image_id`` (and ``error``, where a sample has one) become lists.
    """
    longest = max(len(s["x"]) for s in samples)
    batch: dict[str, Any] = {"mask": torch.zeros((len(samples), longest), dtype=torch.bool)}
    padded = [k for k in ("x", "pos", "probs", "tissue") if k in samples[0]]
    for key in padded:
        first = samples[0][key]
        batch[key] = torch.full(
            (len(samples), longest, *first.shape[1:]), -1 if key == "pos" else 0, dtype=first.dtype
        )
    for b, s in enumerate(samples):
        n = len(s["x"])
        batch["mask"][b, :n] = True
        for key in padded:
            batch[key][b, :n] = s[key]
    batch["y"] = torch.tensor([s["y"] for s in samples])
    batch["image_id"] = [s["image_id"] for s in samples]
    if any("error" in s for s in samples):
        batch["error"] = [s.get("error") for s in samples]
    return batch


class FeatureDataset(_AugmentedDataset):
    """One sample per image: its cached feature sequence and patch probabilities, read from
    the store when asked for, so memory holds a batch, never the whole store. Its target is
    the current index's label (``labels``): the store holds features, never labels."""

    def __init__(
        self, store: FeatureStore, image_ids: Sequence[str], labels: Mapping[str, int]
    ) -> None:
        self.store, self.image_ids, self.labels = store, list(image_ids), labels

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i = self._index(key)
        image = self.store.load(self.image_ids[i])
        return {
            "x": image["features"],  # N x D
            "probs": image["probs"],  # N x C
            "pos": image["positions"],  # N x 2
            "y": self.labels[self.image_ids[i]],
            "image_id": self.image_ids[i],
        }
