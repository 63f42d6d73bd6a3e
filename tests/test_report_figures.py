"""The figures show what they claim: misclassified patches in the t-SNE, the original file
beside its heatmap."""

from pathlib import Path

import numpy as np
from PIL import Image

from breastnet import CLASSES
from breastnet.data.store import Tiling
from breastnet.data.tiling import tile_image, tile_origins
from breastnet.report import write_report
from breastnet.report.figures import plot_tsne
from breastnet.report.heatmap import _placed, file_title, plot_heatmap, tag_colour, tag_legend

from conftest import synthetic_results, write_image

GREEN = (0, 255, 0)  # no colour map or tile of these figures draws pure green


def test_tsne_marks_misclassified_patches(tmp_path: Path) -> None:
    results, _ = synthetic_results()
    ok = [r for r in results if r.error is None]
    expected = sum(
        int(((r.tissue >= 0.05) & (r.patch_probs.argmax(axis=1) != r.label)).sum()) for r in ok
    )
    plot = plot_tsne(ok, CLASSES, 0.05, 0, tmp_path / "tsne.png")
    assert plot.path.is_file() and plot.n_misclassified == expected > 0
    for r in ok:
        r.label = None  # unlabelled images have no misclassified patches
    unlabelled = plot_tsne(ok, CLASSES, 0.05, 0, tmp_path / "tsne.png")
    assert unlabelled.n_misclassified == 0
    assert unlabelled.colour_key == "the predicted class of its image"
    # The page's caption says what the title says.
    page = write_report(tmp_path / "report", results).html.read_text()
    assert "each coloured by the predicted class of its image" in page
    assert "class of their image" not in page


def test_overlapping_tiles_are_drawn_at_their_true_positions() -> None:
    """fit=overlap on 150x100 px with 64 px tiles: 3x2 tiles that overlap; drawn at their
    origins they give back the image, not a 192x128 grid with tissue repeated at seams."""
    image = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    patches, positions = tile_image(image, 64, 64, 64, "overlap")
    origins = tile_origins(100, 150, 64, 64, "overlap")
    assert positions.max(axis=0).tolist() == [1, 2] and origins[-1].tolist() == [36, 86]
    canvas, corners, side = _placed(patches, origins, 64, max_side=1000)
    assert side == 64 and np.array_equal(canvas, image)
    halved, _, side = _placed(patches[:, ::2, ::2].copy(), origins, 64, max_side=1000)
    assert side == 32 and halved.shape == (50, 75, 3)  # 32 px patches of 64 px tiles


def test_heatmap_with_a_tiling_draws_scale_bars(tmp_path: Path) -> None:
    results, store = synthetic_results(1)
    r = results[0]
    tiling = Tiling(tile_size=64, stride=64, patch_size=32, mpp=0.5)
    path = plot_heatmap(r, store[r.image_id], CLASSES, tmp_path / "h.png", tiling)
    assert Image.open(path).size[0] > 0


def _green_pixels(path: Path) -> int:
    with Image.open(path) as im:
        return int(np.all(np.asarray(im.convert("RGB")) == GREEN, axis=-1).sum())


def test_heatmap_shows_the_original_when_it_reads(tmp_path: Path) -> None:
    results, store = synthetic_results(n=1)
    r = results[0]
    r.path = str(write_image(tmp_path / "original.png", np.full((300, 400, 3), GREEN, np.uint8)))
    with_original = plot_heatmap(r, store[r.image_id], CLASSES, tmp_path / "with.png")
    assert _green_pixels(with_original) > 1000
    r.path = str(tmp_path / "moved.png")
    without = plot_heatmap(r, store[r.image_id], CLASSES, tmp_path / "without.png")
    assert _green_pixels(without) == 0


def test_tsne_of_a_frozen_encoder_marks_no_patch_misclassified(tmp_path: Path) -> None:
    """A frozen encoder's patches have no class of their own: coloured by class, no crosses
    and no "misclassified" in the legend."""
    results, _ = synthetic_results()
    ok = [r for r in results if r.error is None]
    scored = plot_tsne(ok, CLASSES, 0.05, 0, tmp_path / "tsne.png")
    assert scored.legend[-1] == f"misclassified patch ({scored.n_misclassified})"
    for r in ok:
        r.patch_probs = None
    frozen = plot_tsne(ok, CLASSES, 0.05, 0, tmp_path / "tsne.png")
    assert frozen.n_misclassified == 0
    assert frozen.legend == [f"{c} ({(3 * 8)})" for c in CLASSES]  # 3 images x 8 tissue tiles
    assert not any("misclassified" in entry for entry in frozen.legend)


def test_heatmap_colours_say_true_and_predicted() -> None:
    """Green is the true class (and the predicted one when right), red the predicted one
    when wrong, blue the predicted one of an unlabelled image; the figure says which."""
    results, _ = synthetic_results(n=1)
    r = results[0]  # Normal, predicted Normal
    assert tag_colour(r, 0) == "tab:green" and "red: predicted, wrong" in tag_legend(r)
    r.probs = np.array([0.1, 0.7, 0.1, 0.1])  # predicted Benign: wrong
    assert (tag_colour(r, 0), tag_colour(r, 1)) == ("tab:green", "tab:red")
    r.label, r.label_group = None, 0  # only the group known: Benign is non-carcinoma, right
    assert tag_colour(r, 1) == "tab:green" and "in the true group" in tag_legend(r)
    r.label_group = 1
    assert tag_colour(r, 1) == "tab:red"
    r.label_group = None
    assert tag_colour(r, 1) == "tab:blue" and tag_legend(r).endswith("(no label to judge it by)")


def test_an_assumed_pixel_size_is_said_over_its_scale_bar() -> None:
    results, _ = synthetic_results(n=1)
    r = results[0]
    assert file_title(r) == "the file, as read"
    r.mpp = 0.25
    assert file_title(r) == "the file, as read\n(0.25 µm/px)"
    r.mpp, r.mpp_assumed = 0.42, True
    assert file_title(r) == "the file, as read\n(0.42 µm/px, assumed)"
