"""The training stages: patch checkpoints, resume, features, and reuse across reruns."""

import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from breastnet.cli import run_stages
from breastnet.data.feature_store import FeatureStore
from breastnet.inference.models import load_image_model, load_patch_model
from breastnet.lineage import Lineage
from breastnet.models.embedding import embed_patches
from breastnet.stages import common
from breastnet.synthetic import write_synthetic_dataset
from breastnet.trainer import EpochSeed

from conftest import SMALL_RUN, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")  # steadier on a busy 2-core machine


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("demo"), 4, 256, 192, seed=5)


def test_prepare_patch_features(demo: Path, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, *SMALL_RUN, f"data.data_dir={demo}", "features.tta=true")
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
    (store_dir,) = (tmp_path / "work" / "features").iterdir()
    store = FeatureStore(store_dir)
    assert store_dir == Lineage(cfg).features and not list(store_dir.parent.glob("*.parts"))
    assert len(store) == 16 and store.meta["tta"] is True and store.width == 1280
    image = store.load("Normal/n000")
    assert image["features"].shape == (12, 1280) and image["probs"].shape == (12, 4)
    assert torch.allclose(image["probs"].sum(1), torch.ones(12), atol=1e-5)
    assert image["positions"][-1].tolist() == [2, 3]
    row = store.rows["Normal/n000"]
    assert (row.n_tiles, row.width, row.encoder) == (12, 1280, Lineage(cfg).patch.name)
    sha1 = {e.image_id: e.sha1 for e in Lineage(cfg).entries}
    assert (store_dir / row.path).is_file() and row.sha1 == sha1["Normal/n000"]
    assert not {"label", "split"} & set(store.load("Normal/n000"))  # joined from the index
    # A rerun reuses every artifact and returns the same numbers.
    mtime = store.manifest_path.stat().st_mtime_ns
    assert run_stages(cfg) == metrics and store.manifest_path.stat().st_mtime_ns == mtime


def test_features_without_a_patch_model_says_what_to_run(demo: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path, *SMALL_RUN, f"data.data_dir={demo}", "stages=[prepare,features]"
    )
    with pytest.raises(FileNotFoundError, match="run the patch stage first"):
        run_stages(cfg)


def test_patches_too_small_for_the_backbone_fail_before_training(
    demo: Path, tmp_path: Path
) -> None:
    args = [o for o in SMALL_RUN if not o.startswith("patch_model=")]  # 32 px patches
    cfg = compose_config(
        tmp_path,
        *args,
        f"data.data_dir={demo}",
        "stages=[prepare,patch]",
        "patch_model=inception_v3",
        "patch_model.net.weights=none",
        "patch_model.aux_weight=0",
    )
    with pytest.raises(
        ValueError, match="data.patch_size=32 is below the 75 px that inception_v3"
    ):
        run_stages(cfg)
    assert not list((tmp_path / "work" / "patch").rglob("*.ckpt"))


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
    args = [*SMALL_RUN, f"data.data_dir={demo}", "stages=[prepare,patch]", *loader]
    straight = compose_config(tmp_path / "a", *args)
    expected = run_stages(straight)
    (a_dir,) = (tmp_path / "a" / "work" / "patch").iterdir()

    resumed = compose_config(tmp_path / "b", *args)
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
    args = [*SMALL_RUN, f"data.data_dir={demo}", "image.max_epochs=2"]
    run_stages(compose_config(tmp_path, *args, "stages=[prepare,patch,features,image]"))
    (image_dir,) = (tmp_path / "work" / "image").iterdir()
    whole = torch.load(image_dir / "best.ckpt", weights_only=False)["state_dict"]
    shutil.rmtree(image_dir)
    torch.rand(100)  # whatever ran before in this process
    run_stages(compose_config(tmp_path, *args, "stages=[image]"))
    alone = torch.load(image_dir / "best.ckpt", weights_only=False)["state_dict"]
    assert whole.keys() == alone.keys()
    assert all(torch.equal(whole[k], alone[k]) for k in whole)


