"""The patch cache: every image stain-normalised and tiled once, stored as uint8 ``.npy``.

``cache/<hash>/<image_id>.npy`` holds uint8 [N, S, S, 3] patches in row-major grid order;
``manifest.jsonl`` is the journal: one line per finished image, appended only after its
array is in place, so an interrupted build resumes with the images it had not finished.
Each image is built under its own lock, so jobs filling one cache at once tile each image
once: the second finds its record in the journal and moves on.
"""

import json
import logging
import multiprocessing
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from breastnet.artifacts import locked, save_npy, write_json
from breastnet.data.bach import DataError, IndexEntry, read_rgb
from breastnet.data.resolution import BACH_MPP, rescale
from breastnet.data.stain import MacenkoNormalizer, StainReference
from breastnet.data.tiling import FITS, tile_image
from breastnet.errors import ConfigError
from breastnet.logs import Progress

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
FAILED = "failed.json"  # images skipped under data.skip_bad after failing to tile
TISSUE_LUMINOSITY = 0.8  # staintools' tissue mask: LAB lightness below 80 %


@dataclass(frozen=True)
class Tiling:
    """How an image becomes patches: ``tile_size`` px at ``mpp`` µm/px every ``stride`` px,
    sides fitted by the ``fit`` rule (``breastnet.data.tiling``), resized to ``patch_size``.

    Sizes are pixels at ``mpp``, not of the file: an image at another pixel size is rescaled
    to ``mpp`` first, so a tile always covers ``tile_um`` microns of tissue.
    """

    tile_size: int = 512
    stride: int = 512
    patch_size: int = 299
    mpp: float = BACH_MPP
    fit: str = "trim"

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> "Tiling":
        """From ``cfg.data`` or the DataModule's settings."""
        return cls(*(data[k] for k in ("tile_size", "stride", "patch_size", "mpp", "fit")))

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ConfigError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.mpp <= 0:
            raise ConfigError(f"data.mpp must be a pixel size in µm (> 0), got {self.mpp}")

    @property
    def tile_um(self) -> float:
        """Side of one tile in microns (215 µm for BACH's 512 px at 0.42 µm/px)."""
        return self.tile_size * self.mpp


@dataclass(frozen=True)
class StainSettings:
    """Macenko settings; ``reference`` None means no normalisation."""

    reference: StainReference | None = None
    solver: str = "lstsq"
    luminosity_threshold: float = 0.8
    angular_percentile: float = 99

    def normalizer(self) -> MacenkoNormalizer | None:
        if self.reference is None:
            return None
        return MacenkoNormalizer.from_reference(
            self.reference,
            solver=self.solver,
            luminosity_threshold=self.luminosity_threshold,
            angular_percentile=self.angular_percentile,
        )


def tissue_fraction(patches: np.ndarray) -> np.ndarray:
    """Fraction of tissue (not bright background) pixels in each patch of [N, S, S, 3]."""
    flat = patches.reshape(-1, patches.shape[2], 3)
    lightness = cv2.cvtColor(flat, cv2.COLOR_RGB2LAB)[..., 0].reshape(len(patches), -1)
    return (lightness < TISSUE_LUMINOSITY * 255).mean(axis=1)


