"""Which source each image comes from (``data.groups``), so a split keeps a source on one side.

A spec is one of:

- ``"auto"`` (``data=bach``'s default): what the data in hand give (``resolve_spec``): BACH's
  patients (``bach``) when ``data.bach_names`` is set or every file has a BACH name, else a
  ``patient`` or ``group`` column of the label CSV that gives every image one, else by image,
  with one warning that the numbers are optimistic if images share a source.
- ``None``: every image is its own group (split by image).
- ``"bach"``: BACH's official patient id where the organisers give one
  (``breastnet.data.published``), else the ``blocks:10`` group of the image's BACH number: the
  patient-aware grouping. A renamed copy names its BACH names with ``data.bach_names``.
- ``"blocks:K"``: the class plus the last number in the file name integer-divided by K
  (``Invasive/iv037.tif`` -> ``Invasive/3`` for K=10), for archives such as BACH that are
  numbered by source but publish no source ids.
- ``"regex:<pattern>"``: the first capture group of ``pattern``, searched in the image's path
  relative to ``data_dir`` (``Benign/patient7_b012.tif``).
- any other string: a column of the label CSV, whose first row is then a header
  (``file,label,patient``).
"""

import csv
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from breastnet.artifacts import config_hash
from breastnet.data.bach import DataError, IndexEntry, find_label_csv
from breastnet.data.published import BachName, bach_patients, parse_bach_name

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"\d+")
BACH_BLOCK = 10  # the blocks of file numbers that group BACH's unidentified images
AUTO = "auto"
AUTO_COLUMNS = ("patient", "group")  # label-CSV columns that data.groups=auto takes
_WARNED: set[str] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log a warning about the data once per process: every stage and rank resolves the same
    split, and one warning is read where a dozen are skipped."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _parse(spec: str) -> tuple[str, str | int | re.Pattern | None]:
    """(kind, argument) of a resolved spec (``resolve_spec``): ("bach", None), ("blocks", K),
    ("regex", compiled) or ("column", name)."""
    if spec == "bach":
        return spec, None
    kind, _, arg = spec.partition(":")
    if kind == "blocks":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"data.groups=blocks:K needs a positive integer K, got {spec!r}")
        return kind, int(arg)
    if kind == "regex":
        try:
            pattern = re.compile(arg)
        except re.error as e:
            raise ValueError(f"data.groups={spec!r}: not a regular expression ({e})") from e
        if pattern.groups < 1:
            raise ValueError(f"data.groups={spec!r}: the pattern needs a capture group")
        return kind, pattern
    if not spec.strip():
        raise ValueError(
            "data.groups must be null, auto, bach, blocks:K, regex:<pattern> or a CSV column"
        )
    return "column", spec


def spec_token(spec: str) -> str:
    """A file-name-safe token for a resolved spec: ``bach``, ``blocks10``, ``regex-<hash>``,
    ``col-patient``."""
    kind, arg = _parse(spec)
    if kind == "bach":
        return kind
    if kind == "blocks":
        return f"blocks{arg}"
    if kind == "regex":
        return f"regex-{config_hash(spec, 8)}"
    return f"col-{column_token(arg)}"


def column_token(column: str) -> str:
    """A label-CSV column's name, or its hash where it is not file-name-safe."""
    return column if re.fullmatch(r"\w+", column) else config_hash(column, 8)


def _relative(entry: IndexEntry) -> str:
    """The image's path relative to data_dir (its id plus the file's suffix)."""
    return entry.image_id + Path(entry.path).suffix


def _block(entry: IndexEntry, size: int, spec: str | None = None) -> str:
    """``class/number // size`` of the last number in the file name (``spec``: the setting
    that asked for it, for the error)."""
    name = Path(entry.image_id).name
    numbers = _NUMBER.findall(name)
    if not numbers:
        raise DataError(
            f"{entry.path}: data.groups={spec or f'blocks:{size}'} needs a number in the file "
            f"name (blocks of {size}), {name!r} has none: name the sources with "
            "data.groups=<label-CSV column>, or data.groups=auto to group by image what has "
            "no source"
        )
    return f"{entry.label}/{int(numbers[-1]) // size}"