def test_image_stage_with_every_aggregator(demo: Path, tmp_path: Path) -> None:
    upstream = compose_config(
        tmp_path, *SMALL_RUN, f"data.data_dir={demo}", "stages=[prepare,patch,features]"
    )
    run_stages(upstream)
    features_dir = Lineage(upstream).features
    dm = instantiate(upstream.data, mode="features", features_path=str(features_dir), batch_size=3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (3, 12, 1280) and batch["probs"].shape == (3, 12, 4)
    assert batch["mask"].all() and dm.feature_dim == 1280

    results, cfgs = {}, {}
    for name in ("bilstm", "attention", "mean_features", "mean", "vote"):
        cfgs[name] = compose_config(
            tmp_path,
            *SMALL_RUN,
            f"data.data_dir={demo}",
            "stages=[image]",
            f"image_model={name}",
            "image.max_epochs=3",
        )
        results[name] = run_stages(cfgs[name])
    assert len(list((tmp_path / "work" / "image").iterdir())) == 5
    # Each stage's test accuracy is its best checkpoint's, over exactly the test images.
    test_batches = list(dm.test_dataloader())
    n_test = sum(len(b["y"]) for b in test_batches)
    for name, cfg in cfgs.items():
        model = load_image_model(cfg, Lineage(cfg))
        with torch.no_grad():
            right = sum(
                int((model.model_step(b)[1].argmax(1) == b["y"]).sum()) for b in test_batches
            )
        assert results[name]["image/test_acc"] == pytest.approx(right / n_test, abs=1e-6), name
    # Vote and mean need no training: their accuracy follows from the patch probabilities.
    store, split = FeatureStore(features_dir), dm.prepared.split
    saved = {i: store.load(i) | {"label": dm.prepared.labels[i]} for i in store}
    val = [saved[i] for i in split["val"]]
    test = [saved[i] for i in split["test"]]
    assert len(test) == n_test
    mean_right = sum(int(i["probs"].mean(0).argmax() == i["label"]) for i in val)
    assert results["mean"]["image/val_acc_best"] == pytest.approx(mean_right / len(val))
    mean_right = sum(int(i["probs"].mean(0).argmax() == i["label"]) for i in test)
    assert results["mean"]["image/test_acc"] == pytest.approx(mean_right / len(test))

    def vote(probs: torch.Tensor) -> int:
        """The majority class of the patches; a tie goes to the larger summed probability."""
        counts = torch.bincount(probs.argmax(1), minlength=probs.shape[1])
        return int(probs.sum(0).masked_fill(counts < counts.max(), -1).argmax())

    vote_right = sum(int(vote(i["probs"]) == i["label"]) for i in test)
    assert results["vote"]["image/test_acc"] == pytest.approx(vote_right / len(test))


def test_image_stage_end_to_end(demo: Path, tmp_path: Path) -> None:
    """The CNN+BiLSTM fine-tuned as one, from the patch stage's best checkpoint."""
    args = [*SMALL_RUN, f"data.data_dir={demo}", "data.num_workers=0"]
    run_stages(compose_config(tmp_path, *args, "stages=[prepare,patch]"))
    cfg = compose_config(
        tmp_path,
        *args,
        "stages=[image]",
        "image.end_to_end=true",
        "image.max_epochs=1",
        "image.batch_size=4",
        "image_model.aggregator.hidden_size=16",
    )
    metrics = run_stages(cfg)
    (image_dir,) = (tmp_path / "work" / "image").iterdir()
    state = torch.load(image_dir / "best.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("backbone.") for k in state) and any("lstm" in k for k in state)
    # The CNN trained in train mode: its BatchNorm statistics moved from the patch model's.
    (patch_dir,) = (tmp_path / "work" / "patch").iterdir()
    patch = torch.load(patch_dir / "best.ckpt", weights_only=False)["state_dict"]
    stats = [k for k in patch if k.startswith("net.") and k.endswith("running_mean")]
    assert stats and any(
        not torch.equal(patch[k], state["backbone." + k.removeprefix("net.")]) for k in stats
    )
    # Evaluate runs the fine-tuned CNN of the image model itself (no features file exists).
    with open_dict(cfg):
        cfg.stages = ["evaluate"]
    evaluated = run_stages(cfg)
    assert evaluated["eval/image_accuracy"] == pytest.approx(metrics["image/test_acc"])
