"""Stage ``predict``: the trained pipeline on new images of any size, one row per file.

``python -m breastnet 'stages=[predict]' predict.input=<file or folder>`` with the config the
models were trained with (it locates them in ``work_dir``). Writes ``predictions.csv`` in
``predict.output_dir``; when the files have labels (BACH class folders, or a ``file,label``
CSV) also ``metrics.json``, the plots and ``index.html``: any labelled folder is an external
test set. Its labels may be other names (``predict.label_map``) or only BACH's 2-class groups,
its images another pixel size (``predict.mpp``, TIFF tags) or size (``predict.fit``). A file
that cannot be used gets a row with its error and the others go on; the stage fails at the
end, after writing everything, when any file did.

What the inputs are to the model is said, not assumed: files without a pixel size, files that
are the model's own training or val images (by content hash; left out of the scores unless
``predict.include_training=true``), a model trained on generated images, and inputs whose
features lie farther from the training images than those lie from each other.
"""

import dataclasses
import hashlib
import json
import logging
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from breastnet import CLASSES
from breastnet.artifacts import finished_metrics
from breastnet.data.bach import DataError, find_images, find_label_csv, read_label_csv
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.feature_store import FeatureStore
from breastnet.data.resolution import assumed_pixel_size, read_mpp, scale_factor, scaled_size
from breastnet.data.tiling import tile_origins
from breastnet.distributed import on_rank_zero, rank
from breastnet.errors import ConfigError
from breastnet.inference import (
    ImageFiles,
    image_embedder,
    image_result,
    load_image_model,
    used_checkpoints,
)
from breastnet.labels import GROUPS, LabelMap, csv_label, label_names, unlabelled_folder
from breastnet.lineage import Lineage, container
from breastnet.logs import say
from breastnet.missing import other_keys
from breastnet.prediction import predict_images
from breastnet.report import ImageResult
from breastnet.stages.common import model_facts, publish_report

log = logging.getLogger(__name__)

# Overrides that say what to predict, not which model: left out of the training command.
_PREDICT_ONLY = ("stages", "predict.", "paths.output_dir", "hydra.")


def find_inputs(source: Path) -> tuple[Path, list[Path]]:
    """The folder labels are relative to, and the image files: one file or a whole tree."""
    if source.is_file():
        return source.parent, [source]
    if not source.is_dir():
        raise FileNotFoundError(f"predict.input={source} does not exist")
    files = find_images(source)
    if not files:
        raise DataError(f"{source}: no images found")
    return source, files


def labels_for(
    root: Path, files: list[Path], labels_csv: str | None, label_map: LabelMap
) -> dict[Path, str | None]:
    """Each file's class or 2-class group from its folder or the label CSV, None when it has
    none. A map key that matches no folder or CSV label is an error (``LabelMap.check_keys``);
    label names that nothing maps are logged by name with their count of files (those files
    are predicted, unlabelled)."""
    csv_path = find_label_csv(root, labels_csv)
    from_csv = read_label_csv(csv_path) if csv_path else {}
    label_map.check_keys(label_names(files, root, from_csv))
    labels: dict[Path, str | None] = {}
    unknown: Counter = Counter()
    for f in files:
        raw = csv_label(from_csv, f, root)
        labels[f] = label_map.folder(f, root) or (label_map(raw) if raw is not None else None)
        if labels[f] is None and (name := raw if raw is not None else unlabelled_folder(f, root)):
            unknown[name] += 1
    if unknown and rank() == 0:  # every rank labels the files; one says so
        log.warning(
            "%s; these files are predicted without a label", label_map.unknown_report(unknown)
        )
    return labels


def training_command() -> str:
    """The command that trains the pipeline predict needs: this run's settings without the
    predict ones (``...`` where Hydra did not compose this run)."""
    if not HydraConfig.initialized():
        return "python -m breastnet <the same experiment= and settings>"
    task = HydraConfig.get().overrides.task
    kept = [o for o in task if not o.lstrip("+~").startswith(_PREDICT_ONLY)]
    return " ".join(["python -m breastnet", *map(shlex.quote, kept)])


def require_trained(cfg: DictConfig, lineage: Lineage) -> None:
    """Predict needs the whole trained pipeline of these settings, not only prepare's output.

    Raises:
        ConfigError: quoting the command that trains it, with this run's ``experiment=``
            and settings, and the image models of other settings in ``work_dir``.
    """
    if lineage.index.is_file() and finished_metrics(lineage.image) is not None:
        return
    others = other_keys(cfg, "image", lineage.image) if lineage.index.is_file() else ""
    raise ConfigError(
        f"predict needs the pipeline trained with these settings, and {lineage.work_dir} has "
        "no trained image model for them. Train it first with the same experiment and "
        f"settings (all stages: prepare, patch, features, image, evaluate):\n  "
        f"{training_command()}\nthen run predict with those settings again{others}."
    )


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def seen_in_training(lineage: Lineage, files: list[Path]) -> dict[Path, str]:
    """Input files that are training or val images of the model (the same content hash as
    in the data set's index): file -> ``train`` or ``val``."""
    split = json.loads(lineage.outer_split.read_text())
    side = {image_id: s for s in ("train", "val") for image_id in split[s]}
    by_hash = {e.sha1: e.image_id for e in lineage.entries if e.sha1 and e.image_id in side}
    found = {}
    for f in files:
        if (image_id := by_hash.get(_sha1(f))) is not None:
            found[f] = side[image_id]
    return found


