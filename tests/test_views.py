"""``features.view``: the tiles, the whole image (the tiles stitched back and resized to one
patch, as eva embeds an image) or both side by side, alike in the features stage and predict."""

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import mobilenet_v2

from breastnet.artifacts import artifact_key
from breastnet.cli import run_stages
from breastnet.data.datasets import pad_collate, to_tensor
from breastnet.data.feature_store import FeatureStore
from breastnet.data.store import PatchCache
from breastnet.errors import ConfigError
from breastnet.inference.embedder import Embedder, view_settings, whole_image
from breastnet.inference.models import load_image_model, load_patch_model
from breastnet.lineage import Lineage, features_key
from breastnet.models.embedding import embed_patches
from breastnet.synthetic import write_synthetic_dataset

from conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

D = 1280  # MobileNetV2's features
VIEWS = ("tiles", "whole", "both")
CLOSE = {"rtol": 1e-3, "atol": 1e-3}  # other batches sum in another order; features are ~1


def test_the_mosaic_of_a_tile_grid_resized_to_one_patch() -> None:
    """A 2 x 3 grid of flat 4 px tiles (value 30 k + channel, k in row-major order), given out
    of order: the 8 x 12 mosaic shrinks to 4 x 4 by 2 x 3 pixel areas, so a pixel
    straddling two tiles is their 1:2 or 2:1 mean."""
    positions = torch.tensor([(r, c) for r in range(2) for c in range(3)])
    values = 30 * torch.arange(6)[:, None] + torch.arange(3)  # 6 x 3
    patches = values[:, :, None, None].expand(6, 3, 4, 4).to(torch.uint8)
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    whole = whole_image(patches[order], positions[order])
    row = torch.tensor([[0, 20, 40, 60], [90, 110, 130, 150]])  # tile rows 0 and 1
    expected = row.repeat_interleave(2, 0)[None] + torch.arange(3)[:, None, None]  # 3 x 4 x 4
    assert whole.dtype == torch.uint8 and torch.equal(whole, expected.to(torch.uint8))


def test_overlapping_tiles_stitch_back_into_the_image() -> None:
    """Tiles every ``step`` px, overlapping, give back the image they were cut from."""
    image = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    size, step = 6, 4
    grid = [(r, c) for r in range(2) for c in range(3)]
    cut = [image[r * step : r * step + size, c * step : c * step + size] for r, c in grid]
    whole = whole_image(to_tensor(np.stack(cut)), torch.tensor(grid), step)
    expected = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    assert torch.equal(whole, to_tensor(expected))


def test_views_are_checked(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, *SMALL_RUN, "features.view=both")
    assert view_settings(cfg) == {"view": "both", "step": 32}  # 64 px tiles at 32 px
    with pytest.raises(ConfigError, match=r"features.view must be one of tiles, whole, both"):
        view_settings(compose_config(tmp_path, *SMALL_RUN, "features.view=mosaic"))
    with pytest.raises(ConfigError, match=r"data.stride=96 leaves gaps .* features.view=tiles"):
        view_settings(
            compose_config(tmp_path, *SMALL_RUN, "features.view=whole", "data.stride=96")
        )


