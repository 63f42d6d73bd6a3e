"""timm backbones and the foundation-encoder registry: every entry's architecture on the meta
device, strict weight files, frozen and partly fine-tuned encoders through the pipeline, the
features store (resume, manifest), weights keyed by content. Random initialisation only:
nothing is downloaded."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from safetensors.torch import save_file

from breastnet.cli import run_stages
from breastnet.data.feature_store import FeatureStore
from breastnet.errors import ConfigError, is_user_error, unwrap
from breastnet.inference.runner import PartWriter
from breastnet.lineage import Lineage
from breastnet.models.timm_backbone import TimmBackbone, build_timm_backbone
from breastnet.synthetic import write_synthetic_dataset

from conftest import CONF, SHARED_MOBILENET, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRIES = sorted(
    p.stem for p in (CONF / "patch_model").glob("*.yaml") if "  - timm\n" in p.read_text()
)
"""The registry: every conf/patch_model entry built on timm.yaml."""
TINY = ["patch_model=timm", "patch_model.net.name=vit_tiny_patch16_224"]
# The tiny ViT at 64 px (4 x 4 patches): the whole pipeline in seconds on a CPU.
TINY_64 = [*TINY, "+patch_model.net.kwargs.img_size=64", "patch_model.net.input_size=64"]
FOUNDATION_RUN = [
    "experiment=foundation",
    "data=synthetic",
    *TINY_64,
    "data.batch_size=16",
    "data.num_workers=0",
    "data.prepare_workers=0",
    "data.split=[0.5,0.25,0.25]",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "+trainer.enable_progress_bar=false",
    "image.max_epochs=3",
    "features.images_per_batch=4",
    "logger=none",
]


def test_registry_holds_every_encoder_of_the_leaderboard() -> None:
    assert set(ENTRIES) == {
        "uni",
        "uni2_h",
        "virchow2",
        "h_optimus_0",
        "h_optimus_1",
        "prov_gigapath",
        "kaiko_vits16",
        "kaiko_vitb8",
        "kaiko_vitl14",
        "lunit_vits16",
        "phikon",
    }


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_builds_on_meta_with_its_width_and_normalisation(
    entry: str, tmp_path: Path
) -> None:
    """A wrong kwarg (a missing SwiGLU, register tokens, patch size) shows without weights:
    the architecture is built on the meta device and run on a meta batch of its input size."""
    net_cfg = compose_config(tmp_path, f"patch_model={entry}").patch_model.net
    with torch.device("meta"):
        net = instantiate(net_cfg, weights="none")
        features = net.forward_features(torch.empty(2, 3, net.input_size, net.input_size))
    assert features.shape == (2, net_cfg.width) and net.feature_dim == net_cfg.width
    assert net.mean == tuple(net_cfg.mean) and net.std == tuple(net_cfg.std)
    assert net.input_size == 224 and net.mpp == net_cfg.mpp and net_cfg.licence
    assert net_cfg.embedding in ("cls", "cls_mean")


def test_images_are_normalised_with_the_entry_mean_and_std(tmp_path: Path) -> None:
    net_cfg = compose_config(tmp_path, "patch_model=lunit_vits16").patch_model.net
    net = instantiate(net_cfg, weights="none", name="vit_tiny_patch16_224", width=192)
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(net_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(net_cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(net.normalize(x), (x / 255.0 - mean) / std)
    # Any other timm model: timm's own defaults for it.
    assert build_timm_backbone(name="resnet18").mean == pytest.approx((0.485, 0.456, 0.406))


def test_a_stated_width_that_the_model_does_not_give_fails() -> None:
    with pytest.raises(ValueError, match="gives cls_mean features of 384, not 192"):
        TimmBackbone("vit_tiny_patch16_224", embedding="cls_mean", width=192)


def test_cls_mean_is_the_class_token_beside_the_mean_patch_token() -> None:
    net = TimmBackbone("vit_tiny_patch16_224", {"reg_tokens": 4}, embedding="cls_mean").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = net.model.forward_features(x)  # B x (1 + 4 + 196) x 192
        features = net.forward_features(x)
    assert features.shape == (2, 384)
    torch.testing.assert_close(features[:, :192], tokens[:, 0])
    torch.testing.assert_close(features[:, 192:], tokens[:, 5:].mean(1))


def _tiny_weights(path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """A random-init tiny ViT's state dict, saved to ``path`` (by its suffix)."""
    state = TimmBackbone("vit_tiny_patch16_224", kwargs).model.state_dict()
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state} if path.suffix == ".pth" else state, path)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pth"])
def test_a_state_dict_file_reloads_to_identical_outputs(tmp_path: Path, suffix: str) -> None:
    """Plain (.bin, .safetensors) and nested under ``state_dict`` (.pth)."""
    file = tmp_path / f"model{suffix}"
    source = TimmBackbone("vit_tiny_patch16_224").eval()
    source.model.load_state_dict(_tiny_weights(file))
    net = build_timm_backbone(name="vit_tiny_patch16_224", weights=str(file)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), source.forward_features(x))
    assert net.pretrained