def _regex(entry: IndexEntry, pattern: re.Pattern) -> str:
    match = pattern.search(_relative(entry))
    if match is None or not match.group(1):
        raise DataError(
            f"{entry.path}: data.groups=regex:{pattern.pattern} does not match "
            f"{_relative(entry)!r} (or its first group is empty)"
        )
    return match.group(1)


def _bach_group(entry: IndexEntry, name: BachName | None) -> str:
    """The organisers' patient, else the block of BACH numbers (of the file's number when the
    file has no BACH name: another data set, grouped as ``blocks:10``)."""
    if name is None:
        return _block(entry, BACH_BLOCK, "bach")
    if (patient := bach_patients().get(name)) is not None:
        return f"patient{patient}"
    return f"{name.label}/{name.number // BACH_BLOCK}"


def _csv_column(path: Path, column: str, setting: str = "data.groups") -> dict[str, str]:
    """File name -> value of ``column`` in a label CSV with a header row."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and row[0].strip()]
    header = [h.strip() for h in rows[0]] if rows else []
    if column not in header[1:]:
        raise DataError(
            f"{path}: {setting}={column!r} names a column, but the header row is {header} "
            "(expected e.g. 'file,label,group')"
        )
    at = header.index(column)
    return {row[0].strip(): row[at].strip() for row in rows[1:] if len(row) > at}


def _label_csv(spec: str, data_dir: str | Path | None, labels_csv: str | Path | None) -> Path:
    path = find_label_csv(Path(data_dir or "."), labels_csv) if data_dir or labels_csv else None
    if path is None:
        raise DataError(f"{spec} names a label CSV column, but there is no label CSV")
    return path


def _csv_value(values: dict[str, str], entry: IndexEntry) -> str | None:
    """The CSV's value for this image: by its path under data_dir, else by its file name."""
    return values.get(_relative(entry), values.get(Path(entry.path).name)) or None


def bach_names(
    entries: Iterable[IndexEntry],
    column: str | None = None,
    data_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
) -> dict[str, BachName | None]:
    """Which BACH image each usable image is (None: not a BACH name).

    Args:
        entries: the index (unusable entries are left out).
        column: ``data.bach_names``, the label-CSV column of BACH names of a renamed copy
            (bach-dev's ``bach_name``); None: each file's own name.
        data_dir, labels_csv: where that CSV is.

    Raises:
        DataError: naming a file the column gives no name, or a name that is not BACH's.
    """
    usable = [e for e in entries if e.usable]
    if column is None:
        return {e.image_id: parse_bach_name(Path(e.path).name) for e in usable}
    path = _label_csv(f"data.bach_names={column!r}", data_dir, labels_csv)
    values = _csv_column(path, column, "data.bach_names")
    names = {}
    for e in usable:
        value = _csv_value(values, e)
        if value is None or (name := parse_bach_name(value)) is None:
            raise DataError(
                f"{e.path}: {path} gives it no BACH name in column {column!r} "
                f"(got {value!r}; expected e.g. b001.tif, is042.tif)"
            )
        names[e.image_id] = name
    return names


def _header(path: Path) -> list[str]:
    """The first row of a CSV, its cells stripped."""
    with open(path, newline="") as f:
        first = next((row for row in csv.reader(f) if row and row[0].strip()), [])
    return [cell.strip() for cell in first]


def _auto_column(path: Path | None, usable: list[IndexEntry]) -> tuple[str | None, str]:
    """The label CSV's patient or group column if it gives every image a group, else None
    and why not (for the warning)."""
    if path is None:
        return None, "there is no label CSV"
    path = path.resolve()  # one message, whether data_dir came resolved or not
    column = next((h for h in _header(path)[1:] if h.lower() in AUTO_COLUMNS), None)
    if column is None:
        return None, f"the label CSV {path} has no {' or '.join(AUTO_COLUMNS)} column"
    values = _csv_column(path, column)
    if lacking := [e.path for e in usable if not _csv_value(values, e)]:
        return None, (
            f"the {column!r} column of {path} leaves {len(lacking)} image(s) without one "
            f"(e.g. {lacking[0]})"
        )
    return column, ""


