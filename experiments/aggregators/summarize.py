"""Summarise a Hydra multirun over image_model x data.fold: mean +- std per aggregator.

python experiments/aggregators/summarize.py logs/multiruns/<time>
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

METRICS = ("image/test_acc", "image/val_acc_best", "features/patch_acc_test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = defaultdict(list)
    for job in sorted(args.sweep_dir.glob("*/metrics.json"), key=lambda p: int(p.parent.name)):
        overrides = yaml.safe_load((job.parent / ".hydra" / "overrides.yaml").read_text())
        settings = dict(o.split("=", 1) for o in overrides if "=" in o)
        rows[settings.get("image_model", "bilstm")].append(json.loads(job.read_text()))
    print(f"| aggregator | folds | {' | '.join(METRICS)} |")
    print(f"| --- | --- |{' --- |' * len(METRICS)}")
    for name, runs in sorted(
        rows.items(), key=lambda kv: -np.mean([r[METRICS[0]] for r in kv[1]])
    ):
        cells = []
        for metric in METRICS:
            values = np.array([r[metric] for r in runs if metric in r])
            cells.append(
                f"{100 * values.mean():.1f} ± {100 * values.std():.1f}" if len(values) else "—"
            )
        print(f"| {name} | {len(runs)} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
