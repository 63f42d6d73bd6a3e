"""A split's settings, its file's name, and the split read back or made once.

Four protocols (``SplitSpec.protocol``): a hold-out split by ratios (``data.split``), k-fold
(``data.folds``), eva's published BACH split (``data.split=eva``, ``breastnet.data.published``)
and a split file of the user's (``data.split_file``). ``breastnet.data.protocols`` draws them,
``breastnet.data.sides`` reads the sides a fixed split is given, ``breastnet.data.inner``
deals the inner splits of the out-of-fold patch models.

A split is written once to ``work_dir/splits/<name>.json`` and read back by every later
stage and rerun. The name carries the settings, a fingerprint of the data and a hash of what
else decides the split (``split_sources``: the resolved source groups, eva's BACH names), so
new or changed images, a corrected group column or BACH-name column make a new split rather
than reuse one drawn on other groups or other images. With ``data.groups`` (see
``breastnet.data.groups``) every image of one source (patient, slide, a block of BACH file
numbers) stays on one side, and the name says so.
"""

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from breastnet.artifacts import config_hash, write_json
from breastnet.data.bach import DataError, IndexEntry, data_fingerprint
from breastnet.data.groups import (
    AUTO,
    column_token,
    resolve_groups,
    resolve_spec,
    spec_token,
    warn_once,
)
from breastnet.data.inner import inner_folds, inner_split
from breastnet.data.protocols import (
    SIDES,
    crossing_groups,
    fixed_split,
    holdout_split,
    kfold_split,
    ratio_text,
)
from breastnet.data.sides import eva_names, eva_sides, file_sides, file_token

log = logging.getLogger(__name__)

PAPER_RATIOS = (0.7, 0.2, 0.1)  # Yan et al.'s; k-fold split names give other ratios
PRESETS = ("eva",)  # published splits that data.split can name


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
            kind = (
                "eva's patient-aware BACH split (those of its 132 reported images in the data "
                "set as test)"
            )
        elif self.folds:
            kind = f"{self.folds}-fold CV, fold {self.fold} as test"
        else:
            kind = f"hold-out {ratio_text(self.split)}"
        if self.fixed:
            return f"{kind}, val carved from its training side {grouping}"
        return f"{kind}, {grouping}"

    def resolved(self, entries: list[IndexEntry]) -> "SplitSpec":
        """These settings with ``data.groups=auto`` replaced by what it comes to for
        ``entries`` (``groups.resolve_spec``), so names and protocol lines say the grouping
        used."""
        if self.groups != AUTO:
            return self
        found = resolve_spec(entries, AUTO, self.data_dir, self.labels_csv, self.bach_names)
        return replace(self, groups=found)

    def groups_of(self, entries: list[IndexEntry]) -> dict[str, str] | None:
        """image_id -> source group (None: by image)."""
        groups = self.resolved(entries).groups
        if groups is None:
            return None
        return resolve_groups(entries, groups, self.data_dir, self.labels_csv, self.bach_names)


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


