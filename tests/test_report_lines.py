"""What evaluate says of a report in one line: the protocol, how many images of what, and
balanced accuracy beside accuracy."""

from types import SimpleNamespace

from breastnet.stages.common import EVA_TEST_IMAGES, eva_scope, evaluation_line, summary_metrics

METRICS = {"balanced_accuracy": 0.6037, "image_accuracy": 0.5714}


def test_a_part_of_evas_test_images_is_said_to_be_a_part() -> None:
    facts = {
        "protocol": "eva's patient-aware BACH split (those of its 132 reported images in the "
        "data set as test), val "
        "carved from its training side grouped by bach",
        "n_images": {"train": 108, "val": 25, "test": 66},
    }
    eva = SimpleNamespace(split="eva")
    facts["scope"] = eva_scope(eva, facts, "/work/shared/data/bach-dev")
    assert EVA_TEST_IMAGES == 132
    assert evaluation_line("test", facts, METRICS) == (
        "test (eva's split, bach-dev's part: 66 of eva's 132 test images; trained on 108 + 25 "
        "val): balanced accuracy 0.604, accuracy 0.571"
    )
    # the other sides are no part of eva's reported images: the protocol and their count
    assert evaluation_line("val", facts, METRICS).startswith(
        f"val ({facts['protocol']}: 25 images, the images that chose its checkpoint; trained"
    )
    whole = {"n_images": {"train": 268 - 53, "val": 53, "test": 132}}
    assert eva_scope(eva, whole, "/data/BACH") == "eva's 132 test images"
    assert eva_scope(SimpleNamespace(split=[0.6, 0.2, 0.2]), whole, "/data/BACH") is None


def test_the_protocol_of_the_summary_says_the_part() -> None:
    split = {"name": "eva-x", "text": "eva's ...: 108 train / 25 val / 66 test images"}
    report = SimpleNamespace(metrics={**METRICS, "split": split})
    assert summary_metrics(report, "eval")["eval/protocol"] == f"eva-x: {split['text']}"
    split["scope"] = "bach-dev's part: 66 of eva's 132 test images"
    assert summary_metrics(report, "eval")["eval/protocol"] == (
        f"eva-x: {split['text']}; test: bach-dev's part: 66 of eva's 132 test images"
    )
