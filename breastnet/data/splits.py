"""Stratified, seeded splits by image or by source group: a group lands on one side only.

Four protocols (``SplitSpec.protocol``): a hold-out split by ratios (``data.split``), k-fold
(``data.folds``), eva's published BACH split (``data.split=eva``, ``breastnet.data.published``)
and a split file of the user's (``data.split_file``). A fixed split's test side is taken as
it is; its val side, unless the file names one, is carved out of its training side.

A split is written once to ``work_dir/splits/<name>.json`` and read back by every later
stage and rerun. The name carries the settings and a fingerprint of the data, so new or
changed images make a new split rather than silently reshuffling an old one. With
``data.groups`` (see ``breastnet.data.groups``) every image of one source (patient, slide, a
block of BACH file numbers) stays on one side, and the name says so.
"""

import csv
import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from breastnet import CLASSES
from breastnet.artifacts import write_json
from breastnet.data.bach import DataError, IndexEntry, data_fingerprint
from breastnet.data.groups import bach_names, column_token, resolve_groups, spec_token
from breastnet.data.published import eva_side

log = logging.getLogger(__name__)

SIDES = ("train", "val", "test")
MAX_FOLDS = 20  # the finest fold count a grouped split uses to match its ratios
PAPER_RATIOS = (0.7, 0.2, 0.1)  # Yan et al.'s; k-fold split names give other ratios
PRESETS = ("eva",)  # published splits that data.split can name
_SHOWN = 10  # problems of a split file listed in its error


