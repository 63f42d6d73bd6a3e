"""BACH's published protocol: the organisers' patient ids and eva's patient-aware split.

Both speak of BACH's own file names (``b001.tif`` ... ``n100.tif``, 100 a class, 1-based):

- ``bach_patients.csv`` (beside this file) gives the patient of the 145 images that the
  organisers' patient file identifies (29 patients, ids 11-39); patients cross classes
  (patient 14: b070-b090, is058-is069, iv071-iv073). The other 255 images come from other
  patients, which BACH does not identify.
- eva (kaiko-ai/eva, ``Bach.val_index_ranges``) splits the 400 images by index ranges over
  their names sorted by class folder (Benign, InSitu, Invasive, Normal), then by name: 132
  ``val`` images, the ones it reports, and 268 ``train``. breastnet calls eva's val side
  ``test``, and carves its own model-selection images out of the training side, so the
  reported images never choose a checkpoint.

A renamed copy (bach-dev) says which BACH image each file is through a label-CSV column of
BACH names (``data.bach_names``); otherwise a file's own name is its BACH name.
"""

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

# eva's class order (torchvision's ImageFolder with eva's class_to_idx), and BACH's prefixes.
EVA_CLASS_ORDER = ("Benign", "InSitu", "Invasive", "Normal")
PREFIXES = {"b": "Benign", "is": "InSitu", "iv": "Invasive", "n": "Normal"}
IMAGES_PER_CLASS = 100
# eva's val ranges [start, stop) over the 400 sorted names: breastnet's test side.
EVA_TEST_RANGES = ((41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368))
_NAME = re.compile(r"(b|is|iv|n)(\d+)")


@dataclass(frozen=True)
class BachName:
    """One of BACH's 400 microscopy images, by class and 1-based number."""

    label: str
    number: int

    @property
    def index(self) -> int:
        """Its place among the 400 names as eva sorts them (0-399)."""
        return EVA_CLASS_ORDER.index(self.label) * IMAGES_PER_CLASS + self.number - 1

    @property
    def name(self) -> str:
        prefix = next(p for p, label in PREFIXES.items() if label == self.label)
        return f"{prefix}{self.number:03d}.tif"


def parse_bach_name(name: str) -> BachName | None:
    """``b001.tif``, ``Benign/b001.tif`` or ``IS042`` as a BACH image; None for any other
    name, a number outside 1-100 included."""
    match = _NAME.fullmatch(Path(name).stem.lower())
    if match is None or not 1 <= int(match.group(2)) <= IMAGES_PER_CLASS:
        return None
    return BachName(PREFIXES[match.group(1)], int(match.group(2)))


@cache
def bach_patients() -> dict[BachName, str]:
    """The organisers' patient id of each identified BACH image (145 of 400)."""
    text = resources.files("breastnet.data").joinpath("bach_patients.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return {parse_bach_name(row["bach_name"]): row["patient"] for row in rows}


def eva_side(image: BachName) -> str:
    """``test`` for the 132 images eva reports (its val side), ``train`` for the other 268."""
    inside = any(start <= image.index < stop for start, stop in EVA_TEST_RANGES)
    return "test" if inside else "train"
