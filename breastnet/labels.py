"""Label names as data sets spell them, mapped onto the four classes or BACH's two groups.

BACH scores a 2-class task beside the 4-class one: carcinoma (InSitu + Invasive) against
non-carcinoma (Normal + Benign). External sets often have only that (``Benign``/``Malignant``)
or other names for the classes; a label map (``data.label_map``, ``predict.label_map``) says
what their names mean. A name nothing maps is reported with its count of files, never
dropped silently.
"""

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from breastnet import CLASSES
from breastnet.errors import ConfigError

CARCINOMA: tuple[str, ...] = ("InSitu", "Invasive")
CARCINOMA_INDICES: list[int] = [CLASSES.index(c) for c in CARCINOMA]
GROUPS: tuple[str, ...] = ("non_carcinoma", "carcinoma")  # the 2-class view; 1 is positive

_ALIASES = {
    "normal": "Normal",
    "benign": "Benign",
    "insitu": "InSitu",
    "insitucarcinoma": "InSitu",
    "invasive": "Invasive",
    "invasivecarcinoma": "Invasive",
    "carcinoma": "carcinoma",
    "noncarcinoma": "non_carcinoma",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def canonical_label(name: str) -> str | None:
    """Map a folder or CSV spelling ('in_situ', 'In Situ', 'INVASIVE') to a class name."""
    label = _ALIASES.get(_key(name))
    return label if label in CLASSES else None


def group_index(class_index: int) -> int:
    """The 2-class group (``GROUPS`` index) of a class index: 1 for the carcinoma classes."""
    return int(class_index in CARCINOMA_INDICES)


class LabelMap:
    """A data set's label names onto class or group names: the built-in spellings, then a
    user map whose keys match the same way (case, spaces and punctuation ignored)."""

    def __init__(
        self,
        mapping: Mapping[str, str] | None = None,
        setting: str = "label_map",
        groups: bool = True,
    ) -> None:
        """``groups=False`` for training, which needs the four classes: a group name (built
        in or mapped to) is then unknown, and a map onto a group a ``ConfigError``."""
        self.setting = setting
        self.targets = (*CLASSES, *GROUPS) if groups else CLASSES
        self.names = {k: v for k, v in _ALIASES.items() if v in self.targets}
        self.user_keys: dict[str, str] = {}  # normalised key -> the key as written
        for raw, target in (mapping or {}).items():
            known = _ALIASES.get(_key(str(target)))
            if known not in self.targets:
                raise ConfigError(
                    f"{setting}: {raw!r} maps to {target!r}, which is not one of "
                    f"{', '.join(self.targets)}"
                )
            self.names[_key(str(raw))] = known
            self.user_keys[_key(str(raw))] = str(raw)

    def __call__(self, name: str) -> str | None:
        """The class or group name ``name`` stands for; None when nothing maps it."""
        return self.names.get(_key(name))

    def folder(self, path: Path, root: Path) -> str | None:
        """Label from the nearest enclosing folder under ``root`` that names one."""
        for parent in path.relative_to(root).parents:
            if parent.name and (label := self(parent.name)):
                return label
        return None

    def check_keys(self, found: Iterable[str]) -> None:
        """Fail on a map key that matches none of the label names ``found`` (folder names and
        CSV labels): a typo there leaves a class unlabelled and the score covers the others
        only, so it is a mistake, never a warning.

        Raises:
            ConfigError: naming each such key and the nearest label found (difflib).
        """
        names = {_key(n): n for n in found if _key(n)}
        unmatched = [raw for key, raw in self.user_keys.items() if key not in names]
        if not unmatched:
            return
        problems = []
        for raw in unmatched:
            near = difflib.get_close_matches(_key(raw), names, n=1, cutoff=0.5)
            hint = f"; did you mean {names[near[0]]!r}?" if near else ""
            problems.append(f"key {raw!r} matches no folder or CSV label{hint}")
        shown = ", ".join(sorted(names.values())[:12]) or "none"
        raise ConfigError(f"{self.setting}: {'; '.join(problems)} (labels found: {shown})")

    def unknown_report(self, unknown: Counter) -> str:
        """One line naming each unknown label with its count of files, and the fix."""
        names = ", ".join(f"{name!r} ({n} file{'s' * (n != 1)})" for name, n in unknown.items())
        example = f"{{{next(iter(unknown))}: {self.targets[-1]}}}"
        return (
            f"labels that are not one of {', '.join(self.targets)}: {names}; map them, "
            f"e.g. {self.setting}='{example}'"
        )


def csv_label(csv_labels: Mapping[str, str], path: Path, root: Path) -> str | None:
    """A file's label as a label CSV writes it: by its path under ``root``, else its name."""
    return csv_labels.get(path.relative_to(root).as_posix(), csv_labels.get(path.name))


def label_names(files: Iterable[Path], root: Path, csv_labels: Mapping[str, str]) -> set[str]:
    """Every name a label could come from: the folders the files sit in under ``root`` and
    the labels of the CSV (what ``LabelMap.check_keys`` checks a map against)."""
    names = set(csv_labels.values())
    for f in files:
        names.update(parent.name for parent in f.relative_to(root).parents if parent.name)
    return names


def unlabelled_folder(path: Path, root: Path) -> str | None:
    """The top folder a file sits in under ``root`` (what a class folder would be), None for
    a file directly in ``root``: the name an unknown label is reported by."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None