@dataclass(frozen=True)
class SplitSpec:
    """Every setting that decides a split (the ``data.*`` keys of the same names).

    ``split`` is the train/val/test ratios or a preset (``eva``); ``seed`` is the split's
    own (``data.split_seed``, else ``data.seed``); ``val_fraction`` is the share of a fixed
    split's training side carved out for model selection; ``bach_names`` the label-CSV
    column of BACH names (``breastnet.data.groups.bach_names``).
    """

    split: tuple[float, ...] | str = PAPER_RATIOS
    folds: int | None = None
    fold: int = 0
    seed: int = 2019
    groups: str | None = None
    split_file: str | None = None
    val_fraction: float = 0.2
    bach_names: str | None = None
    data_dir: str | None = None
    labels_csv: str | None = None

    def __post_init__(self) -> None:
        split = self.split
        if isinstance(split, str):
            if split not in PRESETS:
                raise ValueError(
                    f"data.split must be train/val/test ratios or one of {PRESETS}, got {split!r}"
                )
        else:
            object.__setattr__(self, "split", tuple(float(r) for r in split))
        if self.folds and self.fixed:
            raise ValueError(
                "data.folds makes a k-fold split; a fixed split (data.split=eva or "
                "data.split_file) cannot also be one: set data.folds=null"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> "SplitSpec":
        """From ``cfg.data`` or the DataModule's hyperparameters."""
        seed = data["seed"] if data.get("split_seed") is None else data["split_seed"]
        split = data["split"]
        return cls(
            split=split if isinstance(split, str) else tuple(split),
            folds=data.get("folds"),
            fold=data.get("fold", 0),
            seed=seed,
            groups=data.get("groups"),
            split_file=data.get("split_file"),
            val_fraction=data.get("val_fraction", 0.2),
            bach_names=data.get("bach_names"),
            data_dir=None if data.get("data_dir") is None else str(data["data_dir"]),
            labels_csv=data.get("labels_csv"),
        )

    @property
    def fixed(self) -> bool:
        """A published split or a split file: its sides are given, not drawn."""
        return self.split_file is not None or isinstance(self.split, str)

    @property
    def protocol(self) -> str:
        """What a reader must know to set a number beside another: the split's kind."""
        grouping = f"grouped by {self.groups}" if self.groups else "by image"
        if self.split_file is not None:
            kind = f"the split file {Path(self.split_file).name}"
        elif self.split == "eva":
            kind = "eva's patient-aware BACH split (its 132 reported images as test)"
        elif self.folds:
            kind = f"{self.folds}-fold CV, fold {self.fold} as test"
        else:
            kind = f"hold-out {_ratio_text(self.split)}"
        if self.fixed:
            return f"{kind}, val carved from its training side {grouping}"
        return f"{kind}, {grouping}"

    def groups_of(self, entries: list[IndexEntry]) -> dict[str, str] | None:
        """image_id -> source group (None: by image)."""
        if self.groups is None:
            return None
        return resolve_groups(
            entries, self.groups, self.data_dir, self.labels_csv, self.bach_names
        )


def _largest_remainder(n: int, ratios: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, proportional to ratios."""
    exact = n * ratios / ratios.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def _ratio_text(ratios: Sequence[float]) -> str:
    return "/".join(f"{r:g}" for r in ratios)


def _by_class(entries: list[IndexEntry]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        if e.usable:
            groups[e.label].append(e.image_id)
    return {c: sorted(groups[c]) for c in CLASSES if groups[c]}


def holdout_split(
    entries: list[IndexEntry],
    ratios: tuple[float, ...] = (0.7, 0.2, 0.1),
    seed: int = 2019,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Train/val/test, stratified by class (the paper's 70/20/10).

    Args:
        entries: the index; unusable entries are left out.
        ratios: train/val/test shares.
        seed: the split's seed.
        groups: image_id -> source group (``resolve_groups``); None splits by image.
    """
    ratio = np.asarray(ratios, dtype=float)
    if ratio.shape != (3,) or (ratio < 0).any() or ratio[0] <= 0:
        raise ValueError(f"data.split must be three non-negative ratios (train > 0), got {ratios}")
    if groups is not None:
        sides = _grouped_sides(*_grouped(entries, groups), ratio, seed)
        return dict(zip(SIDES, sides, strict=True))
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {side: [] for side in SIDES}
    for label, ids in _by_class(entries).items():
        counts = _largest_remainder(len(ids), ratio)
        if (counts[ratio > 0] == 0).any():
            raise DataError(
                f"class {label} has only {len(ids)} usable image(s): too few for a "
                f"{_ratio_text(ratios)} split"
            )
        order = rng.permutation(ids).tolist()
        for side, start, stop in zip(
            SIDES, np.r_[0, counts.cumsum()[:-1]], counts.cumsum(), strict=True
        ):
            split[side] += order[start:stop]
    return {side: sorted(ids) for side, ids in split.items()}


def kfold_split(
    entries: list[IndexEntry],
    folds: int,
    fold: int,
    val_fraction: float = 0.2,
    seed: int = 2019,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Fold ``fold`` of a stratified k-fold is the test set; val is carved from the rest.

    Args:
        entries: the index; unusable entries are left out.
        folds: number of folds.
        fold: which fold is the test set (0-based).
        val_fraction: share of the non-test images that go to val.
        seed: the split's seed (the same seed gives the same folds for every ``fold``).
        groups: image_id -> source group (``resolve_groups``); None splits by image.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds} fold={fold}")
    if groups is not None:
        return _grouped_kfold(entries, groups, folds, fold, val_fraction, seed)
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {side: [] for side in SIDES}
    for k, (label, ids) in enumerate(_by_class(entries).items()):
        if len(ids) < folds:
            raise DataError(
                f"class {label} has {len(ids)} usable image(s): fewer than {folds} folds"
            )
        order = rng.permutation(ids)
        assignment = (np.arange(len(ids)) + k) % folds  # offset per class balances fold sizes
        rest = order[assignment != fold].tolist()
        n_val = int(round(len(rest) * val_fraction))
        split["test"] += order[assignment == fold].tolist()
        split["val"] += rest[:n_val]
        split["train"] += rest[n_val:]
    return {side: sorted(ids) for side, ids in split.items()}


def fixed_split(
    entries: list[IndexEntry],
    sides: Mapping[str, str],
    val_fraction: float = 0.2,
    seed: int = 2019,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """A split whose sides are given (``sides``: image_id -> train/val/test).

    The test side is kept as it is. Unless ``sides`` names val images, val is carved out of
    the training side: ``val_fraction`` of it in whole groups, stratified by class and seeded,
    so that the reported images never choose a checkpoint.
    """
    usable = [e for e in entries if e.usable]
    split = {s: sorted(e.image_id for e in usable if sides[e.image_id] == s) for s in SIDES}
    if split["val"] or val_fraction == 0:
        return split
    train = set(split["train"])
    inside = [e for e in usable if e.image_id in train]
    ids, labels, group = _grouped(inside, groups or {i: i for i in train})
    ratio = np.array([1 - val_fraction, val_fraction])
    split["train"], split["val"] = _grouped_sides(ids, labels, group, ratio, seed)
    return split


def eva_sides(entries: list[IndexEntry], spec: SplitSpec) -> dict[str, str]:
    """image_id -> eva's side of it (``train``, or ``test`` for eva's reported val images).

    Raises:
        DataError: listing the files that are no BACH image (a renamed copy needs
            ``data.bach_names``).
    """
    usable = [e for e in entries if e.usable]
    names = bach_names(usable, spec.bach_names, spec.data_dir, spec.labels_csv)
    if unnamed := [e.path for e in usable if names[e.image_id] is None]:
        raise DataError(
            f"data.split=eva needs BACH's file names (b001.tif ... n100.tif), and "
            f"{len(unnamed)} file(s) have none, e.g. "
            + ", ".join(unnamed[:3])
            + ": for a renamed copy set data.bach_names=<label-CSV column of BACH names>"
        )
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


def _file_token(path: str | Path) -> str:
    """The split file's content hash: an edited file makes a new split."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.split_file={path}: no such file")
    return hashlib.sha1(path.read_bytes()).hexdigest()[:8]


# -- by source group ------------------------------------------------------------------------
def _grouped(
    entries: list[IndexEntry], groups: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, labels, groups) of the usable entries, sorted by id."""
    usable = sorted((e for e in entries if e.usable), key=lambda e: e.image_id)
    missing = [e.image_id for e in usable if e.image_id not in groups]
    if missing:
        raise DataError(f"{len(missing)} image(s) have no group, e.g. {missing[0]}")
    return (
        np.array([e.image_id for e in usable]),
        np.array([e.label for e in usable]),
        np.array([groups[e.image_id] for e in usable]),
    )


def _groups_per_class(labels: np.ndarray, groups: np.ndarray) -> dict[str, int]:
    """How many groups hold images of each class present."""
    return {c: len(set(groups[labels == c])) for c in CLASSES if (labels == c).any()}


def _fold_plan(ratio: np.ndarray, max_folds: int) -> np.ndarray | None:
    """Folds per side whose shares best match ``ratio``, at most ``max_folds`` in all.

    Returns None when no fold count gives every side with a positive ratio a fold.
    """
    target = ratio / ratio.sum()
    best, best_error = None, np.inf
    for n in range(int((ratio > 0).sum()), max_folds + 1):
        plan = _largest_remainder(n, ratio)
        error = np.abs(plan / n - target).max()
        if (plan[ratio > 0] > 0).all() and error < best_error - 1e-9:
            best, best_error = plan, error
    return best


def _grouped_sides(
    ids: np.ndarray, labels: np.ndarray, groups: np.ndarray, ratio: np.ndarray, seed: int
) -> list[list[str]]:
    """Whole groups onto ``len(ratio)`` sides, stratified by class.

    ``StratifiedGroupKFold`` deals the groups into n folds, n chosen (up to the fewest groups
    of any class) so that whole folds per side best match the ratios; side k takes the next
    ``plan[k]`` folds.
    """
    per_class = _groups_per_class(labels, groups)
    fewest = min(per_class, key=per_class.get)
    plan = _fold_plan(ratio, min(per_class[fewest], MAX_FOLDS))
    if plan is None:
        raise DataError(
            f"class {fewest} has only {per_class[fewest]} source group(s): too few for a "
            f"{_ratio_text(ratio)} split that keeps each group on one side (use coarser "
            "ratios or finer data.groups)"
        )
    fold_of = np.zeros(len(ids), dtype=int)
    if plan.sum() > 1:
        dealer = StratifiedGroupKFold(int(plan.sum()), shuffle=True, random_state=seed)
        for k, (_, held) in enumerate(dealer.split(ids, labels, groups)):
            fold_of[held] = k
    side_of = np.repeat(np.arange(len(plan)), plan)[fold_of]
    for k in np.flatnonzero(ratio > 0):
        if absent := set(per_class) - set(labels[side_of == k]):
            raise DataError(
                f"the source groups of class {sorted(absent)[0]} are too few or too uneven "
                f"for a {_ratio_text(ratio)} split: one side would have none of it"
            )
    return [sorted(ids[side_of == k].tolist()) for k in range(len(plan))]


def _grouped_kfold(
    entries: list[IndexEntry],
    groups: Mapping[str, str],
    folds: int,
    fold: int,
    val_fraction: float,
    seed: int,
) -> dict[str, list[str]]:
    """``kfold_split`` along whole groups: ``StratifiedGroupKFold`` for test, then val."""
    ids, labels, group = _grouped(entries, groups)
    for label, n in _groups_per_class(labels, group).items():
        if n < folds:
            raise DataError(f"class {label} has {n} source group(s): fewer than {folds} folds")
    dealer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    _, held = list(dealer.split(ids, labels, group))[fold]
    rest = np.ones(len(ids), dtype=bool)
    rest[held] = False
    ratio = np.array([1 - val_fraction, val_fraction])
    train, val = _grouped_sides(ids[rest], labels[rest], group[rest], ratio, seed)
    return {"train": train, "val": val, "test": sorted(ids[held].tolist())}


def crossing_groups(split: Mapping[str, Sequence[str]], groups: Mapping[str, str]) -> list[str]:
    """Groups with images on more than one side of ``split`` (empty for a leak-free split)."""
    sides: dict[str, set[str]] = defaultdict(set)
    for side in SIDES:
        for image_id in split[side]:
            sides[groups.get(image_id, image_id)].add(side)
    return sorted(g for g, s in sides.items() if len(s) > 1)


def split_summary(
    split: Mapping[str, Sequence[str]],
    groups: Mapping[str, str] | None = None,
    spec: SplitSpec | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict:
    """Images, source groups and classes on each side, and a line a report can print.

    Args:
        split: side -> image ids.
        groups: image_id -> source group (None: by image).
        spec: the split's settings, for its protocol and grouping.
        labels: image_id -> class, for the classes per side (the achieved stratification).

    Returns:
        ``{"protocol", "groups", "n_images": {side: n}, "n_groups": {side: n}, "n_classes":
        {side: {class: n}}, "text": "5-fold CV, fold 0 as test, grouped by bach: 130 train /
        30 val / 40 test images, 14/2/4 groups"}``.
    """
    spec = spec or SplitSpec()
    groups = groups or {}
    labels = labels or {}
    n_images = {side: len(split[side]) for side in SIDES}
    n_groups = {side: len({groups.get(i, i) for i in split[side]}) for side in SIDES}
    n_classes = {
        side: dict(sorted(Counter(labels[i] for i in split[side] if i in labels).items()))
        for side in SIDES
    }
    shown = [side for side in SIDES if n_images[side]]
    text = (
        f"{spec.protocol}: "
        + " / ".join(f"{n_images[side]} {side}" for side in shown)
        + " images, "
        + "/".join(str(n_groups[side]) for side in shown)
        + " groups"
    )
    return {
        "protocol": spec.protocol,
        "groups": spec.groups,
        "n_images": n_images,
        "n_groups": n_groups,
        "n_classes": n_classes,
        "text": text,
    }


# -- inner folds: the out-of-fold patch models --------------------------------------------
def inner_folds(
    split: Mapping[str, Sequence[str]],
    entries: list[IndexEntry],
    folds: int,
    seed: int,
    groups: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """The training images of ``split`` dealt into ``folds`` class-stratified folds, whole
    source groups kept together: what each out-of-fold patch model leaves out.

    Raises:
        DataError: a class with fewer training groups (images) than ``folds``.
    """
    train = set(split["train"])
    inside = [e for e in entries if e.image_id in train]
    ids, labels, group = _grouped(inside, groups or {i: i for i in train})
    for label, n in _groups_per_class(labels, group).items():
        if n < folds:
            raise DataError(
                f"class {label} has {n} source group(s) among the training images: fewer than "
                f"image.oof_folds={folds}"
            )
    dealer = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return [sorted(ids[held].tolist()) for _, held in dealer.split(ids, labels, group)]


def inner_name(outer: str, fold: int, folds: int) -> str:
    """Stem of inner split ``fold`` of ``folds`` inside the split file ``outer``."""
    return f"{outer}-inner{fold}of{folds}"


def inner_split(split: Mapping[str, Sequence[str]], held: Sequence[str]) -> dict[str, list[str]]:
    """Train without ``held``, the same val (model selection), ``held`` as the test side."""
    left_out = set(held)
    return {
        "train": [i for i in split["train"] if i not in left_out],
        "val": list(split["val"]),
        "test": sorted(held),
    }


# -- the split file -------------------------------------------------------------------------
def refit_split(split: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``split`` with its val images added to the training ones (``patch.refit``). They stay
    the val side too, for the logs: once trained on, they choose nothing."""
    train, val = list(split["train"]), list(split["val"])
    return {"train": train + val, "val": val, "test": list(split["test"])}


def split_name(spec: SplitSpec, data: str) -> str:
    """The split file's stem for these settings and ``data`` (the index's
    ``data_fingerprint``); writes nothing.

    Settings left at the values they had before a key existed stay out of the name (a k-fold
    split's ratios at the paper's), so earlier work dirs keep their splits.
    """
    grouping = f"-groups_{spec_token(spec.groups)}" if spec.groups is not None else ""
    if spec.bach_names and (spec.groups == "bach" or spec.split == "eva"):
        grouping += f"-names_{column_token(spec.bach_names)}"
    tail = f"{grouping}-seed{spec.seed}-{data}"
    val = f"-val{spec.val_fraction:g}"
    if spec.split_file is not None:
        return f"file-{_file_token(spec.split_file)}{val}{tail}"
    if spec.split == "eva":
        return f"eva{val}{tail}"
    ratios = "-".join(f"{r:g}" for r in spec.split)
    if spec.folds:
        shares = "" if spec.split == PAPER_RATIOS else f"-split{ratios}"
        return f"kfold{spec.folds}-fold{spec.fold}{shares}{tail}"
    return f"holdout-{ratios}{tail}"


def make_split(entries: list[IndexEntry], spec: SplitSpec) -> dict[str, list[str]]:
    """The split these settings draw (or, for a fixed split, read) from the data."""
    groups = spec.groups_of(entries)
    if spec.fixed:
        given = (
            file_sides(spec.split_file, entries)
            if spec.split_file is not None
            else eva_sides(entries, spec)
        )
        split = fixed_split(entries, given, spec.val_fraction, spec.seed, groups)
        if groups and (crossing := crossing_groups(split, groups)):
            log.warning(
                "the fixed split puts %d source group(s) on two sides (%s): numbers on it "
                "are not grouped by %s",
                len(crossing),
                ", ".join(crossing[:5]),
                spec.groups,
            )
        return split
    if spec.folds:
        ratios = spec.split
        val_fraction = ratios[1] / (ratios[0] + ratios[1])
        return kfold_split(entries, spec.folds, spec.fold, val_fraction, spec.seed, groups)
    return holdout_split(entries, spec.split, spec.seed, groups)


def load_or_make_split(
    work_dir: Path,
    entries: list[IndexEntry],
    spec: SplitSpec,
    inner: tuple[int, int] | None = None,
) -> tuple[dict[str, list[str]], Path]:
    """The split for these settings and data: read from ``work_dir/splits`` or made once.

    Args:
        work_dir: artifacts root.
        entries: the index.
        spec: the split's settings.
        inner: (k, K): inner split k of K of this split (``inner_split``) instead, the data
            of out-of-fold patch model k.

    Raises:
        DataError: too few groups for the split, a bad split file, or a split file read back
            whose groups cross sides (the group column changed since it was written: delete
            the file).
    """
    path = Path(work_dir) / "splits" / f"{split_name(spec, data_fingerprint(entries))}.json"
    groups = spec.groups_of(entries)
    if path.is_file():
        split = json.loads(path.read_text())
        if groups and not spec.fixed and (crossing := crossing_groups(split, groups)):
            raise DataError(
                f"{path}: groups on two sides ({', '.join(crossing[:5])}): the groups changed "
                "since this split was written; delete it to make a new one"
            )
    else:
        split = make_split(entries, spec)
        write_json(path, split)
        labels = {e.image_id: e.label for e in entries}
        log.info("split %s: %s", path.name, split_summary(split, groups, spec, labels)["text"])
    if inner is None:
        return split, path
    k, n = inner
    inner_path = path.with_name(f"{inner_name(path.stem, k, n)}.json")
    if not inner_path.is_file():
        held = inner_folds(split, entries, n, spec.seed, groups)[k]
        write_json(inner_path, inner_split(split, held))
    return json.loads(inner_path.read_text()), inner_path