def _image_vectors(features: list[torch.Tensor | np.ndarray]) -> np.ndarray:
    """One unit vector per image: the mean of its patch features, L2-normalised."""
    means = np.stack([np.asarray(f, dtype=np.float64).mean(0) for f in features])
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def _nearest(a: np.ndarray, b: np.ndarray, same: bool = False) -> np.ndarray:
    """Each row of ``a``'s Euclidean distance to its nearest row of ``b`` (not itself)."""
    distances = np.sqrt(np.maximum(2 - 2 * a @ b.T, 0))  # unit vectors
    if same:
        np.fill_diagonal(distances, np.inf)
    return distances.min(1)


def feature_shift(cfg: DictConfig, lineage: Lineage, outputs: dict[str, dict]) -> dict | None:
    """How far the inputs lie from the training images in the model's feature space.

    An input is *far* when its nearest training image is farther than any training image's
    nearest other one: nothing in training was that isolated, so the model extrapolates.
    Returns the share of far inputs, the threshold and the median distances; None where
    the training features are not comparable (end to end: another CNN) or too few.
    """
    if cfg.image.end_to_end or not FeatureStore.is_complete(lineage.features):
        return None
    store = FeatureStore(lineage.features)
    train = [
        store.load(image_id)["features"]
        for image_id, row in store.rows.items()
        if row.split == "train" and row.encoder == lineage.patch.name
    ]
    inputs = [o["features"] for o in outputs.values() if not o.get("error") and len(o["features"])]
    if len(train) < 2 or not inputs:
        return None
    reference, points = _image_vectors(train), _image_vectors(inputs)
    within = _nearest(reference, reference, same=True)
    distances = _nearest(points, reference)
    threshold = float(within.max())
    return {
        "far_share": float((distances > threshold).mean()),
        "n_far": int((distances > threshold).sum()),
        "n_images": len(inputs),
        "threshold": threshold,
        "median_distance": float(np.median(distances)),
        "median_training_distance": float(np.median(within)),
    }


def outcome_lines(
    results: list[ImageResult], root: Path, metrics: dict[str, float], left_out: int
) -> list[str]:
    """What a run says about the scores: one file's class, else each view's accuracy, and
    plainly when the view scores only part of the folder (unlabelled or training images
    left out) or only some of its classes: then it is not an accuracy of the folder."""
    lines = []
    ok = [r for r in results if not r.failed]
    if len(results) == 1 and ok:
        r = ok[0]
        probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(CLASSES, r.probs, strict=True))
        lines.append(
            f"{r.path}: {CLASSES[r.predicted]} ({probs}; carcinoma {r.carcinoma_prob:.3f}) "
            f"from {r.n_patches} patches"
        )
    views = (
        ("4-class", "image_accuracy", [r.label for r in ok], CLASSES),
        ("2-class", "carcinoma_accuracy", [r.group for r in ok], GROUPS),
    )
    for view, accuracy, labels, names in views:
        if f"predict/{accuracy}" not in metrics:
            continue
        scored = [x for x in labels if x is not None]
        present = sorted(set(scored))
        score = f"{metrics[f'predict/{accuracy}']:.3f}"
        unlabelled = len(ok) - left_out - len(scored)
        notes = []
        if len(present) < len(names):
            notes.append(f"only {', '.join(names[i] for i in present)} among them")
        if unlabelled > 0:
            notes.append(f"{unlabelled} image(s) without a label for this view")
        if left_out:
            notes.append(f"{left_out} training image(s) left out")
        if unlabelled > 0 or left_out:
            lines.append(
                f"{view} image accuracy on {len(scored)} of the {len(ok)} images of {root}: "
                f"{score} ({'; '.join(notes)}): not an accuracy of the folder"
            )
        else:
            note = f"; {notes[0]}" if notes else ""
            lines.append(f"{view} image accuracy on {root}: {score} ({len(scored)} images{note})")
    return lines


def warn_about_inputs(
    cfg: DictConfig, facts: dict, seen: dict[Path, str], shift: dict | None
) -> None:
    """The warnings on what the inputs are to this model (rank 0 says them once)."""
    if facts["generated"]:
        log.warning(
            "the model was trained on generated images (%s): its probabilities on real "
            "tissue mean nothing, however confident",
            facts["training_data"],
        )
    if seen:
        sides = Counter(seen.values())
        counts = ", ".join(f"{n} {side}" for side, n in sides.items())
        kept = "scored anyway (predict.include_training=true)"
        left = "left out of the scores; predict.include_training=true scores them"
        log.warning(
            "%d input file(s) are images the model was trained or selected on (%s; same "
            "content as in the index of %s, e.g. %s): %s",
            len(seen),
            counts,
            facts["training_data"],
            next(iter(seen)),
            kept if cfg.predict.include_training else left,
        )
    if shift and shift["n_far"]:
        log.warning(
            "%d of %d input image(s) (%.0f %%) lie farther from every training image, in the "
            "model's features, than any training image lies from its nearest other one: the "
            "model extrapolates on them",
            shift["n_far"],
            shift["n_images"],
            100 * shift["far_share"],
        )


