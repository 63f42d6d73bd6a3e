"""Build the data artifacts of a data config, each under its lock, and load them back.

``build`` is the prepare stage's long work, on rank 0 alone: the index, the split, the stain
reference and the patch cache, each made once in ``work_dir`` and reused. ``load`` reads them
on every rank (the DataModule's ``setup``); a missing one is a "run the prepare stage first"
error, except a split, which is made under its lock where it is first needed (as the inner
splits of the out-of-fold patch models are, by the patch stage). ``data`` is ``cfg.data`` or
the DataModule's settings, as for ``breastnet.data.keys``, which says where each artifact
lives.
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from breastnet.artifacts import locked
from breastnet.data import bach, keys
from breastnet.data.bach import IndexEntry
from breastnet.data.reference import stain_reference
from breastnet.data.splits import SIDES, SplitSpec, load_or_make_split, refit_split
from breastnet.data.store import PatchCache, StainSettings, Tiling

log = logging.getLogger(__name__)

# cfg.stain's settings of the Macenko normaliser besides its reference (which is fitted).
SOLVER_KEYS = ("solver", "luminosity_threshold", "angular_percentile")


@dataclass(frozen=True)
class PreparedData:
    """One data config's artifacts: where they are and what the DataModule reads of them."""

    work_dir: Path
    entries: list[IndexEntry]
    split_spec: SplitSpec
    split: dict[str, list[str]]  # side -> image ids (an inner split for out-of-fold models)
    split_path: Path
    stain: StainSettings  # the fitted Macenko reference and solver settings
    cache: PatchCache
    records: dict[str, dict] = field(default_factory=dict)  # cached image id -> its record

    @property
    def usable(self) -> list[IndexEntry]:
        return [e for e in self.entries if e.usable]

    @property
    def labels(self) -> dict[str, int]:
        """Each image's class index, by image id."""
        return {e.image_id: e.label_index for e in self.entries}

    def contents(self, sides: Sequence[str] = SIDES) -> dict[str, str]:
        """The cached images of ``sides`` (in split order), each with its content hash: what
        a features store must hold, from that content, to serve them."""
        sha1 = {e.image_id: e.sha1 for e in self.entries}
        return {i: sha1[i] for side in sides for i in self.split[side] if i in self.records}


def build_index(work_dir: Path, data: Mapping[str, Any]) -> list[IndexEntry]:
    """Index the data set of ``data`` under the index file's lock, reusing what any earlier
    index in the work dir decoded; returns its entries."""
    path = keys.index_path(work_dir, data)
    with locked(path):
        own = bach.read_index(path) if path.is_file() else None
        entries = bach.build_index(
            data["data_dir"],
            data["labels_csv"],
            min_size=keys.usability(data)["min_size"],
            mpp=data["mpp"],
            skip_bad=data["skip_bad"],
            num_workers=data["prepare_workers"],
            previous=_decoded(path.parent),
            label_map=data.get("label_map"),
        )
        if entries != own:
            bach.write_index(path, entries)
    return entries


def _decoded(index_dir: Path) -> list[IndexEntry]:
    """Every file any index in ``index_dir`` decoded: a file is decoded and hashed once per
    work dir, whatever the tiling, pixel size or label settings of the index asking
    (``bach.build_index`` reuses an entry only while the file's path, size and mtime match)."""
    return [e for index in sorted(index_dir.glob("*.csv")) for e in bach.read_index(index)]


def build(data: Mapping[str, Any]) -> PreparedData:
    """Index, split, fit the stain reference and fill the patch cache (each reused once
    built): the prepare stage alone calls this."""
    work_dir = _work_dir(data)
    found = _locate(work_dir, data, build_index(work_dir, data), None, fit=True)
    tiling, workers = Tiling.from_data(data), data["prepare_workers"]
    records = found.cache.build(found.usable, tiling, found.stain, workers, data["skip_bad"])
    return _logged(replace(found, records=records), log.info)


def load(
    data: Mapping[str, Any], inner: tuple[int, int] | None = None, refit: bool = False
) -> PreparedData:
    """What ``build`` wrote for ``data``; ``inner`` (k, K) selects inner split k of K (the
    out-of-fold patch models' data), ``refit`` the split with val added to train
    (``splits.refit_split``: the data of ``patch.refit``).

    Raises:
        FileNotFoundError: the index, stain reference or an image of the cache is missing
            (images that prepare skipped under ``data.skip_bad`` aside).
    """
    work_dir = _work_dir(data)
    index = keys.index_path(work_dir, data)
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} not found: run the prepare stage first "
            "(python -m breastnet 'stages=[prepare]')"
        )
    found = _locate(work_dir, data, bach.read_index(index), inner, fit=False)
    if refit:
        found = replace(found, split=refit_split(found.split))
    cache = found.cache
    skipped = cache.failed() if data["skip_bad"] else {}  # prepare left them out
    if missing := [e for e in cache.missing(found.usable) if e.image_id not in skipped]:
        raise FileNotFoundError(
            f"{len(missing)} image(s) missing from the patch cache {cache.root} "
            f"(e.g. {missing[0].path}): run the prepare stage first"
        )
    return _logged(replace(found, records=cache.records()), log.debug)


def _work_dir(data: Mapping[str, Any]) -> Path:
    return Path(data["work_dir"]).expanduser().resolve()


def _locate(
    work_dir: Path,
    data: Mapping[str, Any],
    entries: list[IndexEntry],
    inner: tuple[int, int] | None,
    fit: bool,
) -> PreparedData:
    """The split, stain reference (``fit``: fitted when missing) and cache of ``entries``,
    without the cache's records."""
    folder = Path(data["data_dir"]).expanduser().resolve()
    spec = SplitSpec.from_data({**data, "data_dir": folder}).resolved(entries)
    with locked(work_dir / "splits"):  # one writer of split files at a time
        outer, outer_path = load_or_make_split(work_dir, entries, spec)
        split, split_path = (
            (outer, outer_path)
            if inner is None
            else load_or_make_split(work_dir, entries, spec, inner)
        )
    stain = data["stain"]
    settings = keys.stain_settings(stain, entries, outer_path.stem)
    reference = stain_reference(work_dir, entries, stain, settings, outer["train"], fit)
    return PreparedData(
        work_dir,
        entries,
        spec,
        split,
        split_path,
        StainSettings(reference, **{k: stain[k] for k in SOLVER_KEYS}),
        PatchCache(keys.cache_dir(work_dir, data, settings)),
    )


def _logged(found: PreparedData, say: Callable[..., None]) -> PreparedData:
    say(
        "data: %d images (%s), split %s, cache %s",
        len(found.usable),
        ", ".join(f"{s} {len(found.split[s])}" for s in SIDES),
        found.split_path.name,
        found.cache.root,
    )
    return found
