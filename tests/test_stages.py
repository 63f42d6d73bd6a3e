"""The training stages: patch checkpoints, resume, features, and reuse across reruns."""

import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from test_cli import make_cfg

from breastnet.cli import run_stages
from breastnet.data.synthetic import write_synthetic_dataset
from breastnet.inference import load_patch_model
from breastnet.lineage import Lineage
from breastnet.models.embedding import embed_patches
from breastnet.stages import common
from breastnet.trainer import EpochSeed

pytestmark = pytest.mark.usefixtures("one_thread")  # steadier on a busy 2-core machine

SMALL = [
    "experiment=demo",
    "data.tile_size=64",
    "data.stride=64",
    "data.patch_size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.prepare_workers=0",
    "data.split=[0.5,0.25,0.25]",
    "patch_model=mobilenet_v2",
    "patch_model.net.weights=none",
    "patch_model.optimizer.lr=0.01",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "+trainer.enable_progress_bar=false",
    "logger=none",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("demo"), 4, 256, 192, seed=5)


def test_prepare_patch_features(demo: Path, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, *SMALL, f"data.data_dir={demo}", "features.tta=true")
    with open_dict(cfg):
        cfg.stages = ["prepare", "patch", "features"]
    metrics = run_stages(cfg)
    # The stage's test accuracy is the best checkpoint's, over exactly the test patches.
    test = instantiate(cfg.data, mode="patch")
    test.setup()
    test = test.datasets["test"]
    x = torch.stack([test[i]["x"] for i in range(len(test))])
    y = torch.tensor([int(test[i]["y"]) for i in range(len(test))])
    with torch.no_grad():
        _, probs = embed_patches(load_patch_model(cfg, Lineage(cfg)).net, x, 64)
    right = (probs.argmax(1) == y).float().mean()
    assert metrics["patch/test_acc"] == pytest.approx(float(right), abs=1e-6)
    assert set(metrics) >= {f"features/patch_acc_{s}" for s in ("train", "val", "test")}
    (patch_dir,) = (tmp_path / "work" / "patch").iterdir()
    assert {"best.ckpt", "last.ckpt", "DONE", "metrics.json", "config.yaml"} <= {
        p.name for p in patch_dir.iterdir()
    }
    (features_file,) = (tmp_path / "work" / "features").glob("*.pt")
    saved = torch.load(features_file, weights_only=False)
    assert len(saved["images"]) == 16 and saved["tta"] is True
    image = saved["images"]["Normal/n000"]
    assert image["features"].shape == (12, 1280) and image["probs"].shape == (12, 4)
    assert torch.allclose(image["probs"].sum(1), torch.ones(12), atol=1e-5)
    assert image["positions"][-1].tolist() == [2, 3]
    assert {i["split"] for i in saved["images"].values()} == {"train", "val", "test"}
    # A rerun reuses every artifact and returns the same numbers.
    mtime = features_file.stat().st_mtime_ns
    assert run_stages(cfg) == metrics and features_file.stat().st_mtime_ns == mtime


def test_features_without_a_patch_model_says_what_to_run(demo: Path, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, *SMALL, f"data.data_dir={demo}", "stages=[prepare,features]")
    with pytest.raises(FileNotFoundError, match="run the patch stage first"):
        run_stages(cfg)


class _StopAfterFirstEpoch(EpochSeed):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


class _StopMidSecondEpoch(EpochSeed):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            raise KeyboardInterrupt
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


@pytest.mark.parametrize(
    ("stop", "loader"),
    [
        (_StopAfterFirstEpoch, ["data.num_workers=0"]),
        # Workers prefetch before Lightning sets the resumed epoch on the sampler.
        (_StopMidSecondEpoch, ["data.num_workers=2", "data.persistent_workers=true"]),
    ],
)
def test_interrupted_training_resumes_to_the_same_weights(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: type, loader: list[str]
) -> None:
    args = [*SMALL, f"data.data_dir={demo}", "stages=[prepare,patch]", *loader]
    straight = make_cfg(tmp_path / "a", *args)
    expected = run_stages(straight)
    (a_dir,) = (tmp_path / "a" / "work" / "patch").iterdir()

    resumed = make_cfg(tmp_path / "b", *args)
    monkeypatch.setattr(common, "EpochSeed", stop)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C
        run_stages(resumed)
    (b_dir,) = (tmp_path / "b" / "work" / "patch").iterdir()
    assert (b_dir / "last.ckpt").is_file() and not (b_dir / "DONE").exists()
    monkeypatch.undo()
    # val_acc_best counts the epochs before the interruption too: checkpoints keep it.
    assert run_stages(resumed) == pytest.approx(expected)

    a = torch.load(a_dir / "last.ckpt", weights_only=False)
    b = torch.load(b_dir / "last.ckpt", weights_only=False)
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.allclose(value, b["state_dict"][key], atol=1e-6), key