def refit_split(split: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``split`` with its val images added to the training ones (``patch.refit``). They stay
    the val side too, for the logs: once trained on, they choose nothing."""
    train, val = list(split["train"]), list(split["val"])
    return {"train": train + val, "val": val, "test": list(split["test"])}


# -- the split file -------------------------------------------------------------------------
def inner_name(outer: str, fold: int, folds: int) -> str:
    """Stem of inner split ``fold`` of ``folds`` inside the split file ``outer``."""
    return f"{outer}-inner{fold}of{folds}"


def split_sources(spec: SplitSpec, entries: list[IndexEntry]) -> dict[str, dict[str, str]]:
    """What decides the split besides its settings and the images: the resolved source
    groups (image -> group) of a grouped split, eva's BACH names (image -> name).

    Both may come from a label CSV (``data.groups=<column>``, ``data.bach_names``) whose
    content the data fingerprint does not see: a corrected column must make a new split.
    """
    spec = spec.resolved(entries)
    found = {}
    if (groups := spec.groups_of(entries)) is not None:
        found["groups"] = groups
    if spec.split == "eva" and spec.split_file is None:
        names = eva_names(entries, spec.bach_names, spec.data_dir, spec.labels_csv)
        found["names"] = {i: name.name for i, name in names.items()}
    return found


def split_name(spec: SplitSpec, entries: list[IndexEntry]) -> str:
    """The split file's stem for these settings and images; writes nothing.

    ``<protocol>[-groups_<grouping>][-names_<column>]-seed<seed>-<data>[-<sources>]``:
    ``<data>`` is the index's ``data_fingerprint``, ``<sources>`` the hash of
    ``split_sources`` (a grouped or eva split), a split file's content hash is in its
    protocol (``file-<hash>``). ``data.groups=auto`` is named by what it resolves to (by
    image: the name of ``data.groups=null``). Settings left at the values they had before a
    key existed stay out of the name (a k-fold split's ratios at the paper's), so earlier
    work dirs keep their splits by image.
    """
    spec = spec.resolved(entries)
    grouping = f"-groups_{spec_token(spec.groups)}" if spec.groups is not None else ""
    if spec.bach_names and (spec.groups == "bach" or spec.split == "eva"):
        grouping += f"-names_{column_token(spec.bach_names)}"
    sources = split_sources(spec, entries)
    data = data_fingerprint(entries) + (f"-{config_hash(sources, 8)}" if sources else "")
    tail = f"{grouping}-seed{spec.seed}-{data}"
    val = f"-val{spec.val_fraction:g}"
    if spec.split_file is not None:
        return f"file-{file_token(spec.split_file)}{val}{tail}"
    if spec.split == "eva":
        return f"eva{val}{tail}"
    ratios = "-".join(f"{r:g}" for r in spec.split)
    if spec.folds:
        shares = "" if spec.split == PAPER_RATIOS else f"-split{ratios}"
        return f"kfold{spec.folds}-fold{spec.fold}{shares}{tail}"
    return f"holdout-{ratios}{tail}"


def make_split(entries: list[IndexEntry], spec: SplitSpec) -> dict[str, list[str]]:
    """The split these settings draw (or, for a fixed split, read) from the data; a fixed
    split may cross source groups (``load_or_make_split`` warns)."""
    spec = spec.resolved(entries)
    groups = spec.groups_of(entries)
    if spec.fixed:
        given = (
            file_sides(spec.split_file, entries)
            if spec.split_file is not None
            else eva_sides(entries, spec.bach_names, spec.data_dir, spec.labels_csv)
        )
        return fixed_split(entries, given, spec.val_fraction, spec.seed, groups)
    if spec.folds:
        ratios = spec.split
        val_fraction = ratios[1] / (ratios[0] + ratios[1])
        return kfold_split(entries, spec.folds, spec.fold, val_fraction, spec.seed, groups)
    return holdout_split(entries, spec.split, spec.seed, groups)


def _check_groups(
    split: Mapping[str, Sequence[str]],
    groups: Mapping[str, str] | None,
    spec: SplitSpec,
    path: Path,
) -> None:
    """Whether a source group lies on two sides of the split file ``path``: a fixed split is
    taken as given (eva's is published as it is), so a warning; a drawn one never crosses
    when made, so a crossing one was edited since: an error.

    Raises:
        DataError: a drawn split whose groups cross.
    """
    if not groups or not (crossing := crossing_groups(split, groups)):
        return
    shown = ", ".join(crossing[:5])
    if spec.fixed:
        warn_once(
            log,
            f"the fixed split {path.name} puts {len(crossing)} source group(s) on two sides "
            f"({shown}): numbers on it are not grouped by {spec.groups}",
        )
        return
    raise DataError(
        f"{path}: groups on two sides ({shown}), which a split drawn by these settings never "
        "has: the file was edited since it was written; delete it to make a new one"
    )


def load_or_make_split(
    work_dir: Path,
    entries: list[IndexEntry],
    spec: SplitSpec,
    inner: tuple[int, int] | None = None,
) -> tuple[dict[str, list[str]], Path]:
    """The split for these settings and data: read from ``work_dir/splits`` or made once;
    either way checked for groups on two sides (``_check_groups``).

    Args:
        work_dir: artifacts root.
        entries: the index.
        spec: the split's settings.
        inner: (k, K): inner split k of K of this split (``inner.inner_split``) instead, the
            data of out-of-fold patch model k.

    Raises:
        DataError: too few groups for the split, a bad split file, eva's split of files
            without BACH names, or a drawn split file read back whose groups cross sides.
    """
    spec = spec.resolved(entries)
    path = Path(work_dir) / "splits" / f"{split_name(spec, entries)}.json"
    groups = spec.groups_of(entries)
    if path.is_file():
        split = json.loads(path.read_text())
    else:
        split = make_split(entries, spec)
        write_json(path, split)
        labels = {e.image_id: e.label for e in entries}
        log.info("split %s: %s", path.name, split_summary(split, groups, spec, labels)["text"])
    _check_groups(split, groups, spec, path)
    if inner is None:
        return split, path
    k, n = inner
    inner_path = path.with_name(f"{inner_name(path.stem, k, n)}.json")
    if not inner_path.is_file():
        held = inner_folds(split, entries, n, spec.seed, groups)[k]
        write_json(inner_path, inner_split(split, held))
    return json.loads(inner_path.read_text()), inner_path
