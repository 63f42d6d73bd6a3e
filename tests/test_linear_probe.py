"""image_model=linear_probe: scikit-learn's logistic regression with C chosen by grouped inner
CV on the training side (train and the val carve-out), exported into a linear head; never
fitted on test images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from breastnet.cli import run_stages
from breastnet.data.bach import DataError
from breastnet.data.datasets import pad_collate
from breastnet.inference.models import load_image_model
from breastnet.lineage import Lineage
from breastnet.models.aggregators import LinearProbe
from breastnet.models.linear_probe import c_grid, fit_probe
from breastnet.synthetic import write_synthetic_dataset

from conftest import SHARED_MOBILENET, SMALL_RUN, compose_config
from feature_sides import C, D, FeatureSides, Untouchable, images, pooled, relabelled

SEED = 2019
TRAIN, TRAIN_GROUPS = images(48, seed=0, prefix="tr", signal=1.5)
VAL, VAL_GROUPS = images(12, seed=1, prefix="va", signal=1.5)
GROUPS = TRAIN_GROUPS | VAL_GROUPS
TEST, _ = images(24, seed=2, prefix="te", signal=1.5)


def sides(val: object = VAL, test: object = TEST) -> FeatureSides:
    return FeatureSides({"train": TRAIN, "val": val, "test": test}, GROUPS)


GRID = {"c_min": 1e-4, "c_max": 1e2, "n_c": 13}
"""2 values of C per decade: the tests' grid (the config has 4)."""


def fitted(datamodule: FeatureSides) -> tuple[LinearProbe, dict[str, float]]:
    probe = LinearProbe(D, C, **GRID)
    return probe, fit_probe(probe, datamodule, SEED)


def head_probs(probe: torch.nn.Module, samples: list[dict]) -> np.ndarray:
    """Class probabilities of the probe's forward on one padded batch of ``samples``."""
    batch = pad_collate(samples)
    with torch.no_grad():
        out = probe(batch["x"], batch["mask"], batch["pos"], batch["probs"])
    return out["logits"].softmax(1).double().numpy()


def test_the_probe_is_scikit_learns_choice_and_fit_through_its_head() -> None:
    """The same C as scikit-learn's grid search over the same grouped folds, and the head's
    probabilities on new images those of the refitted pipeline."""
    probe, metrics = fitted(sides())
    x, y = pooled(TRAIN + VAL)  # the training side: train and the val carve-out
    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        {"logisticregression__C": c_grid(**GRID)},
        scoring="balanced_accuracy",
        cv=StratifiedGroupKFold(5, shuffle=True, random_state=SEED),
    )
    with threadpool_limits(limits=1):  # tiny fits: BLAS threads only contend
        search.fit(x, y, groups=np.array([GROUPS[s["image_id"]] for s in TRAIN + VAL]))
    chosen = search.best_params_["logisticregression__C"]
    assert metrics["image/probe_C"] == chosen == probe.C.item()
    assert 1e-4 < chosen < 1e2  # an inner C, not an edge of the grid
    assert metrics["image/probe_inner_balanced_accuracy"] == pytest.approx(search.best_score_)
    assert probe.inner_balanced_accuracy.item() == pytest.approx(search.best_score_)

    x_test, y_test = pooled(TEST)
    ours, reference = head_probs(probe, TEST), search.best_estimator_.predict_proba(x_test)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    score = balanced_accuracy_score(y_test, ours.argmax(1))
    assert score == pytest.approx(balanced_accuracy_score(y_test, reference.argmax(1)), abs=1e-3)
    assert score > 0.6  # it learnt the class signal


def test_the_penalty_and_weights_never_see_the_test_side() -> None:
    """Permuted test labels, garbage test features, or a test side that fails when read: the
    same C and bit-identical weights."""
    probe, _ = fitted(sides())
    garbage = [s | {"x": torch.randn_like(s["x"]) * 1e3} for s in relabelled(TEST, seed=3)]
    permuted, _ = fitted(sides(test=garbage))
    blind, _ = fitted(sides(test=Untouchable()))
    for other in (permuted, blind):
        assert other.C.item() == probe.C.item()
        state = other.state_dict()
        assert all(torch.equal(state[k], v) for k, v in probe.state_dict().items())


