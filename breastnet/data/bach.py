"""Index a BACH-layout folder: find the images, label them, validate them, flag duplicates.

Everything is checked before any long work starts: a bad file fails the run with a message
that names it (or, with ``skip_bad``, is left out with a warning). Validation results are
reused from the previous ``index.csv`` for files whose size and mtime are unchanged.
"""

import csv
import hashlib
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from breastnet import CLASSES
from breastnet.artifacts import atomic_write, config_hash
from breastnet.data.resolution import assumed_pixel_size, read_mpp, scale_factor, scaled_size
from breastnet.errors import UserError
from breastnet.labels import LabelMap, canonical_label, csv_label, label_names, unlabelled_folder
from breastnet.logs import progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg"})
GROUND_TRUTH_CSV = "microscopy_ground_truth.csv"  # BACH's own label file, next to Photos/


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and what is wrong."""


@dataclass
class IndexEntry:
    """One image file: where it is, its label, what validation found."""

    image_id: str  # path relative to data_dir, without suffix: "Benign/b001"
    path: str  # absolute path
    label: str
    width: int = 0
    height: int = 0
    mode: str = ""  # PIL mode of the file; anything but RGB is converted on read
    sha1: str = ""
    file_size: int = 0
    mtime_ns: int = 0
    error: str = ""
    duplicate_of: str = ""
    mpp: float | None = None  # µm per pixel from the file's TIFF tags; None: none (data.mpp)

    @property
    def usable(self) -> bool:
        """Can go into a split: valid and not a copy of another image."""
        return not self.error and not self.duplicate_of

    @property
    def label_index(self) -> int:
        return CLASSES.index(self.label)


def read_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode an image fully as RGB uint8; returns (array, original PIL mode).

    Transparent pixels are composited on white (background on a slide), grayscale is
    replicated; a truncated or unreadable file raises ``DataError`` naming it.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "RGB":
                return np.asarray(im), mode
            if mode == "P":
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA"):
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im.convert("RGBA"))
            if im.mode in ("I;16", "I;16B", "I", "F"):
                raise DataError(f"{path}: {mode} images (16-bit or float) are not supported")
            return np.asarray(im.convert("RGB")), mode
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def find_images(data_dir: Path) -> list[Path]:
    """Image files under ``data_dir`` (recursively, hidden entries skipped), sorted; broken
    symbolic links among them are named in one warning with their count."""
    named = [
        p
        for p in data_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(data_dir).parts)
    ]
    if broken := sorted(str(p) for p in named if p.is_symlink() and not p.exists()):
        shown = ", ".join(broken[:5]) + (" ..." if len(broken) > 5 else "")
        log.warning(
            "%d broken symbolic link(s) under %s left out (%s): a relative link's target is "
            "resolved from the link's own folder",
            len(broken),
            data_dir,
            shown,
        )
    return sorted(p for p in named if p.is_file())


def read_label_csv(path: Path) -> dict[str, str]:
    """File name -> label as written, from a ``file,label`` CSV (BACH's ground truth has no
    header; one is allowed). What a label means is the ``LabelMap``'s business."""
    labels: dict[str, str] = {}
    with open(path, newline="") as f:
        for row_no, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise DataError(f"{path}, line {row_no}: expected 'file,label', got {row}")
            name, raw = row[0].strip(), row[1].strip()
            if row_no == 1 and raw.lower() in ("label", "class", "diagnosis"):
                continue  # header
            labels[name] = raw
    return labels


