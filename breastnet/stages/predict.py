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

from breastnet import CLASSES
from breastnet.data.bach import (
    DataError,
    find_images,
    find_label_csv,
    folder_label,
    read_label_csv,
)
from breastnet.data.datamodule import BreastDataModule
from breastnet.distributed import on_rank_zero
from breastnet.errors import ConfigError
from breastnet.inference import (
    ImageFiles,
    image_embedder,
    image_result,
    load_image_model,
    used_checkpoints,
)
from breastnet.lineage import Lineage
from breastnet.prediction import predict_images
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


def labels_for(root: Path, files: list[Path], labels_csv: str | None) -> dict[Path, str | None]:
    """Each file's label from its class folder or the label CSV (None when it has none)."""
    csv_path = find_label_csv(root, labels_csv)
    from_csv = read_label_csv(csv_path) if csv_path else {}
    labels = {}
    for f in files:
        rel = f.relative_to(root)
        labels[f] = folder_label(f, root) or from_csv.get(rel.as_posix(), from_csv.get(f.name))
    return labels


def run(cfg: DictConfig) -> dict[str, float]:
    """Predict every image of ``predict.input``; returns image accuracy when labelled.

    Files are decoded, normalised and tiled in DataLoader workers and embedded on every rank.
    """
    if not cfg.predict.input:
        raise ConfigError("set predict.input=<image file or folder> (make predict INPUT=...)")
    root, files = find_inputs(Path(cfg.predict.input).expanduser().resolve())
    labels = labels_for(root, files, cfg.predict.labels_csv)
    lineage = Lineage(cfg)
    datamodule: BreastDataModule = instantiate(cfg.data, mode="image")
    datamodule.setup()
    model = load_image_model(cfg, lineage)
    dataset = ImageFiles(files, root, datamodule.tiling, datamodule.stain)
    out_dir = Path(cfg.predict.output_dir)
    parts = out_dir / ".parts" / lineage.image.name
    outputs = predict_images(
        cfg, image_embedder(cfg, lineage, model), dataset, dataset.image_ids, parts, "predict"
    )

    def report() -> dict[str, float]:
        results = []
        for f, image_id in zip(files, dataset.image_ids, strict=True):
            label = None if labels[f] is None else CLASSES.index(labels[f])
            results.append(image_result(outputs[image_id], str(f), label))
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
        if "predict/image_accuracy" in metrics:
            print(f"image accuracy on {root}: {metrics['predict/image_accuracy']:.3f}")
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
