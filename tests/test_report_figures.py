"""The figures show what they claim: misclassified patches in the t-SNE, the original file
beside its heatmap."""

from pathlib import Path

import numpy as np
from PIL import Image

from breastnet import CLASSES
from breastnet.report.figures import plot_heatmap, plot_tsne

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
    assert plot_tsne(ok, CLASSES, 0.05, 0, tmp_path / "tsne.png").n_misclassified == 0


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