def test_tile_features_keep_the_key_they_had_before_views() -> None:
    before = artifact_key({"patch": "abc", "tta": False})  # features_key without a view
    assert features_key("abc", False, None) == features_key("abc", False, None, "tiles") == before
    assert len({features_key("abc", False, None, v) for v in VIEWS}) == 3


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Generated data (3 x 4 tiles an image), a run dir and the overrides of a random
    MobileNetV2 (BatchNorm statistics of random inputs, so that its features are far from 0
    and a tolerance means something) saved as a frozen encoder's weights file."""
    data = write_synthetic_dataset(tmp_path_factory.mktemp("data"), 4, 256, 192, seed=5)
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    net = mobilenet_v2()
    for bn in net.modules():  # statistics of real inputs: at init they collapse the features
        if isinstance(bn, _BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None  # a plain average: one batch sets the statistics
    with torch.no_grad():
        net.train()(torch.randn(16, 3, 32, 32))
    weights = run / "mobilenet_v2.pth"
    torch.save(net.state_dict(), weights)
    overrides = [
        *SMALL_RUN,
        f"data.data_dir={data}",
        "patch_model.freeze=true",
        f"patch_model.net.weights={weights}",
    ]
    return run, overrides


def _store(run: Path, overrides: list[str], view: str) -> tuple[FeatureStore, Lineage]:
    cfg = compose_config(run, *overrides, "stages=[prepare,features]", f"features.view={view}")
    run_stages(cfg)
    lineage = Lineage(cfg)
    return FeatureStore(lineage.features), lineage


def test_whole_and_both_stores(frozen: tuple[Path, list[str]]) -> None:
    run, overrides = frozen
    (tiles, lineage), (whole, _), (both, _) = (_store(run, overrides, v) for v in VIEWS)
    assert len({tiles.root, whole.root, both.root}) == 3  # one cache, three stores
    assert (tiles.width, whole.width, both.width) == (D, D, 2 * D)
    assert (whole.meta["view"], both.meta["view"]) == ("whole", "both")
    net = load_patch_model(lineage.cfg, lineage).net
    cache = PatchCache(lineage.cache)
    for image_id in ("Normal/n000", sorted(tiles)[-1]):
        t, w, b = (s.load(image_id) for s in (tiles, whole, both))
        assert t["features"].shape == (12, D) and b["features"].shape == (12, 2 * D)
        assert t["features"].abs().mean() > 0.5  # not collapsed: the tolerances mean something
        # whole: one row, the stitched image embedded, at (0, 0), the tiles' mean tissue
        assert w["features"].shape == (1, D) and w["probs"].shape == (1, 4)
        assert w["positions"].tolist() == [[0, 0]] and whole.rows[image_id].n_tiles == 1
        torch.testing.assert_close(w["tissue"], t["tissue"].mean(0, keepdim=True))
        positions = torch.tensor(cache.records()[image_id]["positions"])
        image = whole_image(to_tensor(np.array(cache.load(image_id))), positions)
        with torch.no_grad():
            expected, _ = embed_patches(net, image[None], 64)
        torch.testing.assert_close(w["features"], expected, **CLOSE)
        assert not torch.allclose(w["features"], t["features"].mean(0), rtol=0.05)
        # both: the tile's features, then the whole image's on every row; the tiles' probs
        torch.testing.assert_close(b["features"][:, :D], t["features"], **CLOSE)
        assert torch.equal(b["features"][:, D:], b["features"][:1, D:].expand(12, D))
        torch.testing.assert_close(b["features"][:1, D:], w["features"], **CLOSE)
        torch.testing.assert_close(b["probs"], t["probs"], **CLOSE)
        assert torch.equal(b["positions"], t["positions"])


def test_the_embedder_pads_views_and_takes_tta(
    frozen: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Images of 6 and 2 tiles in one padded batch, as predict's files come (with tissue):
    each image's rows are its own, TTA included, whatever the padding."""
    cfg = compose_config(tmp_path, *frozen[1])
    net = load_patch_model(cfg, Lineage(cfg)).net
    torch.manual_seed(1)
    grids = [[(r, c) for r in range(2) for c in range(3)], [(0, 0), (0, 1)]]
    samples = [
        {
            "x": torch.randint(0, 256, (len(g), 3, 32, 32), dtype=torch.uint8),
            "pos": torch.tensor(g),
            "tissue": torch.rand(len(g)),
            "y": 0,
            "image_id": f"i{k}",
        }
        for k, g in enumerate(grids)
    ]
    batch = pad_collate(samples)
    with torch.no_grad():
        out = {
            view: Embedder(net, chunk_size=16, tta=True, view=view).predict_step(batch, 0)
            for view in ("whole", "both")
        }
        for s, whole, both in zip(samples, out["whole"], out["both"], strict=True):
            n = len(s["x"])
            tiles, probs = embed_patches(net, s["x"], 16, tta=True)
            image, _ = embed_patches(net, whole_image(s["x"], s["pos"])[None], 16, tta=True)
            torch.testing.assert_close(whole["features"], image, **CLOSE)
            assert "pos" not in whole  # its one row is on no tile of the grid
            torch.testing.assert_close(whole["tissue"], s["tissue"].mean(0, keepdim=True))
            assert both["features"].shape == (n, 2 * D) and both["tissue"].shape == (n,)
            torch.testing.assert_close(both["features"][:, :D], tiles, **CLOSE)
            torch.testing.assert_close(both["features"][:, D:], image.expand(n, D), **CLOSE)
            torch.testing.assert_close(both["probs"], probs, **CLOSE)


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["image_id"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize(("view", "width", "heatmaps"), [("both", 2 * D, 1), ("whole", D, 0)])
def test_a_view_through_image_evaluate_and_predict(
    frozen: tuple[Path, list[str]], tmp_path: Path, view: str, width: int, heatmaps: int
) -> None:
    """mean_features on the view's rows trains and is evaluated (a whole image's one row has
    no tile to draw a heatmap of), and predict embeds new files with the same view: it gives
    evaluate's probabilities."""
    run, overrides = frozen
    settings = [
        *overrides,
        f"features.view={view}",
        "image_model=mean_features",
        "image.max_epochs=2",
        "evaluate.split=all",
        "evaluate.examples=1",
    ]
    cfg = compose_config(run, *settings, "stages=[prepare,features,image,evaluate]")
    metrics = run_stages(cfg)
    lineage = Lineage(cfg)
    store = FeatureStore(lineage.features)
    assert store.width == width and store.meta["view"] == view
    assert load_image_model(cfg, lineage).aggregator.fc.in_features == width
    report = lineage.report("all")
    assert (report / "index.html").is_file() and metrics["eval/n_images"] == 16
    assert len(list(report.glob("heatmap_*.png"))) == heatmaps
    evaluated = _rows(report / "predictions.csv")
    assert len({r["prob_Normal"] for r in evaluated.values()}) > 1  # the images differ
    out = tmp_path / "predicted"
    predict = [
        "stages=[predict]",
        f"predict.input={Path(cfg.data.data_dir) / 'Normal'}",
        f"predict.output_dir={out}",
        "predict.include_training=true",
    ]
    run_stages(compose_config(run, *settings, *predict))
    predicted = _rows(out / "predictions.csv")
    assert len(predicted) == 4
    for image_id, row in predicted.items():
        assert int(row["n_patches"]) == (12 if view == "both" else 1)
        for c in ("Normal", "Benign", "InSitu", "Invasive"):
            want = float(evaluated[f"Normal/{image_id}"][f"prob_{c}"])
            assert float(row[f"prob_{c}"]) == pytest.approx(want, abs=2e-3), image_id
