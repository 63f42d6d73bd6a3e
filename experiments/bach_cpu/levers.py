"""Each accuracy lever of the CPU recipe on both yardsticks, and the table of their scores.

A lever is a set of overrides on ``experiment=bach_cpu`` (no test-time augmentation; its
encoder frozen, ``r1``, unless a lever fine-tunes it). Each one runs as two Hydra multiruns
on bach-dev, then ``breastnet.summary``:

- eva's patient-aware split, its bach-dev part (134 training images, val carved out of them by
  the split seed; 66 test images), split and training seeds 2019, 2020, 2021;
- 5-fold CV grouped by BACH's patients (``data.groups=auto``, the default, resolves to
  ``bach`` here), split seed 2019.

    python experiments/bach_cpu/levers.py --work-dir /tmp/lv/work --out /tmp/lv/cv r1 r2
    python experiments/bach_cpu/levers.py --out /tmp/lv/cv --table   # the markdown table

The table gives, per lever and image model, balanced accuracy and accuracy: mean ± sample std
with the values of each seed or fold. A lever that wins on one yardstick and loses on the
other is not a win.

These levers are compared on their test images (17 of them): the table says how each one
scores, and a choice read off it is a choice made on the test side. ``experiment=bach_cpu`` is
chosen without the test side now (``breastnet.select``, RESULTS.md); ``BASE`` pins the tile
view it had when these levers ran.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def tiling(tile: int, patch: int, stride: int | None = None) -> tuple[str, ...]:
    """Overrides for ``tile`` px tiles every ``stride`` px (non-overlapping by default),
    resized to ``patch`` px."""
    return (f"data.tile_size={tile}", f"data.stride={stride or tile}", f"data.patch_size={patch}")


BASE = ("experiment=bach_cpu", "logger=csv", "features.tta=false", "features.view=tiles")


def fine_tune(epochs: int = 4, head_epochs: int = 1) -> tuple[str, ...]:
    """Linear probe then fine-tune: ``head_epochs`` with the head alone, then blocks 14-18 too,
    with weight decay, to epoch ``epochs``."""
    return (
        "patch_model.freeze=false",
        f"trainer.max_epochs={epochs}",
        f"patch_model.freeze_backbone_epochs={head_epochs}",
        "patch_model.net.train_from=features.14",
        "patch_model.optimizer.weight_decay=0.05",
    )


# a fixed encoder and the image model on its features (it has no patch probs: no vote)
FROZEN = ("patch_model.freeze=true", "image_model=mean_features")
# the same encoder, with the two sequence models beside the mean
SEQUENCE_MODELS = ("patch_model.freeze=true", "image_model=mean_features,attention,bilstm")
TILES_512 = tiling(512, 224)  # bach_cpu's tiles until r5
IMAGE_MODELS = "image_model=mean_features,vote"
# name -> (what it is, its overrides); a lever may set its own image_model sweep
LEVERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "r0": (
        "blocks 10-18 fine-tuned, 3 epochs (bach_cpu until this table)",
        ("patch_model.freeze=false", "trainer.max_epochs=3", *TILES_512),
    ),
    "r1": (
        "frozen encoder, image model on its features, 9 tiles of 512 px (bach_cpu before r5)",
        (*FROZEN, *TILES_512),
    ),
    "r2": (
        "linear probe then fine-tune (1 head-only epoch), blocks 14-18, weight decay 0.05",
        (*fine_tune(), *TILES_512),
    ),
    "r3": (
        "r2, refitted on train + val for the epochs val chose (patch.refit)",
        (*fine_tune(), "patch.refit=true", *TILES_512),
    ),
    "r4": (
        "r1 at the scanner's pixel size: 36 native 224 px tiles, not 9 of 512 px resized",
        (*SEQUENCE_MODELS, *tiling(224, 224)),  # long sequences: the BiLSTM's case
    ),
    "r5": (
        "r1 with more context: 4 tiles of 768 px to 224 (1.44 µm/px), not 9 of 512 (bach_cpu now)",
        (*FROZEN, *tiling(768, 224)),
    ),
    "r6": (
        "r1 on the whole field: one 1536 px tile resized to 448 (1.44 µm/px)",
        (*FROZEN, *tiling(1536, 448)),
    ),
    "r7": (
        "r1 on the whole field resized to 336 (1.92 µm/px)",
        (*FROZEN, *tiling(1536, 336)),
    ),
    "r8": (
        "r3's fine-tuning (head first, blocks 14-18, refit) on r5's 768 px tiles",
        (*fine_tune(), "patch.refit=true", *tiling(768, 224)),
    ),
    "r12": (
        "r8 trained longer: 2 head-only epochs, then blocks 14-18 to epoch 10",
        (*fine_tune(10, 2), "patch.refit=true", *tiling(768, 224)),
    ),
    "r13": (
        "r5 without Macenko normalisation (stain=none)",
        (*FROZEN, *tiling(768, 224), "stain=none"),
    ),
    "r14": (
        "r5 with the Macenko reference chosen from the training images alone (not transductive)",
        (*FROZEN, *tiling(768, 224), "stain.reference=train"),
    ),
    "r15": (
        "the BiLSTM's case at r5's scale: 25 overlapping 768 px tiles (stride 192), row order",
        (*SEQUENCE_MODELS, *tiling(768, 224, stride=192)),
    ),
    "r16": (
        "r5 with attention-MIL and the BiLSTM beside the mean (which image model to default to)",
        (*SEQUENCE_MODELS, *tiling(768, 224)),
    ),
}
YARDSTICKS = {
    "eva": ("data.split=eva", "seed=2019,2020,2021"),
    "bach": ("data.folds=5", "data.fold=range(5)"),
}


def run(name: str, work_dir: Path, out: Path, yardsticks: list[str]) -> None:
    """The multiruns of lever ``name`` and their summaries, under ``out/<name>_<yardstick>``."""
    for yardstick in yardsticks:
        protocol = YARDSTICKS[yardstick]
        sweep = out / f"{name}_{yardstick}"
        lever = LEVERS[name][1]
        models = [] if any(o.startswith("image_model=") for o in lever) else [IMAGE_MODELS]
        overrides = [*BASE, f"paths.work_dir={work_dir}", *lever, *protocol, *models]
        command = [sys.executable, "-m", "breastnet", "-m", *overrides]
        subprocess.run([*command, f"hydra.sweep.dir={sweep}"], check=True)
        summary = [sys.executable, "-m", "breastnet.summary", str(sweep)]
        subprocess.run([*summary, "--group-by", "image_model"], check=True)


def cell(metric: dict) -> str:
    values = ", ".join(f"{v:.3f}" for v in metric["values"])
    return f"{metric['mean']:.3f} ± {metric['stdev']:.3f} ({values})"


def table(out: Path) -> str:
    """The markdown table of every lever with results under ``out``."""
    rows = [
        "| lever | image model | eva bach-dev part: balanced | accuracy "
        "| 5-fold CV by patient: balanced | accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (what, _) in LEVERS.items():
        found = {y: out / f"{name}_{y}" / "results.json" for y in YARDSTICKS}
        results = {y: json.loads(path.read_text()) for y, path in found.items() if path.is_file()}
        for group in sorted({g for scores in results.values() for g in scores}):
            scores = [results.get(y, {}).get(group, {}) for y in YARDSTICKS]
            cells = [
                cell(s[k]) if k in s else "-"
                for s in scores
                for k in ("eval/balanced_accuracy", "eval/image_accuracy")
            ]
            model = group.removeprefix("image_model=")
            rows.append(f"| {name}: {what} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("levers", nargs="*", help=f"levers to run, of {', '.join(LEVERS)}")
    parser.add_argument("--work-dir", type=Path, default=Path("work"))
    parser.add_argument("--out", type=Path, default=Path("levers"), help="the multirun dirs")
    parser.add_argument(
        "--yardsticks", nargs="+", default=list(YARDSTICKS), choices=list(YARDSTICKS)
    )
    parser.add_argument("--table", action="store_true", help="print the table and stop")
    args = parser.parse_args()
    if unknown := set(args.levers) - set(LEVERS):
        parser.error(f"unknown lever(s) {sorted(unknown)}: choose from {', '.join(LEVERS)}")
    if not args.table:
        for name in args.levers:
            run(name, args.work_dir.resolve(), args.out.resolve(), args.yardsticks)
    print(table(args.out))


if __name__ == "__main__":
    main()
