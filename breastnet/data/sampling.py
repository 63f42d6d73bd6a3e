"""Seeded shuffling over ranks: each sample's augmentation seed comes from (seed, epoch,
index), never from the process, worker or resume point that loads it."""

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int, *more: int) -> int:
    """The augmentation seed of one sample in one epoch (independent of worker and rank);
    ``more`` adds to what it is drawn from (the rank, for per-rank dropout)."""
    return int(np.random.SeedSequence([seed, epoch, index, *more]).generate_state(1)[0])


class EpochShuffle(DistributedSampler):
    """One permutation per (seed, epoch), shared out over the ranks; each index comes with its
    augmentation seed (``sample_seed``), so nothing a sample draws depends on the process that
    loads it. On one process this is a plain seeded shuffle.
    """

    def __init__(
        self, dataset: Dataset, seed: int, epoch: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in super().__iter__():
            yield i, sample_seed(self.seed, self.epoch, i)
