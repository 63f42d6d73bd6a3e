"""Cut an image into a grid of square tiles that follows the image size."""

import cv2
import numpy as np


def grid_shape(height: int, width: int, tile_size: int, stride: int) -> tuple[int, int]:
    """Rows and columns of the tile grid: 1536x2048 -> (3, 4), 1536x1536 -> (3, 3) at 512."""
    if height < tile_size or width < tile_size:
        raise ValueError(
            f"image {width}x{height} is smaller than one {tile_size}x{tile_size} tile"
        )
    return (height - tile_size) // stride + 1, (width - tile_size) // stride + 1


def tile_image(
    image: np.ndarray, tile_size: int, stride: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tile an RGB image row-major and resize each tile to ``patch_size``.

    The grid is centred: what does not fit a whole tile is trimmed evenly from both sides.

    Returns:
        patches: uint8 [N, patch_size, patch_size, 3] in row-major grid order.
        positions: int16 [N, 2], the (row, col) of each patch.
    """
    height, width = image.shape[:2]
    rows, cols = grid_shape(height, width, tile_size, stride)
    top = (height - ((rows - 1) * stride + tile_size)) // 2
    left = (width - ((cols - 1) * stride + tile_size)) // 2
    patches = np.empty((rows * cols, patch_size, patch_size, 3), dtype=np.uint8)
    positions = np.empty((rows * cols, 2), dtype=np.int16)
    for k, (r, c) in enumerate(np.ndindex(rows, cols)):
        y, x = top + r * stride, left + c * stride
        tile = image[y : y + tile_size, x : x + tile_size]
        if patch_size != tile_size:
            tile = cv2.resize(tile, (patch_size, patch_size), interpolation=cv2.INTER_AREA)
        patches[k] = tile
        positions[k] = (r, c)
    return patches, positions
