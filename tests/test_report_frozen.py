"""A frozen encoder's reports: no patch accuracy anywhere, no "misclassified" patches, and
heatmaps of the image model's own per-tile probabilities (or none, said so)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import mobilenet_v2

from breastnet.cli import run_stages
from breastnet.inference.results import tile_probs
from breastnet.lineage import Lineage
from breastnet.models.aggregators import Attention, BiLSTM, MeanFeatures
from breastnet.synthetic import write_synthetic_dataset

from conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

# The small CNN as a fixed encoder (no patch training) under mean_features: a linear head
# whose per-tile logits average to the image's.
FROZEN = [*SMALL_RUN, "patch_model.freeze=true", "image_model=mean_features", "image.max_epochs=3"]


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Generated data, a run dir, the overrides of a random MobileNetV2 saved as a weights
    file (a frozen encoder needs weights) and the metrics of the whole pipeline."""
    data = write_synthetic_dataset(tmp_path_factory.mktemp("data"), 4, 256, 192, seed=5)
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    weights = run / "mobilenet_v2.pth"
    torch.save(mobilenet_v2().state_dict(), weights)
    overrides = [*FROZEN, f"data.data_dir={data}", f"patch_model.net.weights={weights}"]
    return run, overrides, run_stages(compose_config(run, *overrides, "evaluate.examples=2"))


def test_tile_probabilities_are_the_image_models_own_head_on_each_tile() -> None:
    """mean_features' image logits are the mean of its head's per-tile logits (attention's
    their attention-weighted mean): the tiles show what the image's class is made of, and
    they differ from tile to tile, unlike a frozen encoder's 0.25 everywhere."""
    torch.manual_seed(0)
    features = torch.randn(6, 16)
    mask, pos = torch.ones(1, 6, dtype=torch.bool), torch.zeros(1, 6, 2, dtype=torch.long)
    for aggregator in (MeanFeatures(16).eval(), Attention(16).eval()):
        tiles = tile_probs([aggregator], [features])
        with torch.no_grad():
            per_tile = aggregator.fc(features)  # 6 x 4
            out = aggregator(features[None], mask, pos, torch.full((1, 6, 4), 0.25))
        weights = out.get("attention", torch.full((1, 6), 1 / 6))[0]
        torch.testing.assert_close(out["logits"][0], weights @ per_tile)
        np.testing.assert_allclose(tiles, per_tile.softmax(1).numpy(), rtol=1e-6)
        assert np.ptp(tiles, axis=0).max() > 0.05
    # an ensemble's: the members' mean
    a, b = MeanFeatures(16).eval(), MeanFeatures(16).eval()
    alone = [tile_probs([m], [features]) for m in (a, b)]
    np.testing.assert_allclose(tile_probs([a, b], [features, features]), sum(alone) / 2)
    assert tile_probs([BiLSTM(16, hidden_size=4, num_layers=1)], [features]) is None


def test_a_frozen_encoder_reports_no_patch_accuracy(frozen_run) -> None:
    run, overrides, metrics = frozen_run
    assert "eval/image_accuracy" in metrics
    assert not [k for k in metrics if "patch_acc" in k]
    cfg = compose_config(run, *overrides)
    report = Lineage(cfg).report("test")
    saved = json.loads((report / "metrics.json").read_text())
    assert "patch_accuracy" not in saved and "n_patches" not in saved
    assert saved["inputs"]["frozen_encoder"] is True
    page = (report / "index.html").read_text()
    assert "<th>patch accuracy</th>" not in page and "Crosses" not in page
    assert "a frozen encoder (patch_model.freeze=true)" in page
    # Heatmaps of the image model's own head on each tile: they vary over the image.
    assert len(list(report.glob("heatmap_*.png"))) == 2
    assert "per-class tile probabilities of the image model&#x27;s own head" in page


def _predict(frozen_run, out: Path, folder: str, *settings: str) -> dict[str, float]:
    """Predict ``folder`` of the frozen run's data (training images scored) into ``out``."""
    run, overrides, _ = frozen_run
    data = Path(compose_config(run, *overrides).data.data_dir)
    inputs = (f"predict.input={data / folder}", f"predict.output_dir={out}")
    cfg = compose_config(run, *overrides, *settings, *inputs, "predict.include_training=true")
    return run_stages(cfg)


def test_a_frozen_encoder_predicts_without_patch_accuracy(frozen_run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    metrics = _predict(frozen_run, out, "", "stages=[predict]", "evaluate.examples=1")
    assert metrics["predict/n_images"] == 16 and not [k for k in metrics if "patch_acc" in k]
    saved = json.loads((out / "metrics.json").read_text())
    assert "patch_accuracy" not in saved
    assert len(list(out.glob("heatmap_*.png"))) == 1
    assert "tile probabilities of the image model" in (out / "index.html").read_text()


def test_a_frozen_encoder_under_a_bilstm_draws_no_heatmap(frozen_run, tmp_path: Path) -> None:
    """A BiLSTM has no per-tile logits: no heatmap, and the page says why."""
    out = tmp_path / "out"
    bilstm = ("image_model=bilstm", "image_model.aggregator.hidden_size=8")
    _predict(
        frozen_run,
        out,
        "Normal",
        *bilstm,
        "image_model.aggregator.num_layers=1",
        "image.max_epochs=1",
        "stages=[image,predict]",
    )
    assert not list(out.glob("heatmap_*.png")) and (out / "patch_grid.png").is_file()
    assert (
        "No heatmaps: the patch CNN gives no class probabilities"
        in (out / "index.html").read_text()
    )
