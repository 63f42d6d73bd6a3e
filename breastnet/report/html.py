"""The report's index.html: one self-contained page (figures inlined) a browser opens from disk."""

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from breastnet.report.figures import TsnePlot
from breastnet.report.metrics import MIN_INTERVAL_IMAGES, MIN_ROC_IMAGES
from breastnet.report.result import ImageResult, label_name

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 1em 1em 0; display: inline-block; vertical-align: top; }
figure.half { width: calc(50% - 1em); }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
.muted { color: #777; }
.error { color: #b00; }
"""

# Counts the figures that really decoded, for a headless-browser check of the page.
_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var loaded = 0;
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    if (img.complete && img.naturalWidth > 0) loaded++;
  }
  document.body.dataset.imagesLoaded = String(loaded);
});
</script>
"""

_CAPTIONS = {
    "confusion_matrix": "Confusion matrix: rows true class, columns predicted class.",
    "roc": f"One-vs-rest ROC curve of each class with at least {MIN_ROC_IMAGES} images of it "
    "and of the others.",
    "confusion_2class": "2-class confusion matrix: rows true group, columns the group of the "
    "predicted class.",
    "roc_2class": "Carcinoma vs non-carcinoma ROC curve, ranked by the summed carcinoma "
    f"probability (drawn with at least {MIN_ROC_IMAGES} images of each group).",
    "tsne": "t-SNE of patch features, each coloured by {key}.",
    "patch_grid": "The patches of one image at their grid positions, numbered row by row.",
}
_HALF = ("roc", "tsne", "confusion_2class", "roc_2class")
_CROSSES = " Crosses: patches whose own most probable class is not their image's label."


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_ci(interval: list[float] | None, n_images: int | None = None) -> str:
    """An interval, or why there is none: below ``MIN_INTERVAL_IMAGES`` a bootstrap of a
    sample with no error would read 1.000–1.000."""
    if n_images is not None and n_images < MIN_INTERVAL_IMAGES:
        return "too few images"
    return "n/a" if interval is None else f"{interval[0]:.3f}–{interval[1]:.3f}"


def _esc(x: object) -> str:
    return html.escape(str(x))


def _table(header: Sequence[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are already escaped."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, caption: str, half: bool = False) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    css = ' class="half"' if half else ""
    return (
        f'<figure{css}><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def _metrics_html(metrics: dict, classes: Sequence[str]) -> str:
    """The 4-class numbers (when there are 4-class labels), then the 2-class ones."""
    two = metrics["two_class"]
    binary = _table(
        ["accuracy", "95 % CI", "sensitivity", "specificity", "AUC", "95 % CI", "images"],
        [
            [
                _fmt(two["accuracy"]),
                _fmt_ci(two["accuracy_ci"], two["n_images"]),
                _fmt(two["sensitivity"]),
                _fmt(two["specificity"]),
                _fmt(two["auc"]),
                _fmt_ci(two["auc_ci"], two["n_images"]),
                f"{two['n_images']} ({two['n_carcinoma']} carcinoma)",
            ]
        ],
        numeric=set(range(7)),
    )
    binary = (
        "<h3>Carcinoma vs non-carcinoma</h3><p>BACH's 2-class view: InSitu + Invasive "
        "against Normal + Benign, each image's group from its predicted class; the AUC ranks "
        f"by the summed carcinoma probability.</p>{binary}"
    )
    remarks = "".join(
        f'<p class="error">Below chance: {_esc(remark)}.</p>'
        for remark in metrics.get("below_chance") or []
    )
    if metrics["per_class"] is None:
        return f"<h2>Metrics</h2>{remarks}<p>Only 2-class labels: no 4-class numbers.</p>{binary}"
    n = metrics["n_images"]
    columns = [
        ("image accuracy", _fmt(metrics["image_accuracy"])),
        ("95 % CI", _fmt_ci(metrics["image_accuracy_ci"], n)),
        ("balanced accuracy", _fmt(metrics["balanced_accuracy"])),
        ("95 % CI", _fmt_ci(metrics["balanced_accuracy_ci"], n)),
    ]
    if "patch_accuracy" in metrics:  # not for a frozen encoder: its patches have no classes
        columns.append(("patch accuracy", _fmt(metrics["patch_accuracy"])))
    columns += [
        ("macro AUC", _fmt(metrics["macro_auc"])),
        ("95 % CI", _fmt_ci(metrics["macro_auc_ci"], n)),
        ("images", str(n)),
    ]
    if "n_patches" in metrics:
        patches = metrics["n_patches"]
        columns.append(("patches", "n/a" if patches is None else str(patches)))
    summary = _table(
        [name for name, _ in columns],
        [[cell for _, cell in columns]],
        numeric=set(range(len(columns))),
    )
    per_class = _table(
        ["class", "sensitivity", "specificity", "AUC", "n"],
        [
            [_esc(name), *(_fmt(m[k]) for k in ("sensitivity", "specificity", "auc")), str(m["n"])]
            for name, m in ((c, metrics["per_class"][c]) for c in classes)
        ],
        numeric={1, 2, 3, 4},
    )
    return f"<h2>Metrics</h2>{remarks}{summary}<h3>Per class</h3>{per_class}{binary}"


def _true_prob(r: ImageResult) -> float:
    """The probability given to the true label: its class, or its group's summed classes."""
    if r.label is not None:
        return float(r.probs[r.label])
    return r.carcinoma_prob if r.group else 1 - r.carcinoma_prob


def _split_html(split: dict) -> str:
    """One paragraph: the split, its grouping and the near-duplicates that cross it."""
    text = f"<p><b>Split</b> {_esc(split.get('name', ''))}: {_esc(split['text'])}."
    if split.get("scope"):  # a data set with part of a published test set
        text += f" The test images are {_esc(split['scope'])}."
    if split.get("near_duplicates") is not None:
        n = split["near_duplicates"]
        style = ' class="error"' if n else ""
        text += (
            f" <span{style}>{n} evaluated image(s) with a near-duplicate among the training "
            f"images</span> (thumbnail cosine &ge; {split['threshold']:g})."
        )
    return text + "</p>"


def _inputs_html(inputs: dict) -> str:
    """What was scored against what the model was trained on: the pixel size, label map,
    training data and split, training images among the inputs and how far the inputs lie
    from the training images in feature space."""
    given = inputs.get("image_mpp") or []
    images = ", ".join(f"{m:g}" for m in given) + " µm/px" if given else "none given"
    rows = [
        ["input", _esc(inputs.get("input", "n/a"))],
        [
            "pixel size",
            _esc(
                f"the images: {images} ({inputs['pixel_size']}), rescaled to the tiling's "
                f"{inputs['tiling_mpp']:g} µm/px; tiles: {inputs['tile']}"
            ),
        ],
    ]
    if inputs.get("untagged_files"):
        rows.append(
            [
                "files without a pixel size",
                f'<span class="error">{inputs["untagged_files"]}, assumed to be '
                f"{inputs['tiling_mpp']:g} µm/px</span>",
            ]
        )
    label_map = inputs.get("label_map")
    rows.append(["label map", _esc(label_map) if label_map else "none (BACH names)"])
    generated = ' <span class="error">(generated images, not real tissue)</span>'
    rows.append(
        ["trained on", _esc(inputs["training_data"]) + (generated if inputs["generated"] else "")]
    )
    rows.append(["training split", _esc(inputs["training_split"])])
    if inputs.get("frozen_encoder"):
        rows.append(
            [
                "patch network",
                "a frozen encoder (patch_model.freeze=true): its head is zero, so its patches "
                "have no class of their own and there is no patch accuracy",
            ]
        )
    seen = inputs.get("training_images") or {}
    if seen:
        fate = "scored" if inputs.get("training_images_scored") else "left out of the scores"
        rows.append(
            [
                "training images among the inputs",
                f'<span class="error">{len(seen)} ({_esc(fate)})</span>',
            ]
        )
    shift = inputs.get("feature_shift")
    if shift:
        style = ' class="error"' if shift["n_far"] else ""
        rows.append(
            [
                "far from the training images",
                f"<span{style}>{shift['n_far']} of {shift['n_images']} "
                f"({100 * shift['far_share']:.0f} %)</span>: nearest training image farther "
                "than any training image's nearest other one (median distance "
                f"{shift['median_distance']:.3g}; between training images "
                f"{shift['median_training_distance']:.3g})",
            ]
        )
    return "<h2>What was predicted</h2>" + _table(["what", "value"], rows)


def _prediction_cells(r: ImageResult, classes: Sequence[str]) -> list[str]:
    """Image, path, true label, predicted class and its probability, as table cells."""
    return [
        _esc(r.image_id),
        _esc(r.path),
        _esc(label_name(r, classes)),
        _esc(classes[r.predicted]),
        _fmt(float(r.probs[r.predicted])),
    ]


def _predictions_html(results: list[ImageResult], classes: Sequence[str]) -> str:
    rows = [_prediction_cells(r, classes) for r in results if not r.failed]
    return _table(["image", "path", "true", "predicted", "probability"], rows, numeric={4})


def _provenance_html(provenance: dict) -> str:
    """Which code, config and checkpoints made the numbers (provenance.json has it all)."""
    commit = provenance["commit"]
    code = "n/a" if commit is None else commit[:12] + (" (dirty)" if provenance["dirty"] else "")
    config = provenance.get("config")
    rows = [
        ["commit", _esc(code)],
        ["version", _esc(provenance["version"] or "n/a")],
        ["created (UTC)", _esc(provenance["created"])],
        ["experiment", _esc(provenance["experiment"] or "n/a")],
        ["tags", _esc(", ".join(provenance["tags"] or []) or "n/a")],
        ["command", f"<code>{_esc(' '.join(provenance['command']))}</code>"],
        ["config", f'<a href="{_esc(config)}">{_esc(config)}</a>' if config else "n/a"],
    ]
    if ensemble := provenance.get("ensemble"):
        rows.append(["ensemble", _esc(f"{ensemble}: the mean of {provenance['members']} models")])
    rows += [
        ["checkpoint", f"{_esc(c['path'])} (sha256 {_esc(c['sha256'])}, {_esc(c['modified'])})"]
        for c in provenance["checkpoints"]
    ]
    return (
        '<h2>Provenance</h2><p class="muted">Also in <a href="provenance.json">'
        "provenance.json</a>.</p>" + _table(["what", "value"], rows)
    )


def _heatmap_caption(r: ImageResult) -> str:
    """What an image's heatmap draws (``breastnet.report.heatmap.tile_values``)."""
    if r.patch_probs is not None:
        return f"{r.image_id}: per-class patch probabilities"
    if r.tile_probs is not None:
        return f"{r.image_id}: per-class tile probabilities of the image model's own head"
    return f"{r.image_id}: attention weights"


def render_html(
    title: str,
    results: list[ImageResult],
    metrics: dict | None,
    figures: dict[str, Path],
    heatmaps: dict[str, Path],
    misclassified: list[ImageResult],
    classes: Sequence[str],
    split: dict | None = None,
    provenance: dict | None = None,
    inputs: dict | None = None,
    tsne: TsnePlot | None = None,
    heatmap_note: str | None = None,
) -> str:
    """The page: what was evaluated, metrics, figures, misclassified images (in the given
    order) with their heatmaps, the closest train/test pairs, predictions, failed files and
    provenance; ``figures`` and ``heatmaps`` are PNG paths, inlined as data URLs.
    ``inputs``: what predict scored against the training data (``write_report``);
    ``tsne``: the t-SNE drawn (its colours, as its title says, and its crosses);
    ``heatmap_note``: why no heatmap was drawn."""
    failed = [r for r in results if r.failed]
    by_id = {r.image_id: r for r in results}
    parts = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="muted">{len(results)} images, {len(failed)} failed. Files: '
        + ('<a href="metrics.json">metrics.json</a>, ' if metrics is not None else "")
        + '<a href="predictions.csv">predictions.csv</a>.</p>',
    ]
    if split is not None:
        parts.append(_split_html(split))
    if inputs is not None:
        parts.append(_inputs_html(inputs))
    if metrics is not None:
        parts.append(_metrics_html(metrics, classes))
    else:
        parts.append("<h2>Predictions</h2><p>No labels: no metrics.</p>")
        parts.append(_predictions_html(results, classes))

    captions = dict(_CAPTIONS)
    if tsne is not None:
        crosses = _CROSSES if tsne.n_misclassified else ""
        captions["tsne"] = captions["tsne"].format(key=tsne.colour_key) + crosses
    overview = [_img(figures[k], captions[k], half=k in _HALF) for k in captions if k in figures]
    if overview:
        parts.append("<h2>Figures</h2>" + "".join(overview))
    if heatmap_note:
        parts.append(f'<p class="muted">{_esc(heatmap_note)}</p>')

    if metrics is not None:
        parts.append(f"<h2>Misclassified images ({len(misclassified)})</h2>")
        if misclassified:
            rows = [[*_prediction_cells(r, classes), _fmt(_true_prob(r))] for r in misclassified]
            header = ["image", "path", "true", "predicted", "p(predicted)", "p(true)"]
            parts.append(_table(header, rows, numeric={4, 5}))
            parts.extend(
                _img(heatmaps[r.image_id], _heatmap_caption(r))
                for r in misclassified
                if r.image_id in heatmaps
            )
        else:
            parts.append("<p>None.</p>")
    if "audit_pairs" in figures:
        parts.append(
            "<h2>Closest training images</h2>"
            + _img(
                figures["audit_pairs"],
                "Each evaluated image beside its most similar training image (thumbnail "
                "cosine; near-duplicates in red): near-twins across the split inflate accuracy.",
            )
        )
    wrong = {r.image_id for r in misclassified}
    others = [(i, p) for i, p in heatmaps.items() if i not in wrong]
    if others:
        parts.append("<h2>Example heatmaps</h2>")
        parts.extend(_img(p, _heatmap_caption(by_id[i])) for i, p in others)

    if metrics is not None:
        parts.append("<details><summary>All predictions</summary>")
        parts.append(_predictions_html(results, classes) + "</details>")

    parts.append(f"<h2>Failed files ({len(failed)})</h2>")
    if failed:
        rows = [
            [_esc(r.image_id), _esc(r.path), f'<span class="error">{_esc(r.error or "")}</span>']
            for r in failed
        ]
        parts.append(_table(["image", "path", "error"], rows))
    else:
        parts.append("<p>None.</p>")
    if provenance is not None:
        parts.append(_provenance_html(provenance))

    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n{_SCRIPT}</body>\n</html>\n"
    )
