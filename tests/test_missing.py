"""A missing artifact's message: the nearest artifact of other settings first, with the
override that reaches it, a few others after it, and never a setting that keys nothing."""

from pathlib import Path

from breastnet.artifacts import write_text
from breastnet.missing import other_keys
from breastnet.provenance import config_yaml

from conftest import compose_config


def _made(tmp_path: Path, key: str, *overrides: str) -> None:
    """An image model of these settings in tmp_path's work dir, as the image stage leaves
    its config."""
    cfg = compose_config(tmp_path, "experiment=demo", *overrides)
    write_text(tmp_path / "work" / "image" / key / "config.yaml", config_yaml(cfg))


def test_the_first_line_gives_the_override_to_the_nearest_model(tmp_path: Path) -> None:
    # placement and logging differ too, and key nothing: still one setting away
    _made(tmp_path, "near", "data.split=eva", "trainer.default_root_dir=/elsewhere")
    _made(tmp_path, "second", "data.split=eva", "image.max_epochs=7")
    _made(tmp_path, "third", "data.split=eva", "image.max_epochs=7", "image.batch_size=4")
    _made(tmp_path, "far", "experiment=bach_cpu")
    _made(tmp_path, "placed", "trainer=ddp_cpu", "logger=wandb", "data.split=eva")
    cfg = compose_config(tmp_path, "experiment=demo")
    work = tmp_path / "work" / "image"
    message = other_keys(cfg, "image", work / "missing")
    lines = message.splitlines()
    assert lines[0] == f"; the nearest, {work / 'near'} (1 setting away): add data.split=eva"
    assert lines[1] == "  also placed: 1 away (data.split=eva)"  # ddp and wandb key nothing
    assert lines[2] == "  also second: 2 away (data.split=eva, image.max_epochs=7)"
    assert lines[3:] == [f"  and 2 farther in {work}"]
    for unkeyed in ("default_root_dir", "devices", "strategy", "logger", "wandb"):
        assert unkeyed not in message


def test_a_setting_this_run_added_is_dropped_to_reach_the_nearest(tmp_path: Path) -> None:
    _made(tmp_path, "plain")
    cfg = compose_config(tmp_path, "experiment=demo", "+trainer.limit_train_batches=2")
    message = other_keys(cfg, "image", tmp_path / "work" / "image" / "missing")
    assert message.splitlines()[0].endswith(
        "(1 setting away): drop trainer.limit_train_batches (or add ~trainer.limit_train_batches)"
    )
    cfg = compose_config(tmp_path, "experiment=demo")
    assert other_keys(cfg, "image", tmp_path / "work" / "image" / "plain") == ""
