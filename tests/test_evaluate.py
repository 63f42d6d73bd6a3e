"""Evaluate and predict on a tiny trained pipeline: report files, consistency, bad files, W&B."""

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from breastnet.cli import run_stages
from breastnet.data.bach import DataError
from breastnet.lineage import Lineage
from breastnet.synthetic import write_synthetic_dataset
from breastnet.synthetic.rescan import rescan

from conftest import SMALL_RUN, compose_config, tissue_like, write_image

pytestmark = pytest.mark.usefixtures("one_thread")

# Attention-MIL: quick to train, and it has attention weights for the heatmaps.
TINY = [*SMALL_RUN, "image_model=attention", "image.max_epochs=3", "evaluate.examples=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Generated data, a run dir and the metrics of every training stage run on them."""
    data = write_synthetic_dataset(tmp_path_factory.mktemp("data"), 4, 256, 192, seed=5)
    run = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        run, *TINY, f"data.data_dir={data}", "stages=[prepare,patch,features,image]"
    )
    return data, run, run_stages(cfg)


def cfg_for(trained: tuple[Path, Path, dict], *overrides: str):
    data, run, _ = trained
    return compose_config(run, *TINY, f"data.data_dir={data}", *overrides)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_the_report_of_the_test_split(trained, capsys) -> None:
    metrics = run_stages(cfg_for(trained, "stages=[evaluate]"))
    # The same model on the same images: the Trainer's test accuracy, recomputed from the report.
    assert metrics["eval/image_accuracy"] == pytest.approx(trained[2]["image/test_acc"])
    (report,) = (trained[1] / "work" / "reports").iterdir()
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["n_images"] == 4 == metrics["eval/n_images"]
    assert set(saved) >= {"patch_accuracy", "image_accuracy", "macro_auc", "per_class"}
    assert np.array(saved["confusion_matrix"]).sum() == 4
    assert set(saved["per_class"]) == {"Normal", "Benign", "InSitu", "Invasive"}
    rows = read_rows(report / "predictions.csv")
    assert len(rows) == 4 and {r["label"] for r in rows} == {
        "Normal",
        "Benign",
        "InSitu",
        "Invasive",
    }
    assert all(
        abs(sum(float(r[f"prob_{c}"]) for c in ("Normal", "Benign", "InSitu", "Invasive")) - 1)
        < 1e-3
        for r in rows
    )
    pngs = {p.name for p in report.glob("*.png")}
    assert {"confusion_matrix.png", "confusion_2class.png", "tsne.png", "patch_grid.png"} <= pngs
    assert "roc.png" not in pngs  # one test image per class: too few for a ROC curve
    assert len([p for p in pngs if p.startswith("heatmap_")]) == 2
    page = (report / "index.html").read_text()
    assert "data:image/png;base64," in page
    # What was evaluated, and prepare's audit of it: distinct generated images, no leak.
    split = saved["split"]
    assert split["n_images"] == {"train": 8, "val": 4, "test": 4}
    assert split["text"] == (
        "hold-out 0.5/0.25/0.25, by image: 8 train / 4 val / 4 test images, 8/4/4 groups"
    )
    assert metrics["eval/protocol"] == f"{split['name']}: {split['text']}"
    assert saved["balanced_accuracy"] == metrics["eval/balanced_accuracy"]
    # One line: what was scored, on how many images, beside balanced accuracy and accuracy.
    assert (
        "test (hold-out 0.5/0.25/0.25, by image: 4 images; trained on 8 + 4 val): balanced "
        f"accuracy {saved['balanced_accuracy']:.3f}, accuracy {saved['image_accuracy']:.3f}"
    ) in capsys.readouterr().out
    # Generated PNGs carry no pixel size: the tiling's, said to be assumed.
    inputs = saved["inputs"]
    assert (inputs["image_mpp"], inputs["untagged_files"], inputs["tiling_mpp"]) == ([], 4, 0.42)
    assert "4, assumed to be 0.42 µm/px" in page
    assert split["near_duplicates"] == 0 == metrics["eval/near_duplicates"]
    train = json.loads((trained[1] / "work" / "splits" / f"{split['name']}.json").read_text())
    audit = json.loads(
        (trained[1] / "work" / "splits" / f"{split['name']}.audit.json").read_text()
    )
    closest = [m for m in audit["matches"] if m["side"] == "test"][:2]
    assert all(m["train_id"] in train["train"] for m in closest)
    assert "audit_pairs.png" in pngs and "Closest training images" in page
    assert split["text"] in page
    # The checkpoints behind the numbers: the patch CNN made the cached features.
    lineage = Lineage(cfg_for(trained))
    used = [str(lineage.patch / "best.ckpt"), str(lineage.image / "best.ckpt")]
    assert [c["path"] for c in saved["provenance"]["checkpoints"]] == used
    assert (report / "config.yaml").is_file() and "<h2>Provenance</h2>" in page


