"""Which source each image comes from (``data.groups``), so a split keeps a source on one side.

A spec is one of:

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
import re
from collections.abc import Iterable
from pathlib import Path

from breastnet.artifacts import config_hash
from breastnet.data.bach import DataError, IndexEntry, find_label_csv
from breastnet.data.published import BachName, bach_patients, parse_bach_name

_NUMBER = re.compile(r"\d+")
BACH_BLOCK = 10  # the blocks of file numbers that group BACH's unidentified images


def _parse(spec: str) -> tuple[str, str | int | re.Pattern]:
    """(kind, argument) of a spec: ("bach", None), ("blocks", K), ("regex", compiled) or
    ("column", name)."""
    if spec == "bach":
        return "bach", None
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
            "data.groups must be null, bach, blocks:K, regex:<pattern> or a CSV column"
        )
    return "column", spec


def spec_token(spec: str) -> str:
    """A file-name-safe token for a spec: ``bach``, ``blocks10``, ``regex-<hash>``,
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


def _block(entry: IndexEntry, size: int) -> str:
    """``class/number // size`` of the last number in the file name."""
    name = Path(entry.image_id).name
    numbers = _NUMBER.findall(name)
    if not numbers:
        raise DataError(
            f"{entry.path}: data.groups=blocks:{size} needs a number in the file name, "
            f"{name!r} has none"
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
        return _block(entry, BACH_BLOCK)
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
        spec: ``None``, ``"bach"``, ``"blocks:K"``, ``"regex:<pattern>"`` or a label CSV
            column.
        data_dir: where BACH's ground-truth CSV is looked for (column specs only).
        labels_csv: the label CSV (column specs only; default: found in ``data_dir``).
        names_column: ``data.bach_names`` (``bach`` only): see ``bach_names``.

    Returns:
        image_id -> group (the image id itself when ``spec`` is None).

    Raises:
        DataError: naming the file whose name has no number, whose path the regex does not
            match, or which the CSV leaves without a group; or the CSV that lacks the column.
    """
    usable = [e for e in entries if e.usable]
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
