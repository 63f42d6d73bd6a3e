"""The sides a fixed split is given: eva's published split of BACH (``data.split=eva``), or
a user's ``file,side`` CSV (``data.split_file``).

A fixed split is keyed by what fixes it: eva's by each image's BACH name (``eva_names``, so a
corrected ``data.bach_names`` column makes a new split), a split file by its content
(``file_token``).
"""

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

from breastnet.data.bach import DataError, IndexEntry
from breastnet.data.groups import bach_names
from breastnet.data.protocols import SIDES
from breastnet.data.published import BachName, eva_side

_SHOWN = 10  # problems of a split file listed in its error
_NAMED = 5  # files without a BACH name listed in eva's error
OTHER_SPLITS = (
    "data.split=[0.7,0.2,0.1] (hold-out), data.folds=K data.fold=i (k-fold) or "
    "data.split_file=<csv of file,side>"
)


def eva_names(
    entries: list[IndexEntry],
    column: str | None = None,
    data_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
) -> dict[str, BachName]:
    """image_id -> the BACH image it is, for eva's split (``groups.bach_names``).

    Raises:
        DataError: naming the files that have no BACH name, what a renamed or renumbered
            copy sets, and the splits other data use.
    """
    usable = [e for e in entries if e.usable]
    names = bach_names(usable, column, data_dir, labels_csv)
    unnamed = [e.path for e in usable if names[e.image_id] is None]
    if not unnamed:
        return names
    shown = ", ".join(unnamed[:_NAMED]) + (" ..." if len(unnamed) > _NAMED else "")
    raise DataError(
        f"data.split=eva is BACH's published split and needs each file's BACH name "
        f"(b001.tif ... n100.tif): {len(unnamed)} of {len(usable)} file(s) have none ({shown}). "
        "A renamed or renumbered copy of BACH (bach-dev's numbers are BACH's minus one, so "
        "its other files would map to the wrong BACH images) names each file's BACH image "
        "in its label CSV: data.labels_csv=<CSV with a bach_name column> "
        f"data.bach_names=bach_name. Data other than BACH: {OTHER_SPLITS}"
    )


def eva_sides(
    entries: list[IndexEntry],
    column: str | None = None,
    data_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
) -> dict[str, str]:
    """image_id -> eva's side of it (``train``, or ``test`` for eva's reported val images);
    the arguments and errors are ``eva_names``'."""
    names = eva_names(entries, column, data_dir, labels_csv)
    return {i: eva_side(name) for i, name in names.items()}


def file_sides(path: str | Path, entries: list[IndexEntry]) -> dict[str, str]:
    """image_id -> side, from a ``file,side`` CSV (header optional; ``file`` as in a label
    CSV: the path under data_dir, or the file name).

    Raises:
        DataError: naming the CSV and each problem: a missing file, a side that is not
            train/val/test, a row naming no image of the data set or naming one twice, an
            image of the data set that no row names.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.split_file={path}: no such file")
    usable = [e for e in entries if e.usable]
    by_name: dict[str, list[str]] = defaultdict(list)
    for e in usable:
        by_name[e.image_id + Path(e.path).suffix].append(e.image_id)
        by_name[Path(e.path).name].append(e.image_id)
    sides: dict[str, str] = {}
    problems = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip() or (line == 1 and row[-1].strip() == "side"):
                continue
            name, side = row[0].strip(), row[-1].strip().lower()
            ids = by_name.get(name, [])
            if len(row) < 2 or side not in SIDES:
                problems.append(f"line {line}: expected 'file,side' with side train/val/test")
            elif len(set(ids)) != 1:
                what = "names no image of the data set" if not ids else "matches several files"
                problems.append(f"line {line}: {name!r} {what}")
            elif ids[0] in sides:
                problems.append(f"line {line}: {name!r} is named twice")
            else:
                sides[ids[0]] = side
    unassigned = [e.path for e in usable if e.image_id not in sides]
    if unassigned:
        problems.append(f"{len(unassigned)} image(s) of the data set have no row: {unassigned[0]}")
    if problems:
        more = [f"... {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else []
        raise DataError(f"data.split_file={path}:\n  " + "\n  ".join(problems[:_SHOWN] + more))
    return sides


def file_token(path: str | Path) -> str:
    """The split file's content hash: an edited file makes a new split."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.split_file={path}: no such file")
    return hashlib.sha1(path.read_bytes()).hexdigest()[:8]
