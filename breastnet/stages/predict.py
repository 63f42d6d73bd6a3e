"""Stage ``predict``: the trained pipeline on new images of any size, one row per file.

``python -m breastnet 'stages=[predict]' predict.input=<file or folder>`` with the config the
models were trained with (it locates them in ``work_dir``). Writes ``predictions.csv`` in
``predict.output_dir``; when the files have labels (BACH class folders, or a ``file,label``
CSV) also ``metrics.json``, the plots and ``index.html``: any labelled folder is an external
test set. Its labels may be other names (``predict.label_map``) or only BACH's 2-class groups,
its images another pixel size (``predict.mpp``, TIFF tags) or size (``predict.fit``; an
image smaller than one tile is refused, as in training, unless ``predict.fit=pad``). A file
that cannot be used gets a row with its error and the others go on; the stage fails at the
end, after writing everything, when any file did.

What the inputs are to the model is said, not assumed: files without a pixel size, files that
are the model's own training or val images (by content hash; left out of the scores unless
``predict.include_training=true``), a model trained on generated images, and inputs whose
features lie farther from the training images than those lie from each other
(``breastnet.inference.checks``). ``predict.ensemble=cv`` averages a cross-validation's fold
models (``breastnet.inference.ensemble``).
"""

import dataclasses
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from breastnet.data.bach import DataError
from breastnet.data.datamodule import BreastDataModule
from breastnet.distributed import on_rank_zero
from breastnet.errors import ConfigError
from breastnet.inference.checks import (
    farthest_shift,
    feature_shift,
    pixel_sizes,
    seen_in_training,
    warn_about_inputs,
    warn_about_small_images,
)
from breastnet.inference.ensemble import (
    ensemble_facts,
    load_members,
    mean_outputs,
    parts_dir,
    predict_members,
)
from breastnet.inference.files import ImageFiles, find_inputs, labels_for
from breastnet.inference.results import add_tile_probs, file_result, outcome_lines
from breastnet.labels import LabelMap
from breastnet.lineage import container
from breastnet.logs import say
from breastnet.stages.common import model_facts, pixel_facts, publish_report

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    """Predict every image of ``predict.input``; returns image accuracy when labelled.

    Files are decoded, normalised and tiled in DataLoader workers and embedded on every rank.
    """
    if not cfg.predict.input:
        raise ConfigError("set predict.input=<image file or folder> (make predict INPUT=...)")
    root, files = find_inputs(Path(cfg.predict.input).expanduser().resolve())
    members = load_members(cfg)
    label_map = LabelMap(cfg.predict.label_map, "predict.label_map")
    labels = labels_for(root, files, cfg.predict.labels_csv, label_map)
    datamodule: BreastDataModule = instantiate(members[0].cfg.data, mode="image")
    datamodule.setup()
    # The models' tiling, fitted to any image size; the lineage keys stay the training ones.
    tiling = dataclasses.replace(datamodule.tiling, fit=cfg.predict.fit)
    mpps = pixel_sizes(cfg, files, tiling.mpp)
    dataset = ImageFiles(files, root, tiling, datamodule.prepared.stain, mpps)
    # An interrupted run resumes with the parts made under the same models, input and tiling
    per_member = predict_members(cfg, members, dataset)
    outputs = mean_outputs(per_member)
    out_dir = Path(cfg.predict.output_dir)

    def report() -> dict[str, float]:
        lineages = [m.lineage for m in members]
        facts = model_facts(cfg, lineages[0])
        facts["training_split"] = ", ".join(lineage.outer_split.stem for lineage in lineages)
        seen = seen_in_training(lineages, files)
        shift = farthest_shift(
            [feature_shift(m.cfg, m.lineage, o) for m, o in zip(members, per_member, strict=True)]
        )
        warn_about_inputs(cfg, facts, seen, shift)
        left_out = 0 if cfg.predict.include_training else len(seen)
        frozen = members[0].lineage.frozen
        results = [
            file_result(
                outputs[image_id],
                f,
                mpps[i],
                tiling,
                labels[f] if cfg.predict.include_training or f not in seen else None,
                frozen,
            )
            for i, (f, image_id) in enumerate(zip(files, dataset.image_ids, strict=True))
        ]
        if frozen:  # heatmaps: the image model's own per-tile view
            own = [m.model.aggregator for m in members]
            for r in results:
                if not r.failed:
                    add_tile_probs(r, own, [o[r.image_id]["features"] for o in per_member])
        padded = tiling.fit == "pad"  # else an image smaller than a tile is refused
        small = [r for i, r in enumerate(results) if dataset.smaller_than_a_tile(i)]
        tissue = [r.tissue if padded else None for r in small if not (padded and r.failed)]
        warn_about_small_images(tiling, len(results), tissue)
        source = "predict.mpp" if cfg.predict.mpp else "TIFF tags, else data.mpp"
        inputs = facts | {
            "input": str(root),
            **pixel_facts(mpps, source),
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
            parts_dir(members),  # this run's parts alone: others' resume files stay
            checkpoints=[c for m in members for c in m.checkpoints()],
            inputs=inputs,
            tiling=tiling,
            predictor=ensemble_facts(cfg, members),
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
