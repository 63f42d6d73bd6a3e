"""``Trainer.predict`` over images on every rank, each image's output saved as it comes.

The features, evaluate and predict stages share this: the configured accelerator, precision
and strategy (each image on exactly one rank: Lightning's unrepeated sampler for predict),
and one ``.pt`` file per image under a parts folder, so an interrupted run resumes with the
images it had not finished and a finished run reads every image back once.
"""

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning import LightningModule
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset, Subset

from breastnet.artifacts import atomic_write
from breastnet.data.datasets import pad_collate
from breastnet.distributed import barrier, from_rank_zero, rank
from breastnet.trainer import ProgressLog, build_trainer

log = logging.getLogger(__name__)


def part_path(parts_dir: Path, image_id: str) -> Path:
    """Where one image's output is kept (image ids may hold folders: ``Benign/b001``)."""
    return parts_dir / f"{image_id}.pt"


class PartWriter(BasePredictionWriter):
    """Saves each image's output (a dict from ``Embedder``) as soon as its batch is done."""

    def __init__(self, parts_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.parts_dir = parts_dir

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        for image in prediction:
            path = part_path(self.parts_dir, image["image_id"])
            atomic_write(path, lambda f, image=image: torch.save(image, f))


def run_parts(
    cfg: DictConfig,
    embedder: LightningModule,
    dataset: Dataset,
    image_ids: list[str],
    parts_dir: Path,
    name: str,
) -> None:
    """Run ``embedder`` (an ``Embedder`` or ``StackedEmbedder``) over the images without a
    saved part (``image_ids[i]`` is sample ``i`` of ``dataset``) on every rank, each rank
    saving its images' parts; returns when every rank is done."""
    todo = from_rank_zero(  # every rank runs the list rank 0 made, before any writes a part
        lambda: [
            i
            for i, image_id in enumerate(image_ids)
            if not part_path(parts_dir, image_id).exists()
        ]
    )
    if todo:
        log.info("%s: %d of %d images to run", name, len(todo), len(image_ids))
        loader = DataLoader(
            Subset(dataset, todo),
            batch_size=cfg.features.images_per_batch,
            num_workers=cfg.data.num_workers,
            collate_fn=pad_collate,
        )
        trainer = build_trainer(
            cfg,
            [PartWriter(parts_dir), ProgressLog(name)],
            logger=False,
            enable_checkpointing=False,
        )
        trainer.predict(embedder, loader, return_predictions=False)
    barrier()


def read_part(parts_dir: Path, image_id: str, name: str) -> dict[str, Any]:
    """One image's saved output; a missing one is an error naming the stage and image."""
    path = part_path(parts_dir, image_id)
    if not path.is_file():
        raise RuntimeError(f"{name}: no output for {image_id} in {parts_dir}")
    return torch.load(path, weights_only=False)


def predict_images(
    cfg: DictConfig,
    embedder: LightningModule,
    dataset: Dataset,
    image_ids: list[str],
    parts_dir: Path,
    name: str,
) -> dict[str, dict[str, Any]]:
    """Every image's output (``image_ids[i]`` is sample ``i`` of ``dataset``), by id, on
    rank 0 (the one that writes what is made of them); an empty dict on the other ranks.

    Only images without a saved part are run.
    """
    run_parts(cfg, embedder, dataset, image_ids, parts_dir, name)
    if rank() != 0:
        return {}
    return {image_id: read_part(parts_dir, image_id, name) for image_id in image_ids}
