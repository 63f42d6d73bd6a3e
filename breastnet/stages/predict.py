"""Stage ``predict``: the trained pipeline on new images of any size, one row per file.

``python -m breastnet 'stages=[predict]' predict.input=<file or folder>`` with the config the
models were trained with (it locates them in ``work_dir``). Writes ``predictions.csv`` in
``predict.output_dir``; when the files have labels (BACH class folders, or a ``file,label``
CSV) also ``metrics.json``, the plots and ``index.html``: any labelled folder is an external
test set. A file that cannot be used gets a row with its error and the others go on; the stage
fails at the end, after writing everything, when any file did.
"""

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from tqdm import tqdm

from breastnet import CLASSES
from breastnet.data.bach import (
    DataError,
    find_images,
    find_label_csv,
    folder_label,
    read_label_csv,
    read_rgb,
)
from breastnet.data.datamodule import BreastDataModule
from breastnet.data.store import tissue_fraction
from breastnet.inference import TrainedPipeline
from breastnet.reporting import ImageResult, write_report
from breastnet.stages.evaluate import summary_metrics
from breastnet.tracking import log_report

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


def labels_for(root: Path, files: list[Path], labels_csv: str | None) -> dict[Path, str | None]:
    """Each file's label from its class folder or the label CSV (None when it has none)."""
    csv_path = find_label_csv(root, labels_csv)
    from_csv = read_label_csv(csv_path) if csv_path else {}
    labels = {}
    for f in files:
        rel = f.relative_to(root)
        labels[f] = folder_label(f, root) or from_csv.get(rel.as_posix(), from_csv.get(f.name))
    return labels


def predict_file(
    pipeline: TrainedPipeline, path: Path, root: Path, label: str | None
) -> ImageResult:
    """The pipeline's result for one file, or a result carrying why it has none."""
    image_id = path.relative_to(root).with_suffix("").as_posix()
    label_index = None if label is None else CLASSES.index(label)
    try:
        rgb, _ = read_rgb(path)
        patches, positions = pipeline.tile(rgb)
    except (DataError, ValueError) as e:
        message = str(e) if str(path) in str(e) else f"{path}: {e}"
        log.error("%s", message)
        return ImageResult(
            image_id=image_id,
            path=str(path),
            label=label_index,
            probs=None,
            patch_probs=None,
            positions=None,
            tissue=None,
            error=message,
        )
    return pipeline.result(
        image_id, str(path), label_index, positions, tissue_fraction(patches), patches
    )


def run(cfg: DictConfig) -> dict[str, float]:
    """Predict every image of ``predict.input``; returns image accuracy when labelled."""
    if rank_zero_only.rank != 0:
        return {}
    if not cfg.predict.input:
        raise ValueError("set predict.input=<image file or folder>")
    root, files = find_inputs(Path(cfg.predict.input).expanduser().resolve())
    labels = labels_for(root, files, cfg.predict.labels_csv)
    datamodule: BreastDataModule = instantiate(cfg.data, mode="patch")
    datamodule.setup()
    pipeline = TrainedPipeline(cfg, datamodule)
    results = [
        predict_file(pipeline, f, root, labels[f]) for f in tqdm(files, desc="predict", unit="img")
    ]

    def patches(image_id: str):  # only the few images the report draws are tiled again
        path = next(r.path for r in results if r.image_id == image_id)
        return pipeline.tile(read_rgb(path)[0])[0]

    report = write_report(
        Path(cfg.predict.output_dir),
        results,
        patches=patches,
        title=f"breastnet predictions: {root}",
        min_tissue=datamodule.hparams.min_tissue,
        n_examples=cfg.eval.examples,
        seed=cfg.seed,
    )
    log_report(cfg, report, results, "predict")
    metrics = summary_metrics(report, "predict")
    if "predict/image_accuracy" in metrics:
        print(f"image accuracy on {root}: {metrics['predict/image_accuracy']:.3f}")
    print(f"predictions: {report.predictions_csv}")
    failed = [r for r in results if r.error]
    if failed:
        raise DataError(
            f"{len(failed)} of {len(results)} file(s) could not be predicted "
            f"(first: {failed[0].error}); see {report.predictions_csv}"
        )
    return metrics | {"predict/n_images": len(results)}
