"""Shared fixtures and helpers: CPU only, real data found through one setting, the small
models, runs and reports that several test modules build."""

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from breastnet import CLASSES
from breastnet.report import ImageResult, Report, write_report

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# A quiet CPU Trainer for unit tests of the LightningModules.
CPU_TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
# The whole pipeline in seconds: generated images, 32 px patches, a small CNN, 2 epochs.
SMALL_RUN = [
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


def compose_config(tmp_path: Path, *overrides: str, keep_hydra: bool = False):
    """The app's config as a run composes it (HydraConfig set), artifacts and logs in tmp_path;
    ``keep_hydra`` keeps the ``hydra`` node (sweeper, launcher) in the returned config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            return_hydra_config=True,
            overrides=[
                f"paths.work_dir={tmp_path / 'work'}",
                f"paths.log_dir={tmp_path / 'logs'}",
                *overrides,
            ],
        )
    HydraConfig().set_config(cfg)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg.hydra
    return cfg


BACH_DEV = Path(os.environ.get("BREASTNET_BACH_DEV", ROOT.parent / "shared" / "data" / "bach-dev"))
SHARED_MOBILENET = Path(
    os.environ.get(
        "BREASTNET_WEIGHTS",
        ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet_bnfolded_fp16.pth",
    )
)
"""The shared ImageNet MobileNetV2 (BatchNorm folded, fp16); the tests that need it skip
without it."""


@pytest.fixture(scope="session")
def bach_dev() -> Path:
    """The real bach-dev images (BREASTNET_BACH_DEV, default ../shared/data/bach-dev)."""
    if not BACH_DEV.is_dir():
        pytest.skip(f"real BACH images not found at {BACH_DEV} (set BREASTNET_BACH_DEV)")
    return BACH_DEV


@pytest.fixture(scope="session")
def real_tile(bach_dev: Path) -> np.ndarray:
    """One 512x512 RGB tile of a real Invasive image."""
    from PIL import Image

    path = sorted((bach_dev / "Invasive").iterdir())[0]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))[512:1024, 512:1024].copy()


def write_image(path: Path, array: np.ndarray) -> Path:
    """Save an array as an image file (format from the suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def tissue_like(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A small random pink/purple RGB image (distinct content per seed)."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 180]) + rng.integers(-40, 40, size=(height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture
def tiny_bach(tmp_path: Path) -> Path:
    """A BACH layout with 4 small distinct PNGs per class (64x48)."""
    root = tmp_path / "bach"
    for c, name in enumerate(CLASSES):
        for i in range(4):
            write_image(root / name / f"{name[:2].lower()}{i:03d}.png", tissue_like(10 * c + i))
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: OpenMP only adds overhead on tensors this small.

    On a busy 2-core machine its barriers stall: a mobilenet step took 0.1 s on one thread and
    20 s on two.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image_model_config(name: str):
    """``conf/image_model/<name>.yaml`` as the image stage composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(f"image_model/{name}").image_model


def build_aggregator(name: str, feature_dim: int, num_classes: int = 4, **overrides):
    """The aggregator of ``image_model=<name>``; ``overrides`` only where its config has them
    (shared test sizes such as ``hidden_size`` apply to the aggregators that take them)."""
    from hydra.utils import instantiate

    node = image_model_config(name).aggregator
    sizes = {"feature_dim": feature_dim, "num_classes": num_classes, **overrides}
    return instantiate(node, **{k: v for k, v in sizes.items() if k in node.keys()})  # noqa: SIM118 (a ??? value is not `in` a DictConfig)


def make_patch_model(name: str = "mobilenet_v2", **kwargs: object):
    """A random-init ``PatchClassifier`` with SGD; ``kwargs`` go to the classifier."""
    from breastnet.models.backbone import build_backbone
    from breastnet.models.patch_classifier import PatchClassifier

    sgd = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4)
    return PatchClassifier(build_backbone(name, weights="none"), optimizer=sgd, **kwargs)


def patch_samples(n: int, size: int = 64) -> list[dict[str, object]]:
    """In-memory dict samples as the DataModule yields them: uint8 CHW, int64 label, extras."""
    g = torch.Generator().manual_seed(0)
    return [
        {
            "x": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
            "y": torch.tensor(i % 4),
            "image_id": f"img{i // 2}",
        }
        for i in range(n)
    ]


def noisy_probs(labels: np.ndarray, rng: np.random.Generator, signal: float = 1.5) -> np.ndarray:
    """Softmax of random logits nudged towards the true class (right most of the time)."""
    logits = rng.normal(size=(len(labels), len(CLASSES)))
    logits[np.arange(len(labels)), labels] += signal
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def synthetic_results(
    n: int = 12, grid: tuple[int, int] = (3, 3), size: int = 32, seed: int = 0, labelled=True
) -> tuple[list[ImageResult], dict[str, np.ndarray]]:
    """``n`` images with patch probabilities, features and patches, then one failed file."""
    rng = np.random.default_rng(seed)
    rows, cols = grid
    positions = np.array([(r, c) for r in range(rows) for c in range(cols)])
    results, store = [], {}
    for i in range(n):
        label = i % len(CLASSES)
        image_id = f"{CLASSES[label]}/img{i:03d}"
        patch_probs = noisy_probs(np.full(len(positions), label), rng, signal=1.0)
        tissue = rng.uniform(0.2, 1, len(positions))
        tissue[0] = 0.01  # one background patch per image
        features = rng.normal(size=(len(positions), 16)) + 3 * np.eye(16)[label]
        base = np.array([200, 120, 180]) - 30 * label
        store[image_id] = np.clip(
            base + rng.integers(-40, 40, size=(len(positions), size, size, 3)), 0, 255
        ).astype(np.uint8)
        results.append(
            ImageResult(
                image_id=image_id,
                path=f"/data/{image_id}.tif",
                label=label if labelled else None,
                probs=patch_probs[tissue >= 0.05].mean(axis=0),
                patch_probs=patch_probs,
                positions=positions,
                tissue=tissue,
                features=features,
                attention=rng.dirichlet(np.ones(len(positions))) if i % 2 else None,
            )
        )
    results.append(
        ImageResult(
            image_id="Benign/broken",
            path="/data/Benign/broken.tif",
            label=1 if labelled else None,
            probs=None,
            patch_probs=None,
            positions=None,
            tissue=None,
            error="unreadable: truncated TIFF",
        )
    )
    return results, store


@pytest.fixture(scope="session")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, list[ImageResult]]:
    """A report of ``synthetic_results(40)`` (enough for intervals and every ROC curve),
    with three heatmaps."""
    results, store = synthetic_results(40)
    out = tmp_path_factory.mktemp("report")
    return write_report(out, results, patches=store.__getitem__, n_examples=3), results
