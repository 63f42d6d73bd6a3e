"""Which source each image comes from (``data.groups``), so a split keeps a source on one side.

A spec is one of:

- ``None``: every image is its own group (split by image).
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

_NUMBER = re.compile(r"\d+")


def _parse(spec: str) -> tuple[str, str | int | re.Pattern]:
    """(kind, argument) of a spec: ("blocks", K), ("regex", compiled) or ("column", name)."""
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
        raise ValueError("data.groups must be null, blocks:K, regex:<pattern> or a CSV column")
    return "column", spec


def spec_token(spec: str) -> str:
    """A file-name-safe token for a spec: ``blocks10``, ``regex-<hash>``, ``col-patient``."""
    kind, arg = _parse(spec)
    if kind == "blocks":
        return f"blocks{arg}"
    if kind == "regex":
        return f"regex-{config_hash(spec, 8)}"
    return f"col-{arg}" if re.fullmatch(r"\w+", arg) else f"col-{config_hash(arg, 8)}"


def _relative(entry: IndexEntry) -> str:
    """The image's path relative to data_dir (its id plus the file's suffix)."""
    return entry.image_id + Path(entry.path).suffix


def _block(entry: IndexEntry, size: int) -> str:
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


def _csv_column(path: Path, column: str) -> dict[str, str]:
    """File name -> value of ``column`` in a label CSV with a header row."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and row[0].strip()]
    header = [h.strip() for h in rows[0]] if rows else []
    if column not in header[1:]:
        raise DataError(
            f"{path}: data.groups={column!r} names a column, but the header row is {header} "
            "(expected e.g. 'file,label,group')"
        )
    at = header.index(column)
    return {row[0].strip(): row[at].strip() for row in rows[1:] if len(row) > at}


def resolve_groups(
    entries: Iterable[IndexEntry],
    spec: str | None,
    data_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
) -> dict[str, str]:
    """The group of every usable image.

    Args:
        entries: the index (unusable entries are left out).
        spec: ``None``, ``"blocks:K"``, ``"regex:<pattern>"`` or a label CSV column.
        data_dir: where BACH's ground-truth CSV is looked for (column specs only).
        labels_csv: the label CSV (column specs only; default: found in ``data_dir``).

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
    if kind == "blocks":
        return {e.image_id: _block(e, arg) for e in usable}
    if kind == "regex":
        return {e.image_id: _regex(e, arg) for e in usable}
    path = find_label_csv(Path(data_dir or "."), labels_csv) if data_dir or labels_csv else None
    if path is None:
        raise DataError(f"data.groups={spec!r} is a label CSV column, but there is no label CSV")
    values = _csv_column(path, arg)
    groups = {}
    for e in usable:
        group = values.get(_relative(e), values.get(Path(e.path).name))
        if not group:
            raise DataError(f"{e.path}: no {arg!r} group for this image in {path}")
        groups[e.image_id] = group
    return groups
