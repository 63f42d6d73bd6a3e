"""The trained models of one config, and new image files made ready for them.

Everything comes from ``work_dir`` as the earlier stages left it (``breastnet.lineage`` says
where): the patch CNN, the image model and, for new files, the Macenko reference and tiling
of prepare. A new image goes through exactly the steps a training image went through, in
DataLoader workers, and ``breastnet.prediction`` runs the models on every rank.
"""

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from breastnet.artifacts import container, finished_metrics
from breastnet.data.bach import DataError, read_rgb
from breastnet.data.datasets import to_tensor
from breastnet.data.feature_store import FeatureStore
from breastnet.data.stain import MacenkoNormalizer
from breastnet.data.store import StainSettings, Tiling, normalise_and_tile, tissue_fraction
from breastnet.lineage import Lineage
from breastnet.missing import other_keys
from breastnet.models.backbone import PatchNet
from breastnet.models.embedding import Embedder
from breastnet.models.image_classifier import ImageClassifier
from breastnet.models.patch_classifier import PatchClassifier
from breastnet.report import ImageResult


def _best_checkpoint(cfg: DictConfig, out_dir: Path, stage: str) -> Path:
    if finished_metrics(out_dir) is None:
        raise FileNotFoundError(
            f"no finished {stage} model in {out_dir}: run the {stage} stage first"
            + other_keys(cfg, stage, out_dir)
        )
    return out_dir / "best.ckpt"


def load_patch_model(cfg: DictConfig, lineage: Lineage) -> PatchClassifier:
    """The best checkpoint of the patch stage for this config, on the CPU, in eval mode; a
    frozen encoder (``patch_model.freeze``) as its weights file gives it."""
    if lineage.frozen:
        return instantiate(cfg.patch_model).eval()
    checkpoint = _best_checkpoint(cfg, lineage.patch, "patch")
    net = instantiate(cfg.patch_model.net, weights="none")  # the checkpoint holds the weights
    model = PatchClassifier.load_from_checkpoint(
        checkpoint, net=net, map_location="cpu", weights_only=False
    )
    return model.eval()


def build_image_model(
    cfg: DictConfig, feature_dim: int, backbone: PatchNet | None = None
) -> ImageClassifier:
    """The ImageClassifier of ``cfg.image_model`` for features of width ``feature_dim``."""
    settings = container(cfg.image_model)
    if "feature_dim" in settings["aggregator"]:  # the parameter-free ones read probabilities
        settings["aggregator"]["feature_dim"] = feature_dim
    return instantiate(OmegaConf.create(settings), backbone=backbone)


def load_image_model(cfg: DictConfig, lineage: Lineage) -> ImageClassifier:
    """The best checkpoint of the image stage for this config, on the CPU, in eval mode."""
    checkpoint = _best_checkpoint(cfg, lineage.image, "image")
    # End to end, the CNN is part of the model and its width sizes the aggregator; else the
    # features store's width does (no need to build a ViT-g for its width).
    if cfg.image.end_to_end:
        net: PatchNet | None = instantiate(cfg.patch_model.net, weights="none")
        width = net.feature_dim
    else:
        net, width = None, FeatureStore(lineage.features).width
    model = build_image_model(cfg, width, net)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    return model.eval()


def used_checkpoints(lineage: Lineage, image_model: ImageClassifier) -> list[Path]:
    """The checkpoints behind the image model's outputs, for a report's provenance: the patch
    model's, which embedded the patches (cached features or ``image_embedder``), unless the
    image model has its own CNN (end to end), and the image model's. A frozen encoder's
    weights file counts as its patch model."""
    patch = [] if image_model.backbone is not None else [lineage.patch / "best.ckpt"]
    if lineage.frozen:
        weights = Path(str(lineage.cfg.patch_model.net.weights)).expanduser()
        patch = [weights] if weights.is_file() else []
    return [*patch, lineage.image / "best.ckpt"]


def image_embedder(cfg: DictConfig, lineage: Lineage, image_model: ImageClassifier) -> Embedder:
    """Patches to image probabilities: end to end with the image model's own CNN (single
    views, as it learnt), else with the patch model's and the features stage's TTA setting."""
    chunk = cfg.features.batch_size
    if image_model.backbone is not None:
        return Embedder(image_model.backbone, image_model.aggregator, chunk)
    net = load_patch_model(cfg, lineage).net
    return Embedder(net, image_model.aggregator, chunk, tta=cfg.features.tta)


class ImageFiles(Dataset):
    """Image files rescaled, stain-normalised and tiled (in DataLoader workers), for predict.

    ``mpps`` is each file's pixel size (None: already at ``tiling.mpp``). A file that cannot
    be used yields no patches and its ``error``; the others go on.
    """

    def __init__(
        self,
        files: list[Path],
        root: Path,
        tiling: Tiling,
        stain: StainSettings,
        mpps: Sequence[float | None] | None = None,
    ) -> None:
        self.files, self.tiling, self.stain = files, tiling, stain
        self.mpps = list(mpps) if mpps is not None else [None] * len(files)
        self.image_ids = [f.relative_to(root).with_suffix("").as_posix() for f in files]

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def normalizer(self) -> MacenkoNormalizer | None:
        """Prepare's Macenko reference as a normaliser, made once per process."""
        return self.stain.normalizer()

    def pixel_size(self, i: int) -> float:
        """The pixel size file ``i`` is taken to have (``tiling.mpp`` when unknown)."""
        return float(self.mpps[i] or self.tiling.mpp)

    def tile(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised patches [N, S, S, 3] uint8 and grid positions [N, 2] of file ``i``."""
        image = read_rgb(self.files[i])[0]
        return normalise_and_tile(image, self.tiling, self.normalizer, self.mpps[i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "image_id": self.image_ids[i],
            "y": -1,
            "mpp": self.pixel_size(i),
        }
        try:
            patches, positions = self.tile(i)
        except (DataError, ValueError) as e:
            path = self.files[i]
            sample["error"] = str(e) if str(path) in str(e) else f"{path}: {e}"
            size = self.tiling.patch_size
            patches, positions = np.zeros((0, size, size, 3), np.uint8), np.zeros((0, 2), int)
        sample["x"] = to_tensor(patches)
        sample["pos"] = torch.as_tensor(positions)
        sample["tissue"] = torch.as_tensor(tissue_fraction(patches) if len(patches) else [])
        return sample


def image_result(
    output: dict[str, Any], path: str, label: int | None, positions=None, tissue=None
) -> ImageResult:
    """The report's view of one image's ``Embedder`` output (positions and tissue from the
    output unless given, as prepare's records give them)."""
    if output.get("error"):
        return ImageResult(
            output["image_id"], path, label, None, None, None, None, error=output["error"]
        )
    attention = output.get("attention")
    return ImageResult(
        image_id=output["image_id"],
        path=path,
        label=label,
        probs=output["image_probs"].numpy(),
        patch_probs=output["probs"].numpy(),
        positions=np.asarray(output["pos"] if positions is None else positions),
        tissue=np.asarray(output["tissue"] if tissue is None else tissue),
        features=output["features"].numpy(),
        attention=None if attention is None else attention.numpy(),
    )
