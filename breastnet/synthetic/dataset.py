"""Generated H&E-like microscopy images in BACH layout, for the demo and the tests.

Real BACH images may not ship with the repository (CC BY-NC-ND), yet the demo and the tests
should go through the same ingest code as real data: this writes rendered images
(``breastnet.synthetic.render``) as class folders of files.

    python -m breastnet.synthetic data/demo --n-per-class 12
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from breastnet import CLASSES
from breastnet.synthetic.render import render_image

#: BACH file-name prefixes, in ``CLASSES`` order (``Normal/n000.tif``, ``InSitu/is000.tif``).
PREFIXES: tuple[str, ...] = ("n", "b", "is", "iv")
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}


def image_rng(seed: int, label: int, index: int) -> np.random.Generator:
    """The generator of one file, so each image depends only on (seed, class, index)."""
    return np.random.default_rng([seed, label, index])


def _save_atomic(image: np.ndarray, path: Path, fmt: str) -> None:
    """Write to a temporary name beside ``path`` then rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(image).save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


GENERATED = "Generated data: NOT real microscopy."  # README.txt's first line: what marks them
README = f"""\
{GENERATED}

Synthetic H&E-like images written by breastnet.synthetic (first run: seed {{seed}},
{{n}} per class, {{width}}x{{height}}), in the BACH layout: one folder per class, the folder
name is the label. They exist so the demo and the tests run the same ingest code as real
BACH data; any accuracy measured on them says nothing about real tissue.
"""


def _write(
    out_dir: Path, n_per_class: int, width: int, height: int, seed: int, ext: str
) -> dict[str, tuple[int, int]]:
    """Write missing images; return {class: (written, skipped)}."""
    ext = ext.lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(f"ext must be one of {sorted(FORMATS)}, got {ext!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for label, (name, prefix) in enumerate(zip(CLASSES, PREFIXES, strict=True)):
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        written = skipped = 0
        for i in range(n_per_class):
            path = folder / f"{prefix}{i:03d}.{ext}"
            if path.exists():
                skipped += 1
                continue
            image = render_image(label, width, height, image_rng(seed, label, i))
            _save_atomic(image, path, FORMATS[ext])
            written += 1
        counts[name] = (written, skipped)
    readme = out_dir / "README.txt"
    if not readme.exists():
        text = README.format(seed=seed, n=n_per_class, width=width, height=height)
        tmp = readme.with_name(f".README.txt.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, readme)
    return counts


def is_generated(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds images written by ``write_synthetic_dataset`` (its
    README.txt says so): a model trained on them has never seen real tissue."""
    readme = Path(data_dir).expanduser() / "README.txt"
    try:
        return readme.read_text().startswith(GENERATED)
    except OSError:
        return False


def write_synthetic_dataset(
    out_dir: str | Path,
    n_per_class: int = 12,
    width: int = 512,
    height: int = 384,
    seed: int = 0,
    ext: str = "png",
) -> Path:
    """Write ``out_dir/<Class>/<prefix><NNN>.<ext>`` images, skipping files already there.

    Each image depends only on (seed, class, index): the same seed gives byte-identical
    files, and a larger ``n_per_class`` only adds files.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    _write(out_dir, n_per_class, width, height, seed, ext)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: write a synthetic dataset and say what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m breastnet.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", type=Path, help="folder to write Normal/ Benign/ ... into")
    parser.add_argument("--n-per-class", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ext", default="png", choices=sorted(FORMATS))
    args = parser.parse_args(argv)
    counts = _write(args.out_dir, args.n_per_class, args.width, args.height, args.seed, args.ext)
    for name, (written, skipped) in counts.items():
        print(f"{args.out_dir / name}: wrote {written}, kept {skipped} existing")
    total = sum(c[0] for c in counts.values())
    print(f"{total} synthetic {args.width}x{args.height} .{args.ext} images in {args.out_dir}")
