"""A labelled BACH-layout set made over as another lab would hand it over, to test external
evaluation: another pixel size (written in the TIFF resolution tags), another image size,
and other label names.

By default the labels become the 2-class folders of sets such as UCSB's and BreakHis:
``Malignant`` (InSitu, Invasive) and ``Benign`` (Normal and Benign: there, benign means
non-carcinoma, which ``predict.label_map='{Benign: non_carcinoma, Malignant: carcinoma}'``
says). ``python -m breastnet.synthetic.rescan SOURCE OUT --mpp 0.21``.
"""

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from breastnet.data.bach import find_images, read_rgb
from breastnet.labels import LabelMap

BACH_MPP = 0.42
TWO_CLASS_FOLDERS = {
    "Normal": "Benign",
    "Benign": "Benign",
    "InSitu": "Malignant",
    "Invasive": "Malignant",
}


def centre_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The centre ``width`` x ``height`` of an image (whole sides where it is smaller)."""
    top = max(0, (image.shape[0] - height) // 2)
    left = max(0, (image.shape[1] - width) // 2)
    return image[top : top + height, left : left + width]


def rescan(
    source: Path,
    out: Path,
    mpp: float = BACH_MPP,
    source_mpp: float = BACH_MPP,
    crop: tuple[int, int] | None = None,
    folders: Mapping[str, str] = TWO_CLASS_FOLDERS,
    image_ids: Iterable[str] | None = None,
    tags: bool = True,
) -> list[Path]:
    """Write the images of ``source`` (class folders) into ``out/<folder>/``.

    Args:
        source: a BACH-layout folder at ``source_mpp`` microns per pixel.
        out: where the made-over set goes.
        mpp: its pixel size: each image is resized by ``source_mpp / mpp``.
        crop: (width, height) of the centre crop taken after resizing, e.g. BreakHis's
            (700, 460); None keeps the whole image.
        folders: class name -> the folder (label name) its images go to.
        image_ids: the source images to use (``Class/name`` without suffix); None: all.
        tags: write TIFFs with ``mpp`` in their resolution tags; False: PNGs without it.

    Returns:
        The written files.
    """
    source, out = Path(source), Path(out)
    wanted = None if image_ids is None else set(image_ids)
    labels = LabelMap(groups=False)
    written = []
    for path in find_images(source):
        image_id = path.relative_to(source).with_suffix("").as_posix()
        label = labels.folder(path, source)
        if label is None or (wanted is not None and image_id not in wanted):
            continue
        image = read_rgb(path)[0]
        scale = source_mpp / mpp
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        grow = scale > 1
        image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if grow else cv2.INTER_AREA)
        if crop is not None:
            image = centre_crop(image, *crop)
        target = out / folders[label] / f"{path.stem}.{'tif' if tags else 'png'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        tiff = {"dpi": (25400 / mpp, 25400 / mpp), "compression": "tiff_deflate"}
        Image.fromarray(image).save(target, **(tiff if tags else {}))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    """CLI: make over a labelled folder and say what was written."""
    parser = argparse.ArgumentParser(
        prog="python -m breastnet.synthetic.rescan", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", type=Path, help="BACH-layout folder (class folders)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--mpp", type=float, default=BACH_MPP, help="pixel size to write")
    parser.add_argument("--source-mpp", type=float, default=BACH_MPP)
    parser.add_argument("--crop", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--ids", type=Path, help="file of image ids to use, one per line")
    parser.add_argument("--png", action="store_true", help="PNGs without a pixel size")
    args = parser.parse_args(argv)
    ids = args.ids.read_text().split() if args.ids else None
    written = rescan(
        args.source,
        args.out,
        args.mpp,
        args.source_mpp,
        args.crop,
        image_ids=ids,
        tags=not args.png,
    )
    print(f"{len(written)} images at {args.mpp} µm/px in {args.out}")


if __name__ == "__main__":
    main()
