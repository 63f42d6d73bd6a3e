"""Label maps and the 2-class carcinoma view: unknown names reported, scores as sklearn's."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from breastnet.data import keys
from breastnet.data.bach import DataError, build_index
from breastnet.errors import ConfigError
from breastnet.inference.files import labels_for
from breastnet.labels import LabelMap
from breastnet.lineage import Lineage
from breastnet.report import write_report
from breastnet.report.metrics import two_class_metrics

from conftest import compose_config, noisy_probs, synthetic_results, tissue_like, write_image


def test_label_map_matches_names_loosely_and_checks_its_targets() -> None:
    labels = LabelMap({"Malignant": "carcinoma", "ductal carcinoma": "invasive"})
    assert labels("MALIGNANT") == "carcinoma" and labels("Ductal_Carcinoma") == "Invasive"
    assert labels("in situ") == "InSitu" and labels("Non-carcinoma") == "non_carcinoma"
    assert labels("Other") is None
    with pytest.raises(ConfigError, match="'Malignant' maps to 'cancer'"):
        LabelMap({"Malignant": "cancer"})
    training = LabelMap(None, "data.label_map", groups=False)
    assert training("carcinoma") is None and training("Benign") == "Benign"
    with pytest.raises(ConfigError, match="not one of Normal, Benign, InSitu, Invasive$"):
        LabelMap({"Malignant": "carcinoma"}, "data.label_map", groups=False)


def _external(root: Path, folders: dict[str, int]) -> list[Path]:
    files = []
    for folder, n in folders.items():
        for i in range(n):
            files.append(write_image(root / folder / f"{i}.png", tissue_like(len(files))))
    return sorted(files)


def test_unknown_folder_labels_are_reported_by_name_and_count(tmp_path, caplog) -> None:
    files = _external(tmp_path, {"Benign": 2, "Malignant": 3, "Other": 1})
    with caplog.at_level(logging.WARNING):
        labels = labels_for(tmp_path, files, None, LabelMap(None, "predict.label_map"))
    assert sorted(labels.values(), key=str) == ["Benign", "Benign", *[None] * 4]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "'Malignant' (3 files), 'Other' (1 file)" in warning
    assert "predict.label_map='{Malignant: carcinoma}'" in warning

    caplog.clear()
    mapped = LabelMap({"Malignant": "carcinoma", "Benign": "non_carcinoma"})
    with caplog.at_level(logging.WARNING):
        labels = labels_for(tmp_path, files, None, mapped)
    by_folder = {f.parent.name: labels[f] for f in files}
    assert by_folder == {"Benign": "non_carcinoma", "Malignant": "carcinoma", "Other": None}
    assert "'Other' (1 file)" in caplog.text and "Malignant" not in caplog.text


def test_unknown_csv_labels_are_reported(tmp_path, caplog) -> None:
    files = _external(tmp_path, {".": 3})
    csv = tmp_path / "labels.csv"
    csv.write_text("file,diagnosis\n0.png,Malignant\n1.png,Malignant\n2.png,Normal\n")
    with caplog.at_level(logging.WARNING):
        labels = labels_for(tmp_path, files, str(csv), LabelMap())
    assert [labels[f] for f in files] == [None, None, "Normal"]
    assert "'Malignant' (2 files)" in caplog.text


def test_training_label_map_and_unknown_folders(tmp_path: Path) -> None:
    counts = {"Normal": 2, "Benign": 2, "DCIS": 2, "Invasive": 2, "Lymphoma": 2}
    _external(tmp_path, counts)
    with pytest.raises(DataError, match=r"'DCIS' \(2 files\), 'Lymphoma' \(2 files\)"):
        build_index(tmp_path, num_workers=1)
    with pytest.raises(DataError, match=r"'Lymphoma' \(2 files\); map them"):
        build_index(tmp_path, num_workers=1, label_map={"DCIS": "InSitu"})
    entries = build_index(tmp_path, num_workers=1, label_map={"DCIS": "InSitu"}, skip_bad=True)
    labels = {e.image_id.split("/")[0]: e.label for e in entries if e.usable}
    assert labels == {
        "Normal": "Normal",
        "Benign": "Benign",
        "DCIS": "InSitu",
        "Invasive": "Invasive",
    }


def test_two_class_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 4, 200)
    probs = noisy_probs(classes, rng, signal=0.8)
    groups = (classes >= 2).astype(int)
    got = two_class_metrics(groups, probs)
    score, predicted = probs[:, 2:].sum(1), (probs.argmax(1) >= 2).astype(int)
    assert got["accuracy"] == pytest.approx(accuracy_score(groups, predicted))
    assert got["sensitivity"] == pytest.approx(recall_score(groups, predicted))
    assert got["specificity"] == pytest.approx(recall_score(groups, predicted, pos_label=0))
    assert got["auc"] == pytest.approx(roc_auc_score(groups, score), abs=1e-6)
    assert got["n_images"] == 200 and got["n_carcinoma"] == groups.sum()
    assert np.array(got["confusion_matrix"]).sum() == 200
    low, high = got["accuracy_ci"]
    assert low < got["accuracy"] < high and got["auc_ci"][0] < got["auc"] < got["auc_ci"][1]


def test_a_two_class_only_folder_is_scored_on_the_two_class_metrics(tmp_path: Path) -> None:
    results, store = synthetic_results(n=12)
    for r in results:  # only the group is known, as in a Benign/Malignant data set
        r.label_group, r.label = int(r.label >= 2), None
    rep = write_report(tmp_path, results, patches=store.__getitem__, n_examples=2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    ok = [r for r in results if not r.failed]
    groups = np.array([r.label_group for r in ok])
    probs = np.stack([r.probs for r in ok])
    predicted = (probs.argmax(1) >= 2).astype(int)
    assert saved["image_accuracy"] is None and saved["per_class"] is None
    assert saved["two_class"]["accuracy"] == pytest.approx(accuracy_score(groups, predicted))
    assert saved["two_class"]["auc"] == pytest.approx(
        roc_auc_score(groups, probs[:, 2:].sum(1)), abs=1e-6
    )
    assert saved["n_errors"] == 1
    assert rep.misclassified == [
        r.image_id for r, p, g in zip(ok, predicted, groups, strict=True) if p != g
    ]
    page = rep.html.read_text()
    assert "Carcinoma vs non-carcinoma" in page and "no 4-class numbers" in page
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[1].split(",")[2] in ("carcinoma", "non_carcinoma")


def test_mixed_labels_give_both_views(tmp_path: Path) -> None:
    results, _ = synthetic_results(n=12)
    for r in results[:4]:
        r.label_group, r.label = int(r.label >= 2), None
    rep = write_report(tmp_path, results)
    assert rep.metrics["n_images"] == 8  # 4-class: the images with a class label
    assert rep.metrics["two_class"]["n_images"] == 12  # 2-class: every labelled image


def test_a_label_map_keys_its_own_index(tmp_path: Path) -> None:
    """Other labels make another data set: its own index (and so its own splits)."""
    plain = compose_config(tmp_path)
    mapped = compose_config(tmp_path, "data.label_map={DCIS:InSitu}")
    assert Lineage(plain).index != Lineage(mapped).index
    lineage, settings = Lineage(mapped), instantiate(mapped.data).hparams  # the DataModule's
    assert keys.index_path(lineage.work_dir, settings) == lineage.index


def test_a_label_map_key_that_matches_no_label_is_an_error(tmp_path: Path) -> None:
    """A typo in a key would leave a class unlabelled and score the other alone."""
    files = _external(tmp_path / "ucsb", {"Benign": 2, "Malignant": 2})
    typo = LabelMap({"Benign": "non_carcinoma", "Malignent": "carcinoma"}, "predict.label_map")
    with pytest.raises(
        ConfigError,
        match=r"predict.label_map: key 'Malignent' matches no folder or CSV label; did you mean "
        r"'Malignant'\? \(labels found: Benign, Malignant\)",
    ):
        labels_for(tmp_path / "ucsb", files, None, typo)
    _external(tmp_path / "bach", {"Normal": 1, "Benign": 1, "DCIS": 1, "Invasive": 1})
    with pytest.raises(ConfigError, match="key 'DCSI' matches no folder.*did you mean 'DCIS'"):
        build_index(tmp_path / "bach", num_workers=1, label_map={"DCSI": "InSitu"})
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\n0.png,Malignant\n")
    with pytest.raises(ConfigError, match="key 'Malign' matches no folder.*'Malignant'"):
        labels_for(tmp_path / "ucsb", files, str(csv), LabelMap({"Malign": "carcinoma"}))


def test_n_images_counts_what_each_view_scored(tmp_path: Path) -> None:
    """2-class labels only: no 4-class view (n_images None, not 0), 19 in the 2-class one."""
    results, _ = synthetic_results(19)
    for r in results:
        r.label, r.label_group = None, r.group
    saved = write_report(tmp_path, results).metrics
    assert saved["n_images"] is None and saved["two_class"]["n_images"] == 19
    assert saved["n_images_by_view"] == {"4-class": 0, "2-class": 19}
