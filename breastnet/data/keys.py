"""Where the data artifacts of a config live in ``work_dir``: the index, the stain reference
and the patch cache, and their keys (``breastnet.data.prepare`` builds them there,
``breastnet.lineage`` builds the model keys on them; the data package never imports lineage).
docs/architecture.md, "Artifact keys".
"""

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from breastnet.artifacts import artifact_key, container
from breastnet.data import bach
from breastnet.data.bach import IndexEntry
from breastnet.data.resolution import BACH_MPP

STAIN_KEYS = ("method", "solver", "luminosity_threshold", "angular_percentile")
# stain.reference values that pick an image of the data: any (`auto`) or the training side's.
PICKED_REFERENCES = ("auto", "train")


def dataset_key(
    data_dir: str | Path, labels_csv: str | None, label_map: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What names one data set: its resolved folder and label file (several share a
    work_dir), and the label map when there is one."""
    folder = Path(data_dir).expanduser().resolve()
    labels = str(Path(labels_csv).expanduser().resolve()) if labels_csv else None
    found: dict[str, Any] = {"data_dir": str(folder), "labels_csv": labels}
    if label_map:
        found["label_map"] = container(label_map)
    return found


def usability(data: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide which files of a data set are usable (``bach.build_index``):
    the smallest side (a tile when ``fit`` trims; pad and overlap take any size), the pixel
    size it is checked at, and whether bad files are skipped rather than an error."""
    min_size = data["tile_size"] if data["fit"] == "trim" else 1
    return {"min_size": min_size, "mpp": data["mpp"], "skip_bad": data["skip_bad"]}


def index_path(work_dir: Path, data: Mapping[str, Any]) -> Path:
    """``work_dir/index/<key>.csv`` of ``data`` (``cfg.data`` or the DataModule's settings):
    the data set and what makes its files usable."""
    found = dataset_key(data["data_dir"], data["labels_csv"], data.get("label_map"))
    return Path(work_dir) / "index" / f"{artifact_key(found | usability(data))}.csv"


def stain_settings(stain: Any, entries: list[IndexEntry], split: str) -> dict:
    """What identifies a fitted Macenko reference (``method: none``: no stain work); ``split``
    is the split file's stem, which a reference picked from the training side depends on."""
    if stain["method"] == "none":
        return {"method": "none"}
    if stain["method"] != "macenko":
        raise ValueError(f"stain.method must be macenko or none, got {stain['method']!r}")
    settings = {k: stain[k] for k in STAIN_KEYS}
    if stain["reference"] == "auto":
        settings["reference"] = "auto:" + bach.content_fingerprint(entries)
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
    found = dataset_key(data["data_dir"], data["labels_csv"])  # the label map tiles nothing
    return (
        Path(work_dir) / "cache" / artifact_key({"data": found, "tiling": tiling, "stain": stain})
    )
