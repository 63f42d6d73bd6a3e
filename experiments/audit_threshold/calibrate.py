"""Calibrate the audit's thresholds: distinct images vs planted copies.

For every image of a folder, the cosine to its most similar *other* image (distinct images:
what a clean split looks like), and for a sample of images the cosine to copies of itself
(flipped, turned, rescaled, JPEG re-encoded, and all at once): what a leak looks like.
With ``--weights``, the same for mean-pooled frozen MobileNetV2 tile features (without and
with the 8-fold flip/rotation TTA of the features stage) on every second image.

    python experiments/audit_threshold/calibrate.py /work/shared/data/bach-dev \
        [--weights ../shared/weights/mobilenet_v2_imagenet_bnfolded_fp16.pth]
"""

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from breastnet.audit import feature_descriptors, image_descriptor
from breastnet.data.bach import find_images, read_rgb
from breastnet.data.store import Tiling, normalise_and_tile
from breastnet.models.backbone import build_backbone


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    size = (round(w * factor), round(h * factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


COPIES = {
    "hflip": lambda x: x[:, ::-1],
    "rot90": lambda x: np.rot90(x),
    "rescale 0.5": lambda x: rescale(x, 0.5),
    "rescale 0.3": lambda x: rescale(x, 0.3),
    "jpeg q50": lambda x: jpeg(x, 50),
    "centre crop 90 %": lambda x: x[
        x.shape[0] // 20 : -x.shape[0] // 20, x.shape[1] // 20 : -x.shape[1] // 20
    ],
    "all: rot90+vflip, 0.5x, q50": lambda x: jpeg(rescale(np.rot90(x)[::-1], 0.5), 50),
}


def report(name: str, bank: np.ndarray, copies: dict[str, list[tuple[int, np.ndarray]]]) -> None:
    """Print the nearest-distinct-image quantiles and each copy kind's similarities."""
    similarity = np.einsum("qd,tvd->qtv", bank[:, 0], bank).max(-1)
    np.fill_diagonal(similarity, -1)
    q = np.quantile(similarity.max(1), [0.5, 0.9, 0.99, 1.0])
    print(
        f"{name}: {len(bank)} distinct images, nearest other image: median {q[0]:.3f}, "
        f"90 % {q[1]:.3f}, 99 % {q[2]:.3f}, max {q[3]:.3f}"
    )
    for kind, pairs in copies.items():
        sims = [float((bank[i] @ c).max()) for i, c in pairs]
        print(f"  copy {kind:28s}: min {min(sims):.4f}, median {np.median(sims):.4f}")


@torch.no_grad()
def mean_features(net: torch.nn.Module, image: np.ndarray, tta: bool) -> torch.Tensor:
    """Frozen features of 512 px tiles at 224 px, [N, 1280] (TTA: mean over 8 variants)."""
    patches, _ = normalise_and_tile(image, Tiling(512, 512, 224), None)
    x = net.normalize(torch.from_numpy(np.ascontiguousarray(np.moveaxis(patches, -1, 1))))
    if not tta:
        return net.forward_features(x)
    variants = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)]
    return torch.stack([net.forward_features(v) for v in variants]).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--copies-of", type=int, default=40, help="images to plant copies of")
    parser.add_argument("--weights", type=Path, help="MobileNetV2 state dict: features too")
    args = parser.parse_args()
    paths = find_images(args.folder)
    images = [read_rgb(p)[0] for p in paths]
    rng = np.random.default_rng(0)
    sample = rng.choice(len(images), size=min(args.copies_of, len(images)), replace=False)
    planted = {k: [(i, copy(images[i])) for i in sample] for k, copy in COPIES.items()}
    bank = np.stack([image_descriptor(x) for x in images])  # N x 8 x D
    copies = {
        k: [(i, image_descriptor(np.ascontiguousarray(x))[0]) for i, x in pairs]
        for k, pairs in planted.items()
    }
    report("thumbnails", bank, copies)
    if args.weights is None:
        return
    net = build_backbone("mobilenet_v2", weights=str(args.weights), freeze_bn=True).eval()
    torch.set_num_threads(1)
    half = list(range(0, len(images), 2))
    for tta in (False, True):
        feats = {str(i): {"features": mean_features(net, images[i], tta)} for i in half}
        kinds = ("hflip", "rot90", "jpeg q50", "rescale 0.5")
        for k in kinds:
            for i, x in planted[k][: len(sample) // 2]:
                feats[f"{k}/{i}"] = {"features": mean_features(net, np.ascontiguousarray(x), tta)}
        described = feature_descriptors(feats)  # centred on all, copies included
        bank = np.stack([described[str(i)] for i in half])
        position = {i: n for n, i in enumerate(half)}
        copies = {
            k: [
                (position[i], described[f"{k}/{i}"][0])
                for i, _ in planted[k][: len(sample) // 2]
                if i in position
            ]
            for k in kinds
        }
        report(f"MobileNetV2 features, tta={tta}", bank, copies)


if __name__ == "__main__":
    main()