def test_predict_on_raw_files_matches_evaluate(trained, tmp_path: Path) -> None:
    """The raw-image path (read, normalise, tile, CNN, aggregator) gives the cached path's
    probabilities: predict and evaluate run the same pipeline."""
    data = trained[0]
    run_stages(cfg_for(trained, "stages=[evaluate]", "evaluate.split=all"))
    reports = trained[1] / "work" / "reports"
    evaluated = max(reports.iterdir(), key=lambda p: p.stat().st_mtime)
    expected = {r["image_id"]: r for r in read_rows(evaluated / "predictions.csv")}
    out = tmp_path / "predicted"
    cfg = cfg_for(
        trained,
        "stages=[predict]",
        f"predict.input={data}",
        f"predict.output_dir={out}",
        "predict.include_training=true",  # the training images, scored as evaluate scores them
    )
    metrics = run_stages(cfg)
    assert metrics["predict/n_images"] == 16
    for row in read_rows(out / "predictions.csv"):
        want = expected[row["image_id"]]
        assert row["predicted"] == want["predicted"] and row["label"] == want["label"]
        for c in ("Normal", "Benign", "InSitu", "Invasive"):
            assert float(row[f"prob_{c}"]) == pytest.approx(float(want[f"prob_{c}"]), abs=2e-3)


