"""Stage ``prepare``: index and validate the images, split them, normalise and tile once, and
audit the split for near-duplicates across its sides (``breastnet.audit``)."""

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.artifacts import locked
from breastnet.audit import audit_split
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.prepare import build
from breastnet.distributed import on_rank_zero
from breastnet.logs import say


def run(cfg: DictConfig) -> dict[str, float]:
    """Build (or reuse) the index, split, stain reference, patch cache and split audit in
    work_dir; returns the data counts (and ``data/near_duplicates``: val/test images with a
    training near-duplicate).

    Rank 0 builds (``breastnet.data.prepare.build``); every rank then loads what it built.
    """
    datamodule: BreastDataModule = instantiate(cfg.data)  # a bad setting fails before the work
    on_rank_zero(lambda: build(cfg.data))
    datamodule.setup()
    prepared = datamodule.prepared
    summary = datamodule.summary()
    if cfg.audit.enabled:

        def audit() -> dict:
            split, threshold = prepared.split_path, cfg.audit.threshold
            with locked(split.with_suffix(".audit.json")):
                found = audit_split(prepared.work_dir, prepared.entries, split, threshold)
            say(audit_line(split, found))
            return found

        # Only rank 0 gets the result back: nothing below may be a collective (every rank
        # must make the same ones, or the next is paired with another and hangs).
        if (found := on_rank_zero(audit)) is not None:
            summary["data/near_duplicates"] = float(found["flagged"])
    return summary


def audit_line(split_path: Path, found: dict) -> str:
    """Where the audit is and what it found: the closest val/test-train pair and its score
    against the threshold, so a reader sees how near "0 near-duplicates" came."""
    where = split_path.with_suffix(".audit.json")
    if not found["matches"]:
        return f"leakage audit: {where} (no val/test images)"
    top = found["matches"][0]  # most similar first
    return (
        f"leakage audit: {where}: highest similarity {top['similarity']:.3f} ({top['side']} "
        f"{top['image_id']} ~ train {top['train_id']}); {found['flagged']} near-duplicate(s) "
        f"at >= {found['threshold']:g}"
    )
