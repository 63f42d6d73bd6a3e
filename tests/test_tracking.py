"""W&B charts drawn from the report's numbers match what wandb's own helpers draw."""

import numpy as np
import wandb

from breastnet import CLASSES
from breastnet.report.metrics import classification_metrics
from breastnet.tracking import confusion_chart

from conftest import noisy_probs


def test_confusion_chart_from_metrics_equals_wandbs_own() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), size=30)
    probs = noisy_probs(labels, rng, signal=0.5)
    ours = confusion_chart(classification_metrics(labels, probs)["confusion_matrix"])
    theirs = wandb.plot.confusion_matrix(
        y_true=labels.tolist(), preds=probs.argmax(1).tolist(), class_names=list(CLASSES)
    )
    assert ours.table.data == [[true, pred, int(n)] for true, pred, n in theirs.table.data]
    assert vars(ours.spec) == vars(theirs.spec)
