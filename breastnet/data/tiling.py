"""Cut an image into a grid of square tiles that follows the image size.

A side that is not a whole number of strides is fitted by one of three rules, per axis:

- ``trim``: whole tiles, the grid centred, the remainder trimmed evenly from both ends; an
  image smaller than a tile is an error (the training data's rule: no tile is made up).
- ``pad``: white background added evenly to both ends up to the next whole grid, which is
  then cut exactly (nothing of the image is lost; edge tiles are partly blank).
- ``overlap``: just enough tiles to cover the side, spread evenly from end to end, so the
  last ones overlap; a side shorter than one tile is padded (white, centred) to one tile.

All three cut the same tiles from a side of exactly ``tile + k * stride`` px (BACH's 2048 and
1536 at 512).
"""

import math

import cv2
import numpy as np

FITS = ("trim", "pad", "overlap")
BACKGROUND = 255  # white: a bright slide background, as the tissue mask sees it


def _axis(length: int, tile: int, stride: int, fit: str) -> tuple[int, int, list[int]]:
    """One axis of the grid: (padding before, padding after, tile starts in the padded side)."""
    if fit == "trim":
        n = (length - tile) // stride + 1
        offset = (length - ((n - 1) * stride + tile)) // 2
        return 0, 0, [offset + k * stride for k in range(n)]
    if fit == "pad":
        padded = max(length, tile)
        padded += -(padded - tile) % stride
    elif fit == "overlap":
        padded = max(length, tile)
    else:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    before = (padded - length) // 2
    n = math.ceil((padded - tile) / stride) + 1
    if fit == "pad" or n == 1:
        starts = [k * stride for k in range(n)]
    else:
        starts = [round(k * (padded - tile) / (n - 1)) for k in range(n)]
    return before, padded - length - before, starts


def _check_fits(height: int, width: int, tile_size: int, fit: str) -> None:
    if fit == "trim" and (height < tile_size or width < tile_size):
        raise ValueError(
            f"image {width}x{height} is smaller than one {tile_size}x{tile_size} tile; "
            "fit=pad or fit=overlap (data.fit, predict.fit) tiles it with white padding"
        )


def grid_shape(
    height: int, width: int, tile_size: int, stride: int, fit: str = "trim"
) -> tuple[int, int]:
    """Rows and columns of the tile grid: 1536x2048 -> (3, 4), 1536x1536 -> (3, 3) at 512."""
    _check_fits(height, width, tile_size, fit)
    return (
        len(_axis(height, tile_size, stride, fit)[2]),
        len(_axis(width, tile_size, stride, fit)[2]),
    )


def tile_origins(height: int, width: int, tile_size: int, stride: int, fit: str) -> np.ndarray:
    """The (y, x) top-left corner of each tile, row-major as ``tile_image`` cuts them, in the
    pixels of the (padded) image: where a figure draws overlapping tiles. int [N, 2]."""
    _check_fits(height, width, tile_size, fit)
    ys = _axis(height, tile_size, stride, fit)[2]
    xs = _axis(width, tile_size, stride, fit)[2]
    return np.array([(y, x) for y in ys for x in xs], dtype=int).reshape(-1, 2)


def tile_image(
    image: np.ndarray, tile_size: int, stride: int, patch_size: int, fit: str = "trim"
) -> tuple[np.ndarray, np.ndarray]:
    """Tile an RGB image row-major by the ``fit`` rule and resize each tile to ``patch_size``.

    Returns:
        patches: uint8 [N, patch_size, patch_size, 3] in row-major grid order.
        positions: int16 [N, 2], the (row, col) grid index of each patch.
    """
    height, width = image.shape[:2]
    _check_fits(height, width, tile_size, fit)
    top, bottom, ys = _axis(height, tile_size, stride, fit)
    left, right, xs = _axis(width, tile_size, stride, fit)
    if top or bottom or left or right:
        image = np.pad(image, ((top, bottom), (left, right), (0, 0)), constant_values=BACKGROUND)
    patches = np.empty((len(ys) * len(xs), patch_size, patch_size, 3), dtype=np.uint8)
    positions = np.empty((len(ys) * len(xs), 2), dtype=np.int16)
    for k, (r, c) in enumerate(np.ndindex(len(ys), len(xs))):
        tile = image[ys[r] : ys[r] + tile_size, xs[c] : xs[c] + tile_size]
        if patch_size != tile_size:
            tile = cv2.resize(tile, (patch_size, patch_size), interpolation=cv2.INTER_AREA)
        patches[k] = tile
        positions[k] = (r, c)
    return patches, positions
