"""Baseline (1): frozen ImageNet MobileNetV2 features of each tile, no stain work, no
fine-tuning; a logistic regression on the training patches; an image's class = the mean of its
patch probabilities. Same images, tiles and splits as the pipeline (the same split code and
settings: ``data.split``, ``data.groups``, bach-dev's BACH names), so its numbers sit in the
same table as ``experiment=bach_cpu``.

    python experiments/bach_cpu/baseline_frozen.py --work-dir /tmp/bc/work --folds 5 \
        --groups image blocks:10 bach --eva-seeds 2019 2020 2021

Per protocol: image accuracy and balanced accuracy of each fold, their mean and sample std;
on eva's split (its bach-dev part: 134 train / 66 test) the same for each split seed (which
carves val, so training images, out of eva's training side) and the 95 % bootstrap interval.

``--tile``/``--size`` and ``--stain-reference`` (the Macenko reference prepare wrote to
``work_dir/stain/``) turn it into a probe of which tile scale and colour handling carry the
signal, without any training.
"""

import argparse
import json
import os
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
from breastnet.data.splits import SplitSpec, load_or_make_split
from breastnet.data.stain import MacenkoNormalizer, StainReference
from breastnet.data.store import Tiling, normalise_and_tile
from breastnet.models.backbone import build_backbone
from breastnet.report.metrics import accuracy, classification_metrics

ROOT = Path(__file__).resolve().parents[2]
BACH_DEV = os.environ.get("BREASTNET_BACH_DEV", str(ROOT.parent / "shared/data/bach-dev"))
PATIENTS = os.environ.get(
    "BREASTNET_BACH_DEV_PATIENTS", str(ROOT.parent / "shared/data/bach-dev-patients.csv")
)
WEIGHTS = os.environ.get(
    "BREASTNET_WEIGHTS",
    str(ROOT.parent / "shared/weights/mobilenet_v2_imagenet_bnfolded_fp16.pth"),
)


@torch.no_grad()
def tile_features(
    entries: list,
    weights: str,
    tiling: Tiling,
    normalizer: MacenkoNormalizer | None,
    layers: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Pooled features [N, 1280] of every image's tiles, by image id; with ``layers``, the
    global-average-pooled outputs of those inner layers too, concatenated after them."""
    net = build_backbone("mobilenet_v2", weights=weights, freeze_bn=True).eval()
    inner: list[torch.Tensor] = []
    for name in layers:
        module = net.model.get_submodule(name)
        module.register_forward_hook(lambda _m, _i, y: inner.append(y.mean((2, 3))))
    out = {}
    for e in tqdm(entries, desc="frozen features", unit="img"):
        patches, _ = normalise_and_tile(read_rgb(e.path)[0], tiling, normalizer)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(patches, -1, 1)))
        inner.clear()
        last = net.forward_features(net.normalize(x))
        out[e.image_id] = torch.cat([last, *inner], 1).numpy()
    return out


def cached_features(path: Path, compute) -> dict[str, np.ndarray]:
    """``compute()``'s features, kept in ``path`` (.npz) for the next run."""
    if path.is_file():
        with np.load(path) as saved:
            return {key.replace("|", "/"): saved[key] for key in saved.files}
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{key.replace("/", "|"): value for key, value in feats.items()})
    return feats


def evaluate(
    split: dict, feats: dict, labels: dict, fit_on: tuple[str, ...] = ("train",)
) -> dict[str, float]:
    """Fit on the patches of ``fit_on``; patch accuracy, and image accuracy, balanced
    accuracy and their intervals (an image's probabilities: the mean of its patches')."""
    train = [i for side in fit_on for i in split[side]]
    x = np.concatenate([feats[i] for i in train])
    y = np.concatenate([[labels[i]] * len(feats[i]) for i in train])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x, y)
    patch_labels, patch_preds, image_probs = [], [], []
    for i in split["test"]:
        probs = model.predict_proba(feats[i])
        patch_labels.append(np.full(len(probs), labels[i]))
        patch_preds.append(probs.argmax(1))
        image_probs.append(probs.mean(0))
    m = classification_metrics(np.array([labels[i] for i in split["test"]]), np.stack(image_probs))
    keys = ("image_accuracy", "image_accuracy_ci", "balanced_accuracy", "balanced_accuracy_ci")
    return {
        "patch_acc": accuracy(np.concatenate(patch_labels), np.concatenate(patch_preds)),
        **{k: m[k] for k in keys},
        "n_train": len(train),
        "n_test": len(split["test"]),
    }


def spread(runs: list[dict]) -> dict:
    """Mean, sample std and the values of each score over ``runs`` (folds or seeds)."""
    out = {}
    for key in ("image_accuracy", "balanced_accuracy", "patch_acc"):
        values = np.array([r[key] for r in runs])
        out[key] = {"mean": values.mean(), "std": values.std(ddof=1), "values": values.tolist()}
    return out


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
        help="k-fold by image and/or data.groups specs, e.g. --groups image blocks:10 bach",
    )
    parser.add_argument(
        "--eva-seeds",
        nargs="*",
        type=int,
        default=[],
        help="split seeds of eva's split (grouped by bach), e.g. 2019 2020 2021",
    )
    parser.add_argument(
        "--labels-csv", default=PATIENTS, help="the label CSV with the BACH-name column"
    )
    parser.add_argument("--bach-names", default="bach_name", help="data.bach_names")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--layers",
        nargs="*",
        default=[],
        help="inner layers whose pooled outputs join the features, e.g. features.10 features.13",
    )
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
    data = {"data_dir": args.data, "labels_csv": args.labels_csv, **usable}
    index = index_path(args.work_dir, data)
    previous = read_index(index) if index.is_file() else None
    found = build_index(args.data, args.labels_csv, min_size=args.tile, previous=previous)
    entries = [e for e in found if e.usable]
    labels = {e.image_id: e.label_index for e in entries}
    tiling = Tiling(tile_size=args.tile, stride=args.tile, patch_size=args.size)
    colour = args.stain_reference.stem if args.stain_reference else "raw"
    layers = "".join(f"-{name}" for name in args.layers)
    name = f"{Path(args.data).name}-{args.tile}-{args.size}-{colour}{layers}"
    feats = cached_features(
        (args.work_dir / "frozen" / name).with_suffix(".npz"),
        lambda: tile_features(entries, args.weights, tiling, normalizer, tuple(args.layers)),
    )
    names = {"data_dir": args.data, "labels_csv": args.labels_csv, "bach_names": args.bach_names}

    def split(**settings) -> dict:
        spec = SplitSpec(**names | settings)
        return load_or_make_split(args.work_dir, entries, spec)[0]

    results = {}
    for grouping in args.groups:
        groups = None if grouping == "image" else grouping
        folds = [
            evaluate(split(folds=args.folds, fold=k, seed=args.seed, groups=groups), feats, labels)
            for k in range(args.folds)
        ]
        results[f"{args.folds}-fold by {grouping}"] = {"folds": folds, "cv": spread(folds)}
    for fit_on in (("train",), ("train", "val")):  # a probe needs no val: all 134 may train
        evas = [split(split="eva", seed=seed, groups="bach") for seed in args.eva_seeds]
        seeds = [evaluate(s, feats, labels, fit_on) for s in evas]
        if seeds:
            results[f"eva, fit on {'+'.join(fit_on)}"] = {"seeds": seeds, "spread": spread(seeds)}
    print(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
