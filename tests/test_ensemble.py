"""predict.ensemble=cv: a cross-validation's fold models as one predictor."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from breastnet import CLASSES
from breastnet.cli import run_stages
from breastnet.errors import ConfigError
from breastnet.lineage import Lineage, ensemble_parts
from breastnet.synthetic import write_synthetic_dataset

from conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

# A 2-fold CV in seconds: one epoch of each model (attention-MIL: its attention is averaged too).
CV = [*SMALL_RUN, "data.folds=2", "trainer.max_epochs=1", "image_model=attention"]
CV.append("image.max_epochs=1")
PROBS = [f"prob_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def cv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Generated data, the run dir of both folds' training, and a folder of new images (one
    of them a copy of a test image of fold 0, which fold 1 trained or validated on)."""
    data = write_synthetic_dataset(tmp_path_factory.mktemp("data"), 4, 256, 192, seed=5)
    run = tmp_path_factory.mktemp("run")
    for fold in range(2):  # as `make cv FOLDS=2` trains them
        run_stages(
            cfg_for(
                (data, run, data), f"data.fold={fold}", "stages=[prepare,patch,features,image]"
            )
        )
    new = write_synthetic_dataset(tmp_path_factory.mktemp("new"), 1, 256, 192, seed=9)
    inputs = tmp_path_factory.mktemp("inputs")
    for f in new.rglob("*.png"):
        shutil.copy(f, inputs / f.name)  # no class folders: unlabelled
    lineage = Lineage(cfg_for((data, run, inputs), "data.fold=0"))
    test_id = json.loads(lineage.outer_split.read_text())["test"][0]
    shutil.copy(data / f"{test_id}.png", inputs / "seen.png")
    return data, run, inputs


def cfg_for(cv: tuple[Path, Path, Path], *overrides: str):
    data, run, _ = cv
    return compose_config(run, *CV, f"data.data_dir={data}", *overrides)


def predict(cv, out: Path, *overrides: str) -> tuple[dict, dict[str, np.ndarray], dict]:
    """The metrics, each image's probabilities (predictions.csv) and provenance of predict."""
    metrics = run_stages(
        cfg_for(
            cv,
            "stages=[predict]",
            f"predict.input={cv[2]}",
            f"predict.output_dir={out}",
            *overrides,
        )
    )
    with open(out / "predictions.csv", newline="") as f:
        probs = {r["image_id"]: np.array([float(r[p]) for p in PROBS]) for r in csv.DictReader(f)}
    return metrics, probs, json.loads((out / "provenance.json").read_text())


def test_cv_ensemble_averages_its_fold_models(cv, tmp_path: Path) -> None:
    metrics, ensemble, facts = predict(cv, tmp_path / "cv", "predict.ensemble=cv")
    singles = [predict(cv, tmp_path / f"fold{k}", f"data.fold={k}") for k in range(2)]
    assert len(ensemble) == 5
    # two models of different folds: their mean is neither
    assert any(not np.allclose(singles[0][1][i], singles[1][1][i]) for i in ensemble)
    for image_id, probs in ensemble.items():
        mean = np.mean([single[1][image_id] for single in singles], axis=0)
        assert np.allclose(probs, mean, rtol=0, atol=1.5e-4)  # the CSV's 4 decimals
    assert facts["ensemble"] == "cv" and facts["members"] == 2
    members = [Lineage(cfg_for(cv, f"data.fold={k}")) for k in range(2)]
    expected = []
    for k, (lineage, single) in enumerate(zip(members, singles, strict=True)):
        assert [c["path"] for c in single[2]["checkpoints"]] == [
            str(lineage.patch / "best.ckpt"),
            str(lineage.image / "best.ckpt"),
        ], k
        expected += [c["path"] for c in single[2]["checkpoints"]]
    assert [c["path"] for c in facts["checkpoints"]] == expected
    # fold 0's test image is fold 1's training or val image: the ensemble has seen it
    assert [s[0]["predict/training_images"] for s in singles] == [0, 1]
    assert metrics["predict/training_images"] == 1
    # the ensemble's resume parts are apart from either member's
    parts = ensemble_parts(members)
    assert parts not in [m.predict_parts() for m in members]


def test_cv_ensemble_needs_every_fold_model(cv, tmp_path: Path) -> None:
    image = Lineage(cfg_for(cv, "data.fold=1")).image
    hidden = image.with_name(image.name + ".hidden")
    image.rename(hidden)
    try:
        with pytest.raises(ConfigError, match=r"no trained image model for fold\(s\) 1") as e:
            predict(cv, tmp_path / "cv", "predict.ensemble=cv")
    finally:
        hidden.rename(image)
    assert "-m" in str(e.value) and "data.fold=1\n" in str(e.value)
    with pytest.raises(ConfigError, match="set data.folds=K"):
        predict(cv, tmp_path / "cv", "predict.ensemble=cv", "data.folds=null")
