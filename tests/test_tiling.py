"""The tile grid follows the image size and keeps row-major (row, col) order."""

import numpy as np
import pytest

from breastnet.data.tiling import grid_shape, tile_image


@pytest.mark.parametrize(
    ("height", "width", "shape"),
    [(1536, 2048, (3, 4)), (1536, 1536, (3, 3)), (512, 512, (1, 1)), (1000, 1600, (1, 3))],
)
def test_grid_follows_the_image_size(height: int, width: int, shape: tuple[int, int]) -> None:
    assert grid_shape(height, width, 512, 512) == shape


def test_bach_image_gives_twelve_patches_in_row_major_order() -> None:
    image = np.zeros((1536, 2048, 3), np.uint8)
    for r in range(3):
        for c in range(4):
            image[r * 512 : (r + 1) * 512, c * 512 : (c + 1) * 512] = (r, c, 10 * r + c)
    patches, positions = tile_image(image, 512, 512, 299)
    assert patches.shape == (12, 299, 299, 3) and patches.dtype == np.uint8
    assert positions.tolist() == [[r, c] for r in range(3) for c in range(4)]
    assert [tuple(p[150, 150]) for p in patches] == [
        (r, c, 10 * r + c) for r in range(3) for c in range(4)
    ]


def test_tiles_are_exact_crops_and_the_grid_is_centred() -> None:
    image = np.random.default_rng(0).integers(0, 255, (300, 250, 3), dtype=np.uint8)
    patches, positions = tile_image(image, 100, 100, 100)
    assert positions.tolist() == [[r, c] for r in range(3) for c in range(2)]
    # 250 wide holds 2 tiles: 25 px trimmed on each side; 300 high holds 3 exactly.
    assert np.array_equal(patches[0], image[0:100, 25:125])
    assert np.array_equal(patches[5], image[200:300, 125:225])


def test_overlapping_stride() -> None:
    patches, positions = tile_image(np.zeros((512, 768, 3), np.uint8), 512, 128, 64)
    assert patches.shape == (3, 64, 64, 3) and positions[:, 1].tolist() == [0, 1, 2]


def test_image_smaller_than_a_tile() -> None:
    with pytest.raises(ValueError, match="image 300x400 is smaller than one 512x512 tile"):
        tile_image(np.zeros((400, 300, 3), np.uint8), 512, 512, 299)