def normalise_and_tile(
    image: np.ndarray,
    tiling: Tiling,
    normalizer: MacenkoNormalizer | None,
    mpp: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The one path from a decoded RGB image to its patches, for prepare and predict alike.

    ``mpp`` is the image's own pixel size (None: already at ``tiling.mpp``); it is rescaled
    before the stain is fitted, so normalisation sees the tissue as the tiles will.
    """
    height, width = image.shape[:2]
    image = rescale(image, mpp, tiling.mpp)
    if normalizer is not None:
        image = normalizer.transform(image)
    try:
        return tile_image(image, tiling.tile_size, tiling.stride, tiling.patch_size, tiling.fit)
    except ValueError as e:
        if image.shape[:2] == (height, width):
            raise
        raise ValueError(f"{width}x{height} px at {mpp} µm/px, at {tiling.mpp}: {e}") from e


def _prepare_one(entry: IndexEntry, root: Path, tiling: Tiling, stain: StainSettings) -> bool:
    """Worker: read, normalise, tile and store one image, then journal it, all under the
    image's lock; returns False when another process had finished it meanwhile."""
    cache = PatchCache(root)
    out = cache.path(entry.image_id)
    with locked(out):
        # No array: nobody built it. An array: another process may have (read its journal).
        if out.is_file() and not cache.missing([entry]):
            return False
        image, _ = read_rgb(entry.path)
        normalizer = stain.normalizer()
        patches, positions = normalise_and_tile(image, tiling, normalizer, entry.mpp or None)
        save_npy(out, patches)
        record = {
            "image_id": entry.image_id,
            "sha1": entry.sha1,
            "mpp": entry.mpp,
            "shape": list(patches.shape),
            "positions": positions.tolist(),
            "tissue": np.round(tissue_fraction(patches), 4).tolist(),
        }
        with locked(root / MANIFEST), open(root / MANIFEST, "a") as journal:
            journal.write(json.dumps(record) + "\n")
    return True


class PatchCache:
    """One cache directory: its arrays, its manifest, and how to fill it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.npy"

    def records(self) -> dict[str, dict]:
        """Finished images (the latest record per image; a torn last line is ignored)."""
        records: dict[str, dict] = {}
        manifest = self.root / MANIFEST
        if manifest.is_file():
            for line in manifest.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                records[record["image_id"]] = record
        return records

    def failed(self) -> dict[str, str]:
        """Images that failed to tile and were skipped (``data.skip_bad``), with the error."""
        path = self.root / FAILED
        return json.loads(path.read_text()) if path.is_file() else {}

    def load(self, image_id: str) -> np.ndarray:
        """Patches of one image, memory-mapped (a patch read touches only its own bytes)."""
        return np.load(self.path(image_id), mmap_mode="r")

    def missing(self, entries: Iterable[IndexEntry]) -> list[IndexEntry]:
        """Entries without a finished, current array: the same content hash and pixel size
        (its tags'; none without tags: None, or 0 in records made before)."""
        records = self.records()

        def current(e: IndexEntry) -> bool:
            record = records.get(e.image_id, {})
            made = (record.get("sha1"), record.get("mpp") or None)
            return made == (e.sha1, e.mpp or None) and self.path(e.image_id).is_file()

        return [e for e in entries if not current(e)]

    def build(
        self,
        entries: list[IndexEntry],
        tiling: Tiling,
        stain: StainSettings,
        num_workers: int = 2,
        skip_bad: bool = False,
    ) -> dict[str, dict]:
        """Fill the cache for ``entries``, skipping finished ones; returns their records.

        Workers are spawned, not forked: a forked child that calls spams (OpenMP) after the
        parent has hangs in libgomp, and ``stain.solver=lasso`` calls spams.
        """
        write_json(
            self.root / "cache.json",
            {"tiling": asdict(tiling), "stain": _stain_dict(stain)},
        )
        todo = self.missing(entries)
        if todo:
            log.info("prepare: %d of %d images to normalise and tile", len(todo), len(entries))
            failures, tiled = self._run(todo, tiling, stain, num_workers)
            if tiled < len(todo):
                log.info("prepare: %d image(s) built by another process", len(todo) - tiled)
            if failures and not skip_bad:
                raise DataError(
                    f"{len(failures)} image(s) failed in prepare (the others are cached):\n  "
                    + "\n  ".join(failures.values())
                )
            for failure in failures.values():
                log.warning("skipped: %s", failure)
            if failures:  # kept, so loading knows they were left out on purpose
                with locked(self.root / FAILED):
                    write_json(self.root / FAILED, self.failed() | failures)
        records = self.records()
        return {e.image_id: records[e.image_id] for e in entries if e.image_id in records}

    def _run(
        self, todo: list[IndexEntry], tiling: Tiling, stain: StainSettings, num_workers: int
    ) -> tuple[dict[str, str], int]:
        """Prepare ``todo`` (each image journaled as soon as it is done); returns the failures
        (by image id) and how many images this process tiled."""
        failures, tiled = {}, 0
        with Progress(len(todo), "prepare") as progress:
            for entry, outcome in self._outcomes(todo, tiling, stain, num_workers):
                if isinstance(outcome, Exception):  # one bad image must not lose the others
                    failures[entry.image_id] = f"{entry.path}: {outcome}"
                else:
                    tiled += outcome
                progress.update()
        return failures, tiled

    def _outcomes(
        self, todo: list[IndexEntry], tiling: Tiling, stain: StainSettings, num_workers: int
    ) -> Iterator[tuple[IndexEntry, bool | Exception]]:
        if num_workers <= 0:
            for e in todo:
                try:
                    yield e, _prepare_one(e, self.root, tiling, stain)
                except Exception as error:
                    yield e, error
            return
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(_prepare_one, e, self.root, tiling, stain): e for e in todo}
            for future in as_completed(futures):
                yield futures[future], future.exception() or future.result()
        finally:  # on Ctrl-C, do not wait for the queued images
            pool.shutdown(wait=True, cancel_futures=True)


def _stain_dict(stain: StainSettings) -> dict:
    settings = asdict(stain)
    settings["reference"] = stain.reference.to_dict() if stain.reference else None
    return settings
