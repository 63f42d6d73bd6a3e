"""The tile grid follows the image size and keeps row-major (row, col) order; sides that are
not whole tiles are trimmed, padded or covered by overlapping tiles."""

import numpy as np
import pytest

from breastnet.data.store import Tiling
from breastnet.data.tiling import FITS, grid_shape, tile_image
from breastnet.errors import ConfigError

from conftest import tissue_like


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
    with pytest.raises(ValueError, match="image 300x400 is smaller than one 512x512 tile.*pad"):
        tile_image(np.zeros((400, 300, 3), np.uint8), 512, 512, 299)


@pytest.mark.parametrize(
    ("height", "width", "stride"), [(1536, 2048, 512), (1536, 1536, 512), (512, 768, 128)]
)
def test_every_fit_cuts_the_same_tiles_from_whole_grids(
    height: int, width: int, stride: int
) -> None:
    image = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    trimmed, positions = tile_image(image, 512, stride, 64)
    for fit in FITS[1:]:
        patches, fit_positions = tile_image(image, 512, stride, 64, fit)
        assert np.array_equal(patches, trimmed) and np.array_equal(fit_positions, positions)


def test_a_700x460_image_is_padded_or_overlapped() -> None:
    """At 512 px tiles: pad makes it 1024x512 (1x2 tiles, white margins evenly around it);
    overlap pads 460 to 512 and puts 2 tiles at x = 0 and 188 (324 px shared)."""
    image = tissue_like(0, 460, 700)  # no pixel is white
    with pytest.raises(ValueError, match="image 700x460 is smaller than one 512x512 tile"):
        tile_image(image, 512, 512, 512)
    padded, positions = tile_image(image, 512, 512, 512, "pad")
    assert padded.shape == (2, 512, 512, 3) and positions.tolist() == [[0, 0], [0, 1]]
    whole = np.concatenate(list(padded), axis=1)  # 512 x 1024: 26 px above and below, 162 aside
    assert np.array_equal(whole[26:486, 162:862], image)
    whole[26:486, 162:862] = 255
    assert (whole == 255).all()
    overlapped, positions = tile_image(image, 512, 512, 512, "overlap")
    assert overlapped.shape == (2, 512, 512, 3) and positions.tolist() == [[0, 0], [0, 1]]
    assert np.array_equal(overlapped[0, 26:486], image[:, :512])
    assert np.array_equal(overlapped[1, 26:486], image[:, 188:])
    assert (overlapped[:, :26] == 255).all() and (overlapped[:, 486:] == 255).all()
    assert grid_shape(460, 700, 512, 512, "pad") == grid_shape(460, 700, 512, 512, "overlap")


def test_overlap_spreads_tiles_evenly() -> None:
    """1000 px at 512 every 256: ceil(488/256) + 1 = 3 tiles, at 0, 244 and 488."""
    image = np.zeros((512, 1000, 3), np.uint8)
    image[:, :, 0] = np.arange(1000) % 256
    image[:, :, 1] = np.arange(1000) // 256
    patches, _ = tile_image(image, 512, 256, 512, "overlap")
    starts = [int(p[0, 0, 1]) * 256 + int(p[0, 0, 0]) for p in patches]
    assert starts == [0, 244, 488]


def test_an_unknown_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="fit must be one of trim, pad, overlap"):
        tile_image(np.zeros((512, 512, 3), np.uint8), 512, 512, 64, "stretch")
    with pytest.raises(ConfigError, match="fit must be one of"):
        Tiling(fit="stretch")