def test_predict_goes_on_past_bad_files_and_fails_at_the_end(trained, tmp_path, caplog) -> None:
    folder = tmp_path / "external"
    for cls in ("Normal", "Invasive"):
        shutil.copytree(trained[0] / cls, folder / cls)
    (folder / "Invasive" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    tiny = folder / "Normal" / "tiny.png"
    shutil.copy(trained[0] / "Normal" / "n000.png", tiny)

    Image.open(tiny).resize((20, 20)).save(tiny)
    out = tmp_path / "out"
    cfg = cfg_for(
        trained,
        "stages=[predict]",
        f"predict.input={folder}",
        f"predict.output_dir={out}",
        "predict.include_training=true",  # copies of training images
    )
    with pytest.raises(DataError, match="2 of 10 file"):
        run_stages(cfg)
    rows = {r["image_id"]: r for r in read_rows(out / "predictions.csv")}
    assert len(rows) == 10
    assert "cannot read image" in rows["Invasive/broken"]["error"]
    assert rows["Normal/tiny"]["error"] == (
        f"{tiny}: 20x20 px, smaller than one 64x64 px tile: refused, as training refuses it "
        "(predict.fit=pad tiles it, padded with white)"
    )
    assert "1 of 10 input image(s) are smaller than one 64 px tile at the models' 0.42" in (
        caplog.text
    )
    assert rows["Invasive/broken"]["predicted"] == ""
    good = [r for r in rows.values() if not r["error"]]
    assert len(good) == 8 and all(r["predicted"] for r in good)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_images"] == 8 and saved["n_errors"] == 2
    right = sum(r["label"] == r["predicted"] for r in good) / 8
    assert saved["image_accuracy"] == pytest.approx(right)


def test_predict_unlabelled_file_has_no_metrics(trained, tmp_path: Path) -> None:
    image = tmp_path / "slide.png"
    shutil.copy(trained[0] / "Benign" / "b000.png", image)
    out = tmp_path / "out"
    cfg = cfg_for(
        trained, "stages=[predict]", f"predict.input={image}", f"predict.output_dir={out}"
    )
    metrics = run_stages(cfg)
    assert metrics["predict/n_images"] == 1 and not [k for k in metrics if "accuracy" in k]
    (row,) = read_rows(out / "predictions.csv")
    assert row["label"] == "" and row["predicted"] in ("Normal", "Benign", "InSitu", "Invasive")
    assert not (out / "metrics.json").exists()
    facts = json.loads((out / "provenance.json").read_text())
    assert [Path(c["path"]).name for c in facts["checkpoints"]] == ["best.ckpt", "best.ckpt"]


def wandb_records(path: Path) -> Iterator[bytes]:
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB's log format
    (32 KiB blocks; chunks with crc32c, little-endian length and type: full, first, middle,
    last). wandb ships no Python reader of its own any more."""
    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if (room := block - pos % block) < 7:  # a block's tail too small for a header: padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        assert int.from_bytes(data[pos : pos + 4], "little") == zlib.crc32(bytes([kind]) + chunk)
        parts += chunk
        pos += 7 + length
        if kind in (1, 4):  # full or last
            yield parts
            parts = b""


def read_wandb_run(run_dir: Path) -> tuple[dict, dict, dict, list]:
    """History (last value per key), summary, config and artifact types of a finished
    offline run (its ``exit`` record written)."""
    from wandb.proto import wandb_internal_pb2

    found: dict[str, dict] = {"history": {}, "summary": {}, "config": {}}
    artifacts, kind = [], None
    (log,) = run_dir.glob("*.wandb")
    for data in wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "artifact":
            artifacts.append(record.artifact.type)
        fields = {"history": "item", "summary": "update", "config": "update"}
        items = getattr(getattr(record, kind), fields[kind]) if kind in fields else None
        if items is not None:
            for item in items:
                key = item.key or "/".join(item.nested_key)
                found[kind][key] = json.loads(item.value_json)
    assert kind == "exit", f"{log} ends before the run's exit record"
    return found["history"], found["summary"], found["config"], artifacts


def run_offline(cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, Path]:
    """Run the stages of ``cfg`` into an offline W&B run; their metrics and the run's dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Offline model artifacts are staged in WANDB_DATA_DIR (~/.local/share/wandb by default).
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    import wandb

    from breastnet import tracking

    try:
        metrics = run_stages(cfg)
    finally:
        tracking.finish()
        # The W&B service may still be writing the run's file when finish() returns;
        # shutting it down closes the file (a later wandb.init starts a new service).
        wandb.teardown()
    (run_dir,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
    return metrics, run_dir


def test_wandb_offline_run_holds_metrics_images_and_config(
    trained, tmp_path: Path, monkeypatch
) -> None:
    cfg = cfg_for(
        trained,
        "stages=[patch,features,image,evaluate]",
        "logger=wandb",
        "patch_model.optimizer.lr=0.02",  # a new patch model: both Trainers log their curves
        f"paths.output_dir={tmp_path / 'hydra-run'}",
    )
    metrics, run_dir = run_offline(cfg, tmp_path, monkeypatch)
    history, summary, config, artifacts = read_wandb_run(run_dir)
    assert "model" in artifacts  # the patch and image models' checkpoints
    staged = [f for f in (tmp_path / "wandb-data").rglob("*") if f.is_file()]
    assert staged  # the checkpoint copies wait there for `wandb sync`, not in the home dir
    # Each stage under its own keys, in one run: every returned number is in the summary...
    for key, value in metrics.items():
        assert summary[key] == (value if isinstance(value, str) else pytest.approx(value)), key
    assert {"patch/test_acc", "features/patch_acc_test", "image/val_acc_best"} <= set(summary)
    # no number without its protocol, balanced accuracy beside accuracy
    assert summary["eval/protocol"].startswith("holdout-0.5-0.25-0.25-seed2019-")
    assert "eval/balanced_accuracy" in summary
    # ...and both models' curves, which never share a key.
    for stage in ("patch", "image"):
        for name in ("train_loss", "train_acc", "val_loss", "val_acc", "val_select", "test_acc"):
            assert f"{stage}/{name}" in history, f"{stage}/{name}"
        assert f"{stage}/val_recall_Normal" in history
    assert not [k for k in history if k.split("/")[0] in ("train", "val", "test")]
    images = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(images) >= 4  # confusion matrix, ROC, t-SNE, patch grid (+ heatmaps)
    wrong = round(4 * (1 - metrics["eval/image_accuracy"]))
    assert history["eval/misclassified/_type"] == "table-file"
    assert history["eval/misclassified/nrows"] == wrong
    assert {
        "_wandb/visualize/eval/confusion_matrix_chart",
        "_wandb/visualize/eval/roc_chart",
    } <= set(config)
    # The whole resolved Hydra config, not only the model's hyperparameters.
    assert config["image_model"]["aggregator"]["_target_"].endswith(".Attention")
    assert config["data"]["tile_size"] == 64


GROUPS_ONLY = "{Normal:non_carcinoma,Benign:non_carcinoma,InSitu:carcinoma,Invasive:carcinoma}"


@pytest.mark.parametrize("label_map", ["null", GROUPS_ONLY])
def test_wandb_run_of_predict_alone_holds_config_and_metrics(
    trained, tmp_path: Path, monkeypatch, capsys, label_map: str
) -> None:
    """No Trainer starts this run: the config and the numbers come from tracking, the
    2-class ones too, and they alone when the labels are only the groups."""
    cfg = cfg_for(
        trained,
        "stages=[predict]",
        "logger=wandb",
        f"predict.input={trained[0]}",
        f"predict.output_dir={tmp_path / 'out'}",
        f"paths.output_dir={tmp_path / 'hydra-run'}",
        f"predict.label_map={label_map}",
        "predict.include_training=true",
    )
    metrics, run_dir = run_offline(cfg, tmp_path, monkeypatch)
    _, summary, config, _ = read_wandb_run(run_dir)
    assert summary["predict/n_images"] == 16 == metrics["predict/n_images"]
    # The printed upload command finds this run from any directory, as printed.
    (hint,) = [line for line in capsys.readouterr().out.splitlines() if "wandb sync" in line]
    command = shlex.split(hint.split("to upload it: ")[1]) + ["--dry-run"]
    assert command[:2] == ["wandb", "sync"] and Path(command[2]) == run_dir.resolve()
    wandb_cli = Path(sys.executable).with_name("wandb")
    found = subprocess.run(
        [str(wandb_cli), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert found.returncode == 0 and "No runs" not in found.stdout + found.stderr
    assert summary["predict/carcinoma_auc"] == pytest.approx(metrics["predict/carcinoma_auc"])
    assert summary["predict/carcinoma_n_images"] == 16
    if label_map == "null":
        accuracy = summary["predict/image_accuracy"]
        assert accuracy == pytest.approx(metrics["predict/image_accuracy"])
    else:
        assert "predict/image_accuracy" not in summary and "predict/image_accuracy" not in metrics
    assert config["predict"]["input"] == str(trained[0])
    assert config["image_model"]["aggregator"]["_target_"].endswith(".Attention")


@pytest.mark.parametrize("fit", ["pad", "overlap", "trim"])
def test_predict_one_small_file_under_each_fit_rule(trained, tmp_path, capsys, caplog, fit):
    """A 700x460 file at 0.0525 µm/px (BreakHis 400X-like) is 88x58 px at the models' 0.42:
    smaller than one 64 px tile in height. pad gives it 2 patches, mostly white, and says so;
    overlap and trim refuse it, as training does."""
    image = cv2.resize(np.asarray(Image.open(trained[0] / "InSitu" / "is000.png")), (700, 460))
    path = write_image(tmp_path / "slide.png", image)
    out = tmp_path / "out"
    cfg = cfg_for(
        trained,
        "stages=[predict]",
        f"predict.input={path}",
        f"predict.output_dir={out}",
        "predict.mpp=0.0525",
        f"predict.fit={fit}",
    )
    small = "1 input image(s) are smaller than one 64 px tile at the models' 0.42 µm/px"
    if fit != "pad":
        refused = (
            f"{path}: 700x460 px at 0.0525 µm/px is 88x58 px at the models' 0.42 µm/px, "
            "smaller than one 64x64 px tile: refused, as training refuses it (predict.fit=pad "
            "tiles it, padded with white)"
        )
        with pytest.raises(DataError, match=re.escape(refused)):
            run_stages(cfg)
        assert f"1 of {small}: refused" in caplog.text
    else:
        run_stages(cfg)
        tissue = re.search(r"their 2 tile\(s\) are (\d+) % tissue on average", caplog.text)
        assert f"predict.fit=pad: 1 of {small} and were padded with white" in caplog.text
        assert tissue is not None and 0 < int(tissue.group(1)) < 100
    (row,) = read_rows(out / "predictions.csv")
    assert row["n_patches"] == ("2" if fit == "pad" else "")
    assert row["mpp"] == "0.0525"
    # the file's pixel size beside the tiling's, as predictions.csv has it
    page = (out / "index.html").read_text()
    assert "the images: 0.0525 µm/px (predict.mpp), rescaled to the tiling&#x27;s 0.42" in page
    printed = capsys.readouterr().out
    if fit == "pad":  # one file: its class and probabilities on the terminal
        assert f"{path}: {row['predicted']} (Normal {float(row['prob_Normal']):.3f}," in printed
        assert f"carcinoma {float(row['prob_carcinoma']):.3f}) from 2 patches" in printed


def test_predict_on_an_external_set_of_other_sizes_and_label_names(
    trained, tmp_path, caplog, capsys
):
    """An external set as another lab hands it over: the training images at half the pixel
    size (TIFF tags) in 2-class Benign/ and Malignant/ folders, crops smaller than a tile
    (padded: predict.fit=pad), a 4-class folder at the models' pixel size and a folder
    nothing maps. Every file is used, so predict exits 0, and it scores the 4-class and the
    2-class labels."""
    data, ext = trained[0], tmp_path / "external"
    rescan(data, ext, mpp=0.21)  # 256x192 -> 512x384 TIFFs
    crops = ["InSitu/is001", "Normal/n001"]
    rescan(data, ext / "crops", crop=(88, 58), image_ids=crops, tags=False)
    shutil.copytree(data / "Normal", ext / "Normal")
    write_image(ext / "Unsorted" / "x.png", tissue_like(7, 192, 256))
    out = tmp_path / "out"
    cfg = cfg_for(
        trained,
        "stages=[predict]",
        f"predict.input={ext}",
        f"predict.output_dir={out}",
        "predict.label_map={Benign:non_carcinoma,Malignant:carcinoma}",
        "predict.include_training=true",  # Normal/ holds copies of training images
        "predict.fit=pad",
    )
    metrics = run_stages(cfg)
    assert "'Unsorted' (1 file)" in caplog.text
    assert caplog.text.count("were padded with white") == 1
    assert "predict.fit=pad: 2 of 23 input image(s) are smaller than one 64 px tile" in (
        caplog.text
    )
    # PNG copies and crops without tags, and Unsorted/x.png: said once, with their count.
    assert caplog.text.count("carry no pixel size") == 1
    assert "7 of 23 file(s) carry no pixel size" in caplog.text
    assert "taken as data.mpp=0.42 µm/px" in caplog.text and "set predict.mpp=" in caplog.text
    printed = capsys.readouterr().out
    # Unsorted/ is not scored: the headline says so, and is no accuracy of the folder.
    assert f"2-class image accuracy on 22 of the 23 images of {ext}: " in printed
    assert "1 image(s) without a label for this view): not an accuracy of the folder" in printed
    assert metrics["predict/n_images"] == 16 + 2 + 4 + 1
    assert metrics["predict/carcinoma_n_images"] == 16 + 2 + 4  # all but Unsorted/
    saved = json.loads((out / "metrics.json").read_text())
    assert metrics["predict/image_accuracy"] == saved["image_accuracy"]
    assert saved["n_images"] == 4 and saved["two_class"]["n_carcinoma"] == 8 + 1
    page = (out / "index.html").read_text()
    assert "Carcinoma vs non-carcinoma" in page
    assert "the images: 0.21 µm/px (TIFF tags, else data.mpp), rescaled to the tiling" in page
    assert "7, assumed to be 0.42 µm/px" in page

    rows = {r["image_id"]: r for r in read_rows(out / "predictions.csv")}
    assert rows["Malignant/iv000"]["label"] == "carcinoma"
    assert rows["Benign/n000"]["label"] == "non_carcinoma" and rows["Unsorted/x"]["label"] == ""
    # Half the pixel size, rescaled back: the same 4x3 grid, nearly the same probabilities.
    for name in ("n000", "n001", "n002", "n003"):
        rescanned, original = rows[f"Benign/{name}"], rows[f"Normal/{name}"]
        assert (rescanned["mpp"], original["mpp"]) == ("0.21", "0.42")
        assert rescanned["n_patches"] == original["n_patches"] == "12"
        for c in ("Normal", "Benign", "InSitu", "Invasive"):
            p, q = float(rescanned[f"prob_{c}"]), float(original[f"prob_{c}"])
            assert p == pytest.approx(q, abs=0.05)
    assert rows["crops/Malignant/is001"]["n_patches"] == "2"


def test_predict_on_its_own_training_folder(trained, tmp_path, caplog, capsys) -> None:
    """The demo's training folder given back to predict: its 8 training and 4 val images
    are found by content hash, warned about and left out of the scores (4 test images are
    scored), the generated training data are named; include_training scores all 16."""
    data, out = trained[0], tmp_path / "out"
    cfg = cfg_for(
        trained, "stages=[predict]", f"predict.input={data}", f"predict.output_dir={out}"
    )
    metrics = run_stages(cfg)
    assert metrics["predict/training_images"] == 12 and metrics["predict/n_images"] == 16
    assert metrics["predict/carcinoma_n_images"] == 4
    assert "12 input file(s) are images the model was trained or selected on (8 train, 4 val" in (
        caplog.text
    )
    assert "left out of the scores; predict.include_training=true scores them" in caplog.text
    assert "the model was trained on generated images" in caplog.text
    printed = capsys.readouterr().out
    assert f"4-class image accuracy on 4 of the 16 images of {data}: " in printed
    assert "12 training image(s) left out): not an accuracy of the folder" in printed
    assert f"report: {out / 'index.html'}" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_images"] == 4 and saved["n_images_by_view"] == {"4-class": 4, "2-class": 4}
    inputs = saved["inputs"]
    assert len(inputs["training_images"]) == 12 and inputs["generated"] is True
    assert inputs["training_split"] == Lineage(cfg).outer_split.stem
    assert inputs["feature_shift"]["n_images"] == 16
    assert inputs["feature_shift"]["n_far"] <= 4  # the training images are their own nearest
    page = (out / "index.html").read_text()
    assert "generated images, not real tissue" in page and "left out of the scores" in page

    scored = run_stages(
        cfg_for(
            trained,
            "stages=[predict]",
            f"predict.input={data}",
            f"predict.output_dir={tmp_path / 'all'}",
            "predict.include_training=true",
        )
    )
    assert scored["predict/carcinoma_n_images"] == 16 and scored["predict/training_images"] == 12


def test_inputs_unlike_the_training_images_are_flagged(trained, tmp_path, caplog, capsys) -> None:
    """Pixel noise lies farther from every training image than they lie from each other."""
    folder = tmp_path / "noise"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(folder / f"{i}.png", rng.integers(0, 256, (192, 256, 3), dtype=np.uint8))
    out = tmp_path / "out"
    cfg = cfg_for(
        trained, "stages=[predict]", f"predict.input={folder}", f"predict.output_dir={out}"
    )
    metrics = run_stages(cfg)
    assert metrics["predict/far_from_training"] > 0 and metrics["predict/training_images"] == 0
    far = round(3 * metrics["predict/far_from_training"])
    assert f"{far} of 3 input image(s) ({100 * far / 3:.0f} %) lie farther from every" in (
        caplog.text
    )
    assert "far from the training images" in (out / "index.html").read_text()
    assert f"far from the training images: {far} of 3 input images" in capsys.readouterr().out


def test_a_missing_artifact_names_the_nearest_and_the_override_to_it(trained) -> None:
    """debug=default's batch limits key new models: the message's first line names the
    features of the nearest settings and the override that reaches them."""
    lineage = Lineage(cfg_for(trained))
    limited = cfg_for(trained, "stages=[image]", "+trainer.limit_train_batches=2")
    with pytest.raises(FileNotFoundError) as caught:
        run_stages(limited)
    assert str(caught.value).splitlines()[0] == (
        f"{Lineage(limited).features} not found: run the features stage first; the nearest, "
        f"{lineage.features} (1 setting away): drop trainer.limit_train_batches (or add "
        "~trainer.limit_train_batches)"
    )
    with pytest.raises(FileNotFoundError) as caught:
        run_stages(cfg_for(trained, "stages=[evaluate]", "image.max_epochs=4"))
    assert (
        str(caught.value)
        .splitlines()[0]
        .endswith(f"; the nearest, {lineage.image} (1 setting away): add image.max_epochs=3")
    )


def test_evaluate_holds_its_report_from_the_first_part_to_the_last(
    trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second job evaluating the same report (a requeue) waits: the first writes its parts
    and drops them under one lock, so neither reads parts the other deleted."""
    from filelock import FileLock, Timeout

    from breastnet.artifacts import lock_path
    from breastnet.stages import evaluate

    cfg = cfg_for(trained, "stages=[evaluate]", "evaluate.split=val")
    report = Lineage(cfg).report("val")
    held = []
    run_parts = evaluate.predict_images

    def predict_while_locked(*args, **kwargs):
        try:
            FileLock(lock_path(report / "evaluate.run")).acquire(timeout=0)
            held.append(False)
        except Timeout:
            held.append(True)
        return run_parts(*args, **kwargs)

    monkeypatch.setattr(evaluate, "predict_images", predict_while_locked)
    assert run_stages(cfg)["eval/n_images"] == 4
    assert held == [True] and not (report / ".parts").exists()


def test_predict_drops_its_own_parts_and_no_other_models(trained, tmp_path: Path) -> None:
    out = tmp_path / "predicted"
    other = out / ".parts" / "another-model" / "Normal" / "n000.pt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"an interrupted predict of another model")
    cfg = cfg_for(
        trained,
        "stages=[predict]",
        f"predict.input={trained[0] / 'Normal'}",
        f"predict.output_dir={out}",
    )
    run_stages(cfg)
    assert other.is_file() and not Lineage(cfg).predict_parts().exists()