def test_image_stage_alone_reproduces_the_pipeline(demo: Path, tmp_path: Path) -> None:
    """Each stage is seeded by its place in the pipeline: ``stages=[image]`` on its own
    trains the weights the whole pipeline trained (global RNG use before it does not count)."""
    args = [*SMALL, f"data.data_dir={demo}", "image_model.max_epochs=2"]
    run_stages(make_cfg(tmp_path, *args, "stages=[prepare,patch,features,image]"))
    (image_dir,) = (tmp_path / "work" / "image").iterdir()
    whole = torch.load(image_dir / "best.ckpt", weights_only=False)["state_dict"]
    shutil.rmtree(image_dir)
    torch.rand(100)  # whatever ran before in this process
    run_stages(make_cfg(tmp_path, *args, "stages=[image]"))
    alone = torch.load(image_dir / "best.ckpt", weights_only=False)["state_dict"]
    assert whole.keys() == alone.keys()
    assert all(torch.equal(whole[k], alone[k]) for k in whole)


def test_image_stage_with_every_aggregator(demo: Path, tmp_path: Path) -> None:
    upstream = make_cfg(
        tmp_path, *SMALL, f"data.data_dir={demo}", "stages=[prepare,patch,features]"
    )
    run_stages(upstream)
    features_file = next((tmp_path / "work" / "features").glob("*.pt"))
    dm = instantiate(
        upstream.data, mode="features", features_path=str(features_file), batch_size=3
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (3, 12, 1280) and batch["probs"].shape == (3, 12, 4)
    assert batch["mask"].all() and dm.feature_dim == 1280

    results = {}
    for name in ("bilstm", "attention", "mean_features", "mean", "vote"):
        cfg = make_cfg(
            tmp_path,
            *SMALL,
            f"data.data_dir={demo}",
            "stages=[image]",
            f"image_model={name}",
            "image_model.max_epochs=3",
        )
        results[name] = run_stages(cfg)
    assert len(list((tmp_path / "work" / "image").iterdir())) == 5
    saved = torch.load(features_file, weights_only=False)["images"]
    test = [i for i in saved.values() if i["split"] == "test"]
    for name, result in results.items():  # a fraction of exactly the test images
        assert result["image/test_acc"] * len(test) == pytest.approx(
            round(result["image/test_acc"] * len(test))
        ), name
    # Vote and mean need no training: their accuracy follows from the patch probabilities.
    val = [i for i in saved.values() if i["split"] == "val"]
    mean_right = sum(int(i["probs"].mean(0).argmax() == i["label"]) for i in val)
    assert results["mean"]["image/val_acc_best"] == pytest.approx(mean_right / len(val))
    mean_right = sum(int(i["probs"].mean(0).argmax() == i["label"]) for i in test)
    assert results["mean"]["image/test_acc"] == pytest.approx(mean_right / len(test))
    votes = [torch.bincount(i["probs"].argmax(1), minlength=4) for i in test]
    clear = [(v, i) for v, i in zip(votes, test, strict=True) if (v == v.max()).sum() == 1]
    assert clear  # images whose vote has no tie: their prediction is the majority class
    vote_wrong = sum(int(v.argmax() != i["label"]) for v, i in clear)
    assert results["vote"]["image/test_acc"] <= 1 - vote_wrong / len(test) + 1e-6


def test_image_stage_end_to_end(demo: Path, tmp_path: Path) -> None:
    """The CNN+BiLSTM fine-tuned as one, from the patch stage's best checkpoint."""
    args = [*SMALL, f"data.data_dir={demo}", "data.num_workers=0"]
    run_stages(make_cfg(tmp_path, *args, "stages=[prepare,patch]"))
    cfg = make_cfg(
        tmp_path,
        *args,
        "stages=[image]",
        "image_model.end_to_end=true",
        "image_model.max_epochs=1",
        "image_model.batch_size=4",
        "image_model.aggregator.hidden_size=16",
    )
    metrics = run_stages(cfg)
    (image_dir,) = (tmp_path / "work" / "image").iterdir()
    state = torch.load(image_dir / "best.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("backbone.") for k in state) and any("lstm" in k for k in state)
    # Evaluate runs the fine-tuned CNN of the image model itself (no features file exists).
    with open_dict(cfg):
        cfg.stages = ["evaluate"]
    evaluated = run_stages(cfg)
    assert evaluated["eval/image_accuracy"] == pytest.approx(metrics["image/test_acc"])
