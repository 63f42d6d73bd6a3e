"""Summarise a Hydra multirun over image_model x data.fold: mean ± std per aggregator.

    python experiments/aggregators/summarize.py logs/multiruns/<time> [--wandb]

The same as ``python -m breastnet.summary <dir> --group-by image_model --metrics ...`` with
the three metrics of RESULTS.md; it also writes summary.json and summary.md into the dir.
"""

import sys

from breastnet.summary import main

METRICS = ("image/test_acc", "image/val_acc_best", "features/patch_acc_test")

if __name__ == "__main__":
    main([*sys.argv[1:], "--group-by", "image_model", "--metrics", *METRICS])
