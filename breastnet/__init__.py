"""breastnet: BACH breast-cancer H&E classification, from stain normalisation to image labels."""

import os

# albumentations otherwise checks PyPI for updates on import; W&B stays offline unless asked.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CLASSES: tuple[str, ...] = ("Normal", "Benign", "InSitu", "Invasive")
