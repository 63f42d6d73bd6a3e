"""Baseline (1): frozen ImageNet MobileNetV2 features of each tile, no stain work, no
fine-tuning; a logistic regression on the training patches; an image's class = the mean of its
patch probabilities. Same images, tiles and splits as the pipeline (the split files in
work_dir), so its numbers sit in the same table as ``experiment=bach_cpu``.

    python experiments/bach_cpu/baseline_frozen.py --work-dir /tmp/bc/work --folds 5 \
        --groups image blocks:10

``--tile``/``--size`` and ``--stain-reference`` (the Macenko reference prepare wrote to
``work_dir/stain/``) turn it into a probe of which tile scale and colour handling carry the
signal, without any training.
"""

import argparse
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from breastnet.data.bach import build_index, read_index, read_rgb
from breastnet.data.keys import index_path
from breastnet.data.resolution import BACH_MPP
from breastnet.data.splits import load_or_make_split
from breastnet.data.stain import MacenkoNormalizer, StainReference
from breastnet.data.store import Tiling, normalise_and_tile
from breastnet.models.backbone import build_backbone
from breastnet.report.metrics import accuracy

ROOT = Path(__file__).resolve().parents[2]
BACH_DEV = os.environ.get("BREASTNET_BACH_DEV", str(ROOT.parent / "shared/data/bach-dev"))
WEIGHTS = os.environ.get(
    "BREASTNET_WEIGHTS",
    str(ROOT.parent / "shared/weights/mobilenet_v2_imagenet_bnfolded_fp16.pth"),
)


@torch.no_grad()
def tile_features(
    entries: list, weights: str, tiling: Tiling, normalizer: MacenkoNormalizer | None
) -> dict[str, np.ndarray]:
    """Pooled features [N, 1280] of every image's tiles, by image id."""
    net = build_backbone("mobilenet_v2", weights=weights, freeze_bn=True).eval()
    out = {}
    for e in tqdm(entries, desc="frozen features", unit="img"):
        patches, _ = normalise_and_tile(read_rgb(e.path)[0], tiling, normalizer)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(patches, -1, 1)))
        out[e.image_id] = net.forward_features(net.normalize(x)).numpy()
    return out


def evaluate(split: dict, feats: dict, labels: dict) -> dict[str, float]:
    """Fit on the train patches; patch and image (mean of patch probabilities) test accuracy."""
    train = split["train"]
    x = np.concatenate([feats[i] for i in train])
    y = np.concatenate([[labels[i]] * len(feats[i]) for i in train])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x, y)
    patch_labels, patch_preds, image_preds = [], [], []
    for i in split["test"]:
        probs = model.predict_proba(feats[i])
        patch_labels.append(np.full(len(probs), labels[i]))
        patch_preds.append(probs.argmax(1))
        image_preds.append(probs.mean(0).argmax())
    return {
        "patch_acc": accuracy(np.concatenate(patch_labels), np.concatenate(patch_preds)),
        "image_acc": accuracy(np.array([labels[i] for i in split["test"]]), np.array(image_preds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=BACH_DEV)
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--work-dir", type=Path, default=Path("work"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2019, help="the split seed (data.split_seed)")
    parser.add_argument(
        "--groups",
        nargs="+",
        default=["image"],
        help="splits by image and/or data.groups specs, e.g. --groups image blocks:10",
    )
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--stain-reference",
        type=Path,
        help="Macenko-normalise with this reference (work_dir/stain/<hash>.json); default: raw",
    )
    args = parser.parse_args()
    normalizer = None
    if args.stain_reference is not None:
        reference = json.loads(args.stain_reference.read_text())["reference"]
        normalizer = MacenkoNormalizer.from_reference(StainReference.from_dict(reference))

    usable = {"tile_size": args.tile, "fit": "trim", "mpp": BACH_MPP, "skip_bad": False}
    index = index_path(args.work_dir, {"data_dir": args.data, "labels_csv": None, **usable})
    previous = read_index(index) if index.is_file() else None
    entries = [
        e for e in build_index(args.data, min_size=args.tile, previous=previous) if e.usable
    ]
    labels = {e.image_id: e.label_index for e in entries}
    tiling = Tiling(tile_size=args.tile, stride=args.tile, patch_size=args.size)
    feats = tile_features(entries, args.weights, tiling, normalizer)
    results = {}
    for spec in args.groups:
        groups = None if spec == "image" else spec
        split = partial(load_or_make_split, args.work_dir, entries, seed=args.seed, groups=groups)
        found = {"holdout": evaluate(split()[0], feats, labels)}
        for fold in range(args.folds):
            found[f"fold{fold}"] = evaluate(split(folds=args.folds, fold=fold)[0], feats, labels)
        folds = [found[f"fold{f}"] for f in range(args.folds)]
        for key in ("patch_acc", "image_acc"):
            values = np.array([r[key] for r in folds])
            found[f"cv_{key}"] = {"mean": values.mean(), "std": values.std()}
        results[f"by {spec}"] = found
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