def run(cfg: DictConfig) -> dict[str, float]:
    """Predict every image of ``predict.input``; returns image accuracy when labelled.

    Files are decoded, normalised and tiled in DataLoader workers and embedded on every rank.
    """
    if not cfg.predict.input:
        raise ConfigError("set predict.input=<image file or folder> (make predict INPUT=...)")
    root, files = find_inputs(Path(cfg.predict.input).expanduser().resolve())
    lineage = Lineage(cfg)
    require_trained(cfg, lineage)
    label_map = LabelMap(cfg.predict.label_map, "predict.label_map")
    labels = labels_for(root, files, cfg.predict.labels_csv, label_map)
    datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
    datamodule.setup()
    model = load_image_model(cfg, lineage)
    # The models' tiling, fitted to any image size; the lineage keys stay the training ones.
    tiling = dataclasses.replace(datamodule.tiling, fit=cfg.predict.fit)
    mpps = [cfg.predict.mpp or read_mpp(f) for f in files]
    untagged = sum(m is None for m in mpps)
    if untagged and rank() == 0:
        log.warning("%s", assumed_pixel_size(untagged, len(files), tiling.mpp, "predict.mpp"))
    dataset = ImageFiles(files, root, tiling, datamodule.prepared.stain, mpps)
    out_dir = Path(cfg.predict.output_dir)
    # An interrupted run resumes with the parts made under the same models, input and tiling
    parts = lineage.predict_parts()
    outputs = predict_images(
        cfg, image_embedder(cfg, lineage, model), dataset, dataset.image_ids, parts, "predict"
    )

    def report() -> dict[str, float]:
        facts = model_facts(cfg, lineage)
        seen = seen_in_training(lineage, files)
        shift = feature_shift(cfg, lineage, outputs)
        warn_about_inputs(cfg, facts, seen, shift)
        left_out = 0 if cfg.predict.include_training else len(seen)
        results = []
        for i, (f, image_id) in enumerate(zip(files, dataset.image_ids, strict=True)):
            result = image_result(outputs[image_id], str(f), None)
            result.mpp = dataset.pixel_size(i)
            if not result.failed:
                with Image.open(f) as im:  # header only: the tiled image's size
                    width, height = im.size
                factor = scale_factor(result.mpp, tiling.mpp)
                tiled_w, tiled_h = scaled_size(width, height, factor)
                result.origins = tile_origins(
                    tiled_h, tiled_w, tiling.tile_size, tiling.stride, tiling.fit
                )
            scored = labels[f] if cfg.predict.include_training or f not in seen else None
            if scored in CLASSES:
                result.label = CLASSES.index(scored)
            elif scored in GROUPS:
                result.label_group = GROUPS.index(scored)
            results.append(result)
        inputs = facts | {
            "input": str(root),
            "pixel_size": "predict.mpp" if cfg.predict.mpp else "TIFF tags, else data.mpp",
            "untagged_files": untagged,
            "label_map": container(cfg.predict.label_map),
            "training_images": {str(f): side for f, side in seen.items()},
            "training_images_scored": bool(cfg.predict.include_training),
            "feature_shift": shift,
        }
        index = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
        written, metrics = publish_report(
            cfg,
            out_dir,
            results,
            # only the few images the report draws are tiled again
            lambda image_id: dataset.tile(index[image_id])[0],
            f"breastnet predictions: {root}",
            datamodule.hparams.min_tissue,
            "predict",
            out_dir / ".parts",
            checkpoints=used_checkpoints(lineage, model),
            inputs=inputs,
            tiling=tiling,
        )
        for line in outcome_lines(results, root, metrics, left_out):
            say(line)
        if shift is not None:
            say(
                f"far from the training images: {shift['n_far']} of {shift['n_images']} "
                f"input images ({100 * shift['far_share']:.0f} %; predict/far_from_training)"
            )
        say(f"predictions: {written.predictions_csv}")
        say(f"report: {written.html}")
        failed = [r for r in results if r.error]
        for r in failed:
            log.error("%s", r.error)
        if failed:
            raise DataError(
                f"{len(failed)} of {len(results)} file(s) could not be predicted "
                f"(first: {failed[0].error}); see {written.predictions_csv}"
            )
        extra = {"predict/n_images": len(results), "predict/training_images": len(seen)}
        if shift is not None:
            extra["predict/far_from_training"] = shift["far_share"]
        return metrics | extra

    return on_rank_zero(report) or {}