def resolve_spec(
    entries: Iterable[IndexEntry],
    spec: str | None,
    data_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    names_column: str | None = None,
) -> str | None:
    """What ``spec`` comes to for these images: ``auto`` resolved, any other spec as it is.

    ``auto`` is ``bach`` when ``names_column`` (``data.bach_names``) is set or every file
    name is a BACH name; else the label CSV's ``patient`` or ``group`` column when it gives
    every image one; else None (by image), with one warning that names the ways to give
    groups. A single odd file name never stops a run: it makes the data set by image.
    """
    if spec != AUTO:
        return spec
    usable = [e for e in entries if e.usable]
    unnamed = [e.path for e in usable if parse_bach_name(Path(e.path).name) is None]
    if names_column is not None or (usable and not unnamed):
        return "bach"
    path = find_label_csv(Path(data_dir or "."), labels_csv) if data_dir or labels_csv else None
    column, why = _auto_column(path, usable)
    if column is not None or not usable:
        return column
    names = (
        "no file has a BACH name"
        if len(unnamed) == len(usable)
        else f"{len(unnamed)} of {len(usable)} files have no BACH name (e.g. {unnamed[0]}; "
        "a renamed copy of BACH sets data.bach_names=<label-CSV column of BACH names>)"
    )
    warn_once(
        log,
        f"data.groups=auto found no source groups: {names}, and {why}. Each image is its "
        "own group, so numbers on this split are optimistic if images share a source (a "
        "patient, a slide): give the sources with data.groups=<label-CSV column> (a header "
        "such as file,label,patient), data.groups=blocks:K (class + file number // K) or "
        "data.groups='regex:<pattern>' (its first group in the file's path), or set "
        "data.groups=null to split by image without this warning",
    )
    return None


def resolve_groups(
    entries: Iterable[IndexEntry],
    spec: str | None,
    data_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    names_column: str | None = None,
) -> dict[str, str]:
    """The group of every usable image.

    Args:
        entries: the index (unusable entries are left out).
        spec: ``None``, ``"auto"`` (``resolve_spec``), ``"bach"``, ``"blocks:K"``,
            ``"regex:<pattern>"`` or a label CSV column.
        data_dir: where BACH's ground-truth CSV is looked for (column specs only).
        labels_csv: the label CSV (column specs only; default: found in ``data_dir``).
        names_column: ``data.bach_names`` (``bach`` and ``auto``): see ``bach_names``.

    Returns:
        image_id -> group (the image id itself when ``spec`` is None).

    Raises:
        DataError: naming the file whose name has no number, whose path the regex does not
            match, or which the CSV leaves without a group; or the CSV that lacks the column.
    """
    usable = [e for e in entries if e.usable]
    spec = resolve_spec(usable, spec, data_dir, labels_csv, names_column)
    if spec is None:
        return {e.image_id: e.image_id for e in usable}
    kind, arg = _parse(spec)
    if kind == "bach":
        names = bach_names(usable, names_column, data_dir, labels_csv)
        return {e.image_id: _bach_group(e, names[e.image_id]) for e in usable}
    if kind == "blocks":
        return {e.image_id: _block(e, arg) for e in usable}
    if kind == "regex":
        return {e.image_id: _regex(e, arg) for e in usable}
    path = _label_csv(f"data.groups={spec!r}", data_dir, labels_csv)
    values = _csv_column(path, arg)
    groups = {}
    for e in usable:
        group = _csv_value(values, e)
        if not group:
            raise DataError(f"{e.path}: no {arg!r} group for this image in {path}")
        groups[e.image_id] = group
    return groups