def test_the_fit_lives_in_the_state_dict() -> None:
    """A checkpoint's state dict restores the head, C and score; an unfitted probe refuses to
    give logits."""
    probe, _ = fitted(sides())
    state = probe.state_dict()
    assert set(state) == {"fc.weight", "fc.bias", "C", "inner_balanced_accuracy"}
    fresh = LinearProbe(D, C, **GRID)
    with pytest.raises(RuntimeError, match="not fitted"):
        head_probs(fresh, TEST)
    fresh.load_state_dict(state)
    assert fresh.fitted and not any(p.requires_grad for p in fresh.parameters())
    np.testing.assert_array_equal(head_probs(fresh, TEST), head_probs(probe, TEST))


def test_what_the_probe_cannot_fit_on_is_one_clear_error() -> None:
    no_invasive = [s for s in TRAIN if s["y"] != 3]
    with pytest.raises(DataError, match=r"class\(es\) \[3\] have none among the 36 images"):
        fitted(FeatureSides({"train": no_invasive, "val": []}, GROUPS))
    few = TRAIN[:8]  # 2 images per class, 1 source group each
    with pytest.raises(DataError, match="image_model.aggregator.folds=5: .* 4 source group"):
        fitted(FeatureSides({"train": few, "val": []}, GROUPS))
    with pytest.raises(ValueError, match="c_min <= c_max"):
        LinearProbe(D, C, c_min=1.0, c_max=0.1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("demo"), 8, 256, 192, seed=5)


def test_the_image_stage_fits_scores_and_keeps_the_probe(
    generated: Path, tmp_path: Path, one_thread: None
) -> None:
    """Through the stage on a frozen encoder's features: C and its inner score in the metrics
    and the checkpoint, the loaded model scoring the test accuracy the stage returned, and
    select.inner_folds kept beside the model (a rerun trains nothing)."""
    if not SHARED_MOBILENET.is_file():
        pytest.skip(f"shared ImageNet weights not found at {SHARED_MOBILENET}")
    frozen = [
        *SMALL_RUN,
        f"data.data_dir={generated}",
        "patch_model.freeze=true",
        f"patch_model.net.weights={SHARED_MOBILENET}",
    ]
    run_stages(compose_config(tmp_path, *frozen, "stages=[prepare,features]"))
    probe = [
        *frozen,
        "stages=[image]",
        "image_model=linear_probe",
        "image_model.aggregator.folds=2",
        "image_model.aggregator.n_c=7",
    ]
    cfg = compose_config(tmp_path, *probe, "select.inner_folds=2")
    metrics = run_stages(cfg)
    lineage = Lineage(cfg)
    image_dir = lineage.image
    saved = json.loads((image_dir / "metrics.json").read_text())
    assert saved["image/probe_C"] == metrics["image/probe_C"] in c_grid(1e-4, 1e2, 7)
    model = load_image_model(cfg, lineage)
    assert model.aggregator.C.item() == metrics["image/probe_C"]
    assert model.aggregator.inner_balanced_accuracy.item() == pytest.approx(
        metrics["image/probe_inner_balanced_accuracy"]
    )
    datamodule = instantiate(cfg.data, mode="features", features_path=str(lineage.features))
    datamodule.setup()
    test = [datamodule.datasets["test"][i] for i in range(len(datamodule.datasets["test"]))]
    right = head_probs(model.aggregator, test).argmax(1) == np.array([s["y"] for s in test])
    assert metrics["image/test_acc"] == pytest.approx(right.mean(), abs=1e-6)

    inner = json.loads((image_dir / "inner_cv_2folds.json").read_text())
    assert inner["folds"] == 2 and len(inner["fold_scores"]) == 2
    assert metrics["select/inner_balanced_accuracy"] == pytest.approx(
        np.mean(inner["fold_scores"])
    )
    checkpoint = (image_dir / "best.ckpt").stat().st_mtime_ns
    assert run_stages(compose_config(tmp_path, *probe, "select.inner_folds=2")) == metrics
    assert (image_dir / "best.ckpt").stat().st_mtime_ns == checkpoint
    # Without the objective, the same model and its metrics alone.
    alone = run_stages(compose_config(tmp_path, *probe))
    assert alone == {k: v for k, v in metrics.items() if not k.startswith("select/")}
