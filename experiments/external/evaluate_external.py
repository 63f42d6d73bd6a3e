"""A trained pipeline on external-like sets made from each fold's held-out test images.

For each fold of a cross-validation (trained beforehand with ``make cv``), the fold's test
images are made over as another lab would hand them over (``breastnet.synthetic.rescan``)
and run through ``stages=[predict]``:

- ``as is``: the test images themselves (4-class folders): the reference;
- ``0.21 µm/px``: scanned at half BACH's pixel size (2x the pixels, TIFF resolution tags),
  filed under 2-class ``Benign``/``Malignant`` folders; predicted as the tags say, then with
  the tags overridden (``predict.mpp=0.42``: what a pixel-size-blind tool does);
- ``700x460``: BreakHis-sized centre crops at 0.42 µm/px (smaller than one 512 px tile in
  height), 2-class folders; ``predict.fit=overlap`` and ``pad``.

    python experiments/external/evaluate_external.py --out /tmp/ext -- experiment=bach_cpu \
        logger=csv paths.work_dir=/tmp/exp/work trainer.max_epochs=3 features.tta=false \
        data.groups=blocks:10

Prints one markdown table: mean ± std over the folds (ddof 0), then each fold's value.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from breastnet import CLASSES
from breastnet.lineage import Lineage
from breastnet.synthetic.rescan import rescan

ROOT = Path(__file__).resolve().parents[2]
TWO_CLASS_MAP = "predict.label_map={Benign:non_carcinoma,Malignant:carcinoma}"
# name -> (which made-over set, predict overrides)
VARIANTS = {
    "as is (4-class folders)": ("as_is", []),
    "0.21 µm/px, pixel size from the TIFF tags": ("half", [TWO_CLASS_MAP]),
    "0.21 µm/px, tags ignored (predict.mpp=0.42)": ("half", [TWO_CLASS_MAP, "predict.mpp=0.42"]),
    "700x460 crops, predict.fit=overlap": ("crops", [TWO_CLASS_MAP, "predict.fit=overlap"]),
    "700x460 crops, predict.fit=pad": ("crops", [TWO_CLASS_MAP, "predict.fit=pad"]),
}


def test_ids(overrides: list[str]) -> tuple[Path, list[str]]:
    """The data folder and the test image ids of the split these overrides train on."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    split = json.loads(Lineage(cfg).split.read_text())
    return Path(cfg.data.data_dir), split["test"]


def make_sets(data: Path, ids: list[str], out: Path) -> dict[str, Path]:
    """The made-over versions of the test images (see the module docstring)."""
    sets = {"as_is": out / "as_is", "half": out / "half", "crops": out / "crops"}
    rescan(data, sets["as_is"], folders={c: c for c in CLASSES}, image_ids=ids, tags=False)
    rescan(data, sets["half"], mpp=0.21, image_ids=ids)
    rescan(data, sets["crops"], crop=(700, 460), image_ids=ids, tags=False)
    return sets


def predict(overrides: list[str], folder: Path, out: Path, extra: list[str]) -> dict:
    """The report's metrics.json of ``stages=[predict]`` on ``folder`` (run unless there),
    with the mean patch count of its images."""
    if not (out / "metrics.json").is_file():
        command = [sys.executable, "-m", "breastnet", "stages=[predict]", *overrides, *extra]
        command += [f"predict.input={folder}", f"predict.output_dir={out}"]
        command += [f"hydra.run.dir={out}/run"]  # the run's own metrics.json goes there
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    column = header.index("n_patches")
    metrics["mean_patches"] = float(np.mean([int(r.split(",")[column]) for r in rows]))
    return metrics


def _cell(values: list[float | None], scale: float = 100, digits: int = 1) -> str:
    if any(v is None for v in values):
        return "n/a"
    v = np.array(values) * scale
    each = ", ".join(f"{x:.{digits}f}" for x in v)
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f} ({each})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="the training run's Hydra overrides")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for fold in range(args.folds):
        overrides = [*args.overrides, f"data.folds={args.folds}", f"data.fold={fold}"]
        data, ids = test_ids(overrides)
        scratch = args.out / f"fold{fold}"
        sets = make_sets(data, ids, scratch / "sets")
        for i, (name, (which, extra)) in enumerate(VARIANTS.items()):
            out = scratch / f"predict{i}"
            results[name].append(predict(overrides, sets[which], out, extra))
            print(f"fold {fold}: {name}: done", file=sys.stderr)
        shutil.rmtree(sets["half"])  # 3072 px TIFFs
    print("| set | 4-class image acc. % | 2-class acc. % | 2-class AUC | sens. % | spec. % |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        two = [r["two_class"] for r in runs]
        cells = [
            _cell([r["image_accuracy"] for r in runs]),
            _cell([t["accuracy"] for t in two]),
            _cell([t["auc"] for t in two], 1, 3),
            _cell([t["sensitivity"] for t in two]),
            _cell([t["specificity"] for t in two]),
        ]
        patches = np.mean([r["mean_patches"] for r in runs])
        print(f"| {name} ({patches:.1f} patches/image) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
