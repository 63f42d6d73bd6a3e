"""Stage ``predict``: the trained pipeline on new images of any size, one row per file.

``python -m breastnet 'stages=[predict]' predict.input=<file or folder>`` with the config the
models were trained with (it locates them in ``work_dir``). Writes ``predictions.csv`` in
``predict.output_dir``; when the files have labels (BACH class folders, or a ``file,label``
CSV) also ``metrics.json``, the plots and ``index.html``: any labelled folder is an external
test set. Its labels may be other names (``predict.label_map``) or only BACH's 2-class groups,
its images another pixel size (``predict.mpp``, TIFF tags) or size (``predict.fit``). A file
that cannot be used gets a row with its error and the others go on; the stage fails at the
end, after writing everything, when any file did.
"""

import dataclasses
import logging
from collections import Counter
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet import CLASSES
from breastnet.data.bach import DataError, find_images, find_label_csv, read_label_csv
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.resolution import read_mpp
from breastnet.distributed import on_rank_zero, rank
from breastnet.errors import ConfigError
from breastnet.inference import (
    ImageFiles,
    image_embedder,
    image_result,
    load_image_model,
    used_checkpoints,
)
from breastnet.labels import GROUPS, LabelMap, csv_label, unlabelled_folder
from breastnet.lineage import Lineage
from breastnet.prediction import predict_images
from breastnet.report import ImageResult
from breastnet.stages.common import publish_report

log = logging.getLogger(__name__)


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
    none. Label names that nothing maps are logged by name with their count of files (those
    files are predicted, unlabelled)."""
    csv_path = find_label_csv(root, labels_csv)
    from_csv = read_label_csv(csv_path) if csv_path else {}
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


def print_outcome(results: list[ImageResult], root: Path, metrics: dict[str, float]) -> None:
    """One file: its class and probabilities. A folder: the accuracies its labels allow."""
    if len(results) == 1 and not (r := results[0]).failed:
        probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(CLASSES, r.probs, strict=True))
        print(
            f"{r.path}: {CLASSES[r.predicted]} ({probs}; carcinoma {r.carcinoma_prob:.3f}) "
            f"from {r.n_patches} patches"
        )
    views = (
        ("4-class", "image_accuracy", "n_images"),
        ("2-class", "carcinoma_accuracy", "carcinoma_n_images"),
    )
    for view, accuracy, n in views:
        if f"predict/{accuracy}" in metrics:
            print(
                f"{view} image accuracy on {root}: {metrics[f'predict/{accuracy}']:.3f} "
                f"({metrics[f'predict/{n}']} images)"
            )


def run(cfg: DictConfig) -> dict[str, float]:
    """Predict every image of ``predict.input``; returns image accuracy when labelled.

    Files are decoded, normalised and tiled in DataLoader workers and embedded on every rank.
    """
    if not cfg.predict.input:
        raise ConfigError("set predict.input=<image file or folder> (make predict INPUT=...)")
    root, files = find_inputs(Path(cfg.predict.input).expanduser().resolve())
    labels = labels_for(
        root, files, cfg.predict.labels_csv, LabelMap(cfg.predict.label_map, "predict.label_map")
    )
    lineage = Lineage(cfg)
    datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
    datamodule.setup()
    model = load_image_model(cfg, lineage)
    # The models' tiling, fitted to any image size; the lineage keys stay the training ones.
    tiling = dataclasses.replace(datamodule.tiling, fit=cfg.predict.fit)
    mpps = [cfg.predict.mpp or read_mpp(f) for f in files]
    dataset = ImageFiles(files, root, tiling, datamodule.stain, mpps)
    out_dir = Path(cfg.predict.output_dir)
    # An interrupted run resumes with the parts made under the same models, input and tiling
    parts = lineage.predict_parts()
    outputs = predict_images(
        cfg, image_embedder(cfg, lineage, model), dataset, dataset.image_ids, parts, "predict"
    )

    def report() -> dict[str, float]:
        results = []
        for i, (f, image_id) in enumerate(zip(files, dataset.image_ids, strict=True)):
            result = image_result(outputs[image_id], str(f), None)
            result.mpp = dataset.pixel_size(i)
            if labels[f] in CLASSES:
                result.label = CLASSES.index(labels[f])
            elif labels[f] in GROUPS:
                result.label_group = GROUPS.index(labels[f])
            results.append(result)
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
        )
        print_outcome(results, root, metrics)
        print(f"predictions: {written.predictions_csv}")
        failed = [r for r in results if r.error]
        for r in failed:
            log.error("%s", r.error)
        if failed:
            raise DataError(
                f"{len(failed)} of {len(results)} file(s) could not be predicted "
                f"(first: {failed[0].error}); see {written.predictions_csv}"
            )
        return metrics | {"predict/n_images": len(results)}

    return on_rank_zero(report) or {}