def test_a_wrong_file_is_refused_naming_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = TimmBackbone("vit_tiny_patch16_224").model.state_dict()
    del state["blocks.11.mlp.fc2.weight"]
    state["blocks.12.attn.qkv.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError) as err:
        build_timm_backbone(name="vit_tiny_patch16_224", weights=tmp_path / "wrong.safetensors")
    message = str(err.value)
    assert "1 missing keys (blocks.11.mlp.fc2.weight)" in message
    assert "1 unexpected keys (blocks.12.attn.qkv.weight)" in message
    assert "wrong.safetensors" in message and "vit_tiny_patch16_224" in message


def test_missing_hub_weights_are_one_error_naming_the_repo_and_gating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline with an empty Hugging Face cache: the error says what to download from where,
    that it is gated, and where the file goes; no model is built first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    net_cfg = compose_config(tmp_path, "patch_model=uni2_h").patch_model.net
    with pytest.raises(InstantiationException) as err:
        instantiate(net_cfg)
    assert is_user_error(err.value)  # the command line shows its message, no traceback
    message = str(unwrap(err.value))
    assert "https://huggingface.co/MahmoodLab/UNI2-h" in message and "gated" in message
    assert "hf download MahmoodLab/UNI2-h" in message and "patch_model.net.weights=" in message
    # An entry whose weights are no hub repository: which URL to fetch.
    kaiko = compose_config(tmp_path, "patch_model=kaiko_vitb8").patch_model.net
    with pytest.raises(InstantiationException, match="releases/download/0.0.1/vitb8.pth"):
        instantiate(kaiko)


def test_weights_from_the_hugging_face_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hf-hub:<repo>`` reads the cached file with HF_HUB_OFFLINE=1, keyed by its content."""
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    snapshot = cache / "models--lab--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--lab--tiny" / "refs").mkdir()
    (cache / "models--lab--tiny" / "refs" / "main").write_text("0" * 40)
    state = _tiny_weights(snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    net = build_timm_backbone(name="vit_tiny_patch16_224", weights="hf-hub:lab/tiny")
    torch.testing.assert_close(
        net.model.state_dict()["blocks.3.attn.qkv.weight"], state["blocks.3.attn.qkv.weight"]
    )
    cfg = compose_config(tmp_path, *TINY, "patch_model.net.weights=hf-hub:lab/tiny")
    assert "hf-hub:lab/tiny@sha256:" in json.dumps(_patch_key_settings(cfg))


def _patch_key_settings(cfg) -> dict:
    from breastnet.lineage import patch_model_settings

    return patch_model_settings(cfg.patch_model)


def test_the_patch_key_holds_the_weights_content_not_their_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "w.safetensors", tmp_path / "b" / "copy.safetensors"
    a.parent.mkdir()
    b.parent.mkdir()
    _tiny_weights(a)
    shutil.copy(a, b)
    key = {
        p: _patch_key_settings(compose_config(tmp_path, *TINY, f"patch_model.net.weights={p}"))
        for p in (a, b)
    }
    assert key[a] == key[b] and key[a]["net"]["weights"].startswith("sha256:")
    _tiny_weights(b)  # another random init under the same name
    assert (
        _patch_key_settings(compose_config(tmp_path, *TINY, f"patch_model.net.weights={b}"))[
            "net"
        ]["weights"]
        != key[a]["net"]["weights"]
    )


def test_freeze_trains_nothing_and_gives_uniform_patch_probabilities(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, *TINY, "patch_model.freeze=true")
    model = instantiate(cfg.patch_model).train()
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.net.training  # dropout and drop-path off for good
    with torch.no_grad():
        probs = model.net(torch.randn(3, 3, 224, 224)).softmax(1)
    torch.testing.assert_close(probs, torch.full((3, 4), 0.25))


@pytest.mark.skipif(not SHARED_MOBILENET.is_file(), reason=f"{SHARED_MOBILENET} not found")
def test_the_shared_mobilenet_file_as_a_frozen_encoder(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path,
        "patch_model=mobilenet_v2",
        "patch_model.freeze=true",
        f"patch_model.net.weights={SHARED_MOBILENET}",
        "patch_model.net.freeze_bn=true",
    )
    model = instantiate(cfg.patch_model).train()
    assert model.net.pretrained and not any(p.requires_grad for p in model.parameters())
    plain = instantiate(cfg.patch_model.net).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.net.forward_features(x), plain.forward_features(x))
    assert Lineage(cfg).frozen


def test_last_blocks_train_with_layer_wise_lr_decay(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path, *TINY, "patch_model.net.train_blocks=2", "patch_model.layer_decay=0.5"
    )
    model = instantiate(cfg.patch_model)
    trainable = {n for n, p in model.net.model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("blocks.10.", "blocks.11.", "norm.")) for n in trainable
    )
    assert "blocks.10.attn.qkv.weight" in trainable and "norm.weight" in trainable
    lr = cfg.patch_model.optimizer.lr
    by_param = {id(p): g["lr"] for g in model.optimizer_params() for p in g["params"]}
    blocks = model.net.model.blocks
    assert by_param[id(blocks[11].attn.qkv.weight)] == pytest.approx(lr)
    assert by_param[id(blocks[10].attn.qkv.weight)] == pytest.approx(lr * 0.5)
    assert by_param[id(model.net.head.weight)] == pytest.approx(lr)
    assert id(blocks[9].attn.qkv.weight) not in by_param


def test_layer_decay_on_a_torchvision_backbone_says_it_needs_timm(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path,
        "patch_model=mobilenet_v2",
        "patch_model.net.weights=none",
        "patch_model.layer_decay=0.75",
    )
    with pytest.raises(InstantiationException, match="layer_decay needs a timm backbone"):
        instantiate(cfg.patch_model)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("demo"), 4, 256, 192, seed=5)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    file = tmp_path_factory.mktemp("weights") / "vit_tiny_64.safetensors"
    _tiny_weights(file, img_size=64)
    return file


def test_frozen_encoder_through_the_whole_pipeline(
    generated: Path, tiny_file: Path, tmp_path: Path
) -> None:
    """experiment=foundation with a random-init ViT from a file: no patch training, the
    store at the encoder's width, an attention-MIL image model, a report."""
    cfg = compose_config(
        tmp_path,
        *FOUNDATION_RUN,
        f"data.data_dir={generated}",
        f"patch_model.net.weights={tiny_file}",
    )
    metrics = run_stages(cfg)
    work, lineage = tmp_path / "work", Lineage(cfg)
    assert not (work / "patch").exists()  # nothing trained, no checkpoint written
    assert not any(k.startswith(("patch/", "features/patch_acc")) for k in metrics)
    store = FeatureStore(lineage.features)
    assert len(store) == 16 and store.width == 192 and store.meta["frozen"] is True
    assert {store.rows[i].n_tiles for i in store} == {12}  # 256 x 192 in 64 px tiles
    image = store.load("Benign/b000")
    assert image["features"].shape == (12, 192)
    torch.testing.assert_close(image["probs"], torch.full((12, 4), 0.25))
    assert metrics["image/val_acc_best"] >= 0 and "eval/image_accuracy" in metrics
    report = lineage.report("test")
    provenance = json.loads((report / "provenance.json").read_text())
    assert [c["path"] for c in provenance["checkpoints"]][0] == str(tiny_file)
    # An aggregator of patch probabilities has nothing to read from a frozen encoder.
    vote = compose_config(
        tmp_path,
        *FOUNDATION_RUN,
        f"data.data_dir={generated}",
        f"patch_model.net.weights={tiny_file}",
        "image_model=vote",
        "stages=[image]",
    )
    with pytest.raises(ConfigError, match="image_model=Vote reads patch probabilities"):
        run_stages(vote)
    # The same weights file elsewhere: the same encoder key, every artifact reused.
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copy(tiny_file, copy)
    moved = compose_config(
        tmp_path, *FOUNDATION_RUN, f"data.data_dir={generated}", f"patch_model.net.weights={copy}"
    )
    assert Lineage(moved).keys() == lineage.keys()


def test_last_block_fine_tuned_through_the_whole_pipeline(
    generated: Path, tiny_file: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        tmp_path,
        *FOUNDATION_RUN,
        f"data.data_dir={generated}",
        f"patch_model.net.weights={tiny_file}",
        "patch_model.freeze=false",
        "patch_model.net.train_blocks=1",
        "patch_model.layer_decay=0.75",
        "image_model=mean_features",
    )
    metrics = run_stages(cfg)
    lineage = Lineage(cfg)
    assert (lineage.patch / "best.ckpt").is_file() and "patch/test_acc" in metrics
    state = torch.load(lineage.patch / "best.ckpt", weights_only=False)["state_dict"]
    from safetensors.torch import load_file

    start = load_file(tiny_file)
    changed = {k for k, v in start.items() if not torch.equal(state[f"net.model.{k}"], v)}
    assert changed and all(k.startswith(("blocks.11.", "norm.")) for k in changed)
    store = FeatureStore(lineage.features)
    assert store.meta["frozen"] is False and "features/patch_acc_test" in metrics


class _StopAfterFirstBatch(PartWriter):
    def write_on_batch_end(self, trainer, *args) -> None:
        super().write_on_batch_end(trainer, *args)
        raise KeyboardInterrupt


def test_an_interrupted_features_stage_resumes_with_the_images_left(
    generated: Path,
    tiny_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = compose_config(
        tmp_path,
        *FOUNDATION_RUN,
        f"data.data_dir={generated}",
        f"patch_model.net.weights={tiny_file}",
        "stages=[prepare,patch,features]",
    )
    monkeypatch.setattr("breastnet.inference.runner.PartWriter", _StopAfterFirstBatch)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C
        run_stages(cfg)
    out = Lineage(cfg).features
    assert not FeatureStore.is_complete(out)
    assert len(list(out.with_name(f"{out.name}.parts").rglob("*.pt"))) == 4
    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        run_stages(cfg)
    assert "features: 12 of 16 images to run" in caplog.text
    assert len(FeatureStore(out)) == 16 and not out.with_name(f"{out.name}.parts").exists()