def _validate(path: Path) -> dict:
    """Decode the whole file (catches truncation), hash it, record its size and mode."""
    stat = path.stat()
    found = {"file_size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        image, mode = read_rgb(path)
    except DataError as e:
        return found | {"error": str(e)}
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    h, w = image.shape[:2]
    return found | {"width": w, "height": h, "mode": mode, "sha1": digest, "error": ""}


def _check_empty_class_folders(data_dir: Path, files: list[Path]) -> list[str]:
    """Class folders that hold no image (a sign of a failed copy or download)."""
    with_images = {parent for f in files for parent in f.parents}
    return [
        f"{d}: class folder holds no images"
        for d in sorted(data_dir.rglob("*"))
        if d.is_dir() and canonical_label(d.name) and d not in with_images
    ]


def build_index(
    data_dir: str | Path,
    labels_csv: str | Path | None = None,
    min_size: int = 1,
    mpp: float | None = None,
    skip_bad: bool = False,
    num_workers: int = 2,
    previous: list[IndexEntry] | None = None,
    label_map: Mapping[str, str] | None = None,
) -> list[IndexEntry]:
    """Scan, label, validate and hash every image under ``data_dir``.

    Args:
        data_dir: a BACH layout (class folders, optionally under ``Photos/``).
        labels_csv: ``file,label`` CSV; BACH's ``microscopy_ground_truth.csv`` is used when
            found in ``data_dir`` or ``data_dir/Photos``. Must agree with the folders.
        min_size: smallest allowed width/height at ``mpp`` (one tile; 1 when the fit rule
            pads small images).
        mpp: the tiling's pixel size: a file whose tags give another is checked at the size
            it is rescaled to. None: as it is.
        skip_bad: leave bad files out with a warning instead of failing.
        num_workers: threads that decode images (PIL releases the GIL while decoding).
        previous: an earlier index; unchanged files are not decoded again.
        label_map: other names of the classes in folders or the CSV (``data.label_map``).

    Raises:
        DataError: listing every bad file, unless ``skip_bad``.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataError(
            f"{data_dir}: data directory does not exist; set data.data_dir to a BACH-layout "
            "folder (make: DATA=<folder>)"
        )
    files = find_images(data_dir)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"{data_dir}: no images ({suffixes}) found")
    problems = _check_empty_class_folders(data_dir, files)

    csv_path = find_label_csv(data_dir, labels_csv)
    csv_labels = read_label_csv(csv_path) if csv_path else {}
    labels = LabelMap(label_map, "data.label_map", groups=False)
    labels.check_keys(label_names(files, data_dir, csv_labels))
    unknown: Counter = Counter()
    entries = [_labelled_entry(f, data_dir, csv_labels, csv_path, labels, unknown) for f in files]
    if unknown:
        problems.insert(0, labels.unknown_report(unknown))
    _flag_shared_ids(entries)

    # Reuse what an earlier scan decoded, for files whose size and mtime are unchanged.
    cached = {(e.path, e.file_size, e.mtime_ns): e for e in previous or [] if e.sha1}
    todo = []
    for entry in entries:
        stat = Path(entry.path).stat()
        hit = cached.get((entry.path, stat.st_size, stat.st_mtime_ns))
        if hit is None:
            todo.append(entry)
        else:
            _update(entry, {k: getattr(hit, k) for k in _VALIDATED})
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = pool.map(_validate, (Path(e.path) for e in todo))
        for entry, found in zip(todo, progress(results, len(todo), "index"), strict=True):
            found["error"] = entry.error or found["error"]  # a label error comes first
            _update(entry, found)

    sides, too_small = [], 0
    for e in entries:
        if e.error:
            continue
        e.mpp = read_mpp(e.path)  # header only; an index from before mpp lacks it
        width, height = _tiled_size(e, mpp)
        sides.append(min(width, height))
        if min(width, height) < min_size:
            at = (
                f" ({width}x{height} at {mpp} µm/px)"
                if (width, height) != (e.width, e.height)
                else ""
            )
            e.error = (
                f"{e.path}: image {e.width}x{e.height}{at} is smaller than one {min_size} px tile"
            )
            too_small += 1
        elif e.mode != "RGB":
            log.warning("%s: %s image converted to RGB", e.path, e.mode)
    untagged = sum(not e.error and e.mpp is None for e in entries)
    if untagged and mpp and todo:  # said when files are first indexed, not at each reuse
        log.warning("%s", assumed_pixel_size(untagged, len(entries), mpp, "data.mpp"))
    problems += [e.error for e in entries if e.error]
    if problems and not skip_bad:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{len(problems)} problem(s) in {data_dir}:\n  {shown}{more}\n"
            + _advice(len(entries), len(problems), too_small, min(sides, default=0), min_size)
        )
    for problem in problems:
        log.warning("skipped: %s", problem)
    _flag_duplicates(entries)
    _check_classes(entries, data_dir)
    return entries


_VALIDATED = ("width", "height", "mode", "sha1", "file_size", "mtime_ns")


def _tiled_size(entry: IndexEntry, mpp: float | None) -> tuple[int, int]:
    """(width, height) of the image once rescaled from its own pixel size to ``mpp``."""
    factor = scale_factor(entry.mpp, mpp) if mpp else 1.0
    return scaled_size(entry.width, entry.height, factor)


def _advice(n_images: int, n_problems: int, too_small: int, smallest: int, min_size: int) -> str:
    """What to do about the problems: ``skip_bad`` only while it would keep most images.

    When most images are smaller than a tile, the tiling does not fit the data (typically the
    generated demo images, 512x384, run without ``experiment=demo``): leaving them out would
    leave little or nothing to train on.
    """
    if 2 * too_small <= n_images:
        return "Fix or remove these files, or set data.skip_bad=true to leave them out."
    others = " Fix or remove the other files listed." if n_problems > too_small else ""
    return (
        f"{too_small} of {n_images} images are smaller than one data.tile_size={min_size} px "
        f"tile: the tiling does not fit this data. Set data.tile_size and data.stride to at "
        f"most {smallest} px, or data.fit=pad or overlap to pad small images with white, or, "
        f"for the generated demo images, add experiment=demo (make: ARGS=experiment=demo)."
        f"{others}"
    )


def _update(entry: IndexEntry, found: dict) -> None:
    for key, value in found.items():
        setattr(entry, key, value)


def find_label_csv(data_dir: Path, labels_csv: str | Path | None) -> Path | None:
    """The label CSV to use: the one given, else BACH's ground truth if it lies in data_dir."""
    if labels_csv is not None:
        path = Path(labels_csv).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: label CSV does not exist")
        return path
    for candidate in (data_dir / GROUND_TRUTH_CSV, data_dir / "Photos" / GROUND_TRUTH_CSV):
        if candidate.is_file():
            log.info("labels cross-checked against %s", candidate)
            return candidate
    return None


def _flag_shared_ids(entries: list[IndexEntry]) -> None:
    """Files whose ids collide (``b001.tif`` beside ``b001.png``: the id drops the suffix)
    would share one cache array and could land on both sides of a split: each gets an
    error naming the other."""
    by_id: dict[str, list[IndexEntry]] = {}
    for entry in entries:
        by_id.setdefault(entry.image_id, []).append(entry)
    for same in (group for group in by_id.values() if len(group) > 1):
        for entry in same:
            others = ", ".join(e.path for e in same if e is not entry)
            entry.error = entry.error or (
                f"{entry.path}: image id {entry.image_id!r} is also that of {others} "
                "(ids drop the suffix): rename or remove one"
            )


def _labelled_entry(
    path: Path,
    data_dir: Path,
    csv_labels: dict[str, str],
    csv_path: Path | None,
    labels: LabelMap,
    unknown: Counter,
) -> IndexEntry:
    """The file's entry with its label, or the error that keeps it out; a label name that
    nothing maps is counted in ``unknown``."""
    rel = path.relative_to(data_dir)
    entry = IndexEntry(image_id=rel.with_suffix("").as_posix(), path=str(path), label="")
    from_folder = labels.folder(path, data_dir)
    raw_csv = csv_label(csv_labels, path, data_dir)
    from_csv = labels(raw_csv) if raw_csv is not None else None
    label = from_folder or from_csv
    if raw_csv is not None and from_csv is None:
        unknown[raw_csv] += 1
        entry.error = f"{path}: label file {csv_path} gives the unknown label {raw_csv!r}"
    elif from_folder and from_csv and from_folder != from_csv:
        entry.error = (
            f"{path}: label file {csv_path} says {from_csv} but the file is in a "
            f"{from_folder} folder"
        )
    elif label is None:
        if folder := unlabelled_folder(path, data_dir):
            unknown[folder] += 1
        entry.error = (
            f"{path}: no label: its folder '{rel.parent}' is not a class "
            f"({', '.join(CLASSES)})" + ("" if csv_path else " and no label CSV was given")
        )
    entry.label = label or ""
    return entry


def _flag_duplicates(entries: list[IndexEntry]) -> None:
    """Keep the first of identical files; later copies stay out of every split."""
    first: dict[str, IndexEntry] = {}
    for e in entries:
        if e.error:
            continue
        if e.sha1 in first:
            original = first[e.sha1]
            e.duplicate_of = original.image_id
            clash = (
                f" (labelled {e.label} vs {original.label})" if e.label != original.label else ""
            )
            log.warning(
                "%s is an exact duplicate of %s%s: left out of the splits so it cannot leak "
                "across them",
                e.path,
                original.path,
                clash,
            )
        else:
            first[e.sha1] = e


def _check_classes(entries: list[IndexEntry], data_dir: Path) -> None:
    counts = defaultdict(int)
    for e in entries:
        if e.usable:
            counts[e.label] += 1
    missing = [c for c in CLASSES if not counts[c]]
    if missing:
        raise DataError(f"{data_dir}: no usable images for class(es) {', '.join(missing)}")


def write_index(path: Path, entries: list[IndexEntry]) -> None:
    """Atomically write ``index.csv`` (one row per file, bad ones with their error)."""
    names = [f.name for f in fields(IndexEntry)]

    def write(f) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=names)
        writer.writeheader()
        writer.writerows(asdict(e) for e in entries)
        f.write(text.getvalue().encode())

    atomic_write(path, write)


def _mpp(value: str) -> float | None:
    return float(value) or None if value else None


def read_index(path: Path) -> list[IndexEntry]:
    """Read ``index.csv`` written by :func:`write_index`."""
    # An empty mpp is a file without a pixel size (0.0 in indexes written before that).
    types = {"width": int, "height": int, "file_size": int, "mtime_ns": int, "mpp": _mpp}
    with open(path, newline="") as f:
        return [
            IndexEntry(**{k: types.get(k, str)(v) for k, v in row.items()})
            for row in csv.DictReader(f)
        ]


def data_fingerprint(entries: list[IndexEntry]) -> str:
    """Hash of the usable images (id, content, label): keys splits to the data they split."""
    return config_hash(sorted((e.image_id, e.sha1, e.label) for e in entries if e.usable))


def content_fingerprint(entries: list[IndexEntry]) -> str:
    """Hash of the usable images' ids and contents, not their labels: keys what is made from
    the pixels alone (a stain reference picked from every image), so a relabel reuses it."""
    return config_hash(sorted((e.image_id, e.sha1) for e in entries if e.usable))
