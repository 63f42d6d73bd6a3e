"""A report records where its numbers came from: experiment, config, checkpoints, code."""

import hashlib
import json
import re
import subprocess
import sys
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

import breastnet
from breastnet.inference.models import used_checkpoints
from breastnet.provenance import config_yaml, git_state, resolved
from breastnet.stages.common import publish_report

from conftest import ROOT, compose_config, synthetic_results


def test_publish_report_records_provenance(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=demo", "logger=none")
    checkpoint = tmp_path / "image" / "best.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    results, store = synthetic_results(n=4)
    out = tmp_path / "report"
    report, _ = publish_report(
        cfg, out, results, store.__getitem__, "t", 0.05, "eval", tmp_path / "parts",
        checkpoints=[tmp_path / "patch" / "best.ckpt", checkpoint],  # no patch model: skipped
    )  # fmt: skip

    facts = json.loads((out / "provenance.json").read_text())
    assert facts == json.loads((out / "metrics.json").read_text())["provenance"]
    assert facts["experiment"] == "demo" and facts["tags"] == ["demo"]
    assert facts["checkpoints"] == [
        {
            "path": str(checkpoint),
            "sha256": hashlib.sha256(b"weights").hexdigest()[:12],
            "modified": facts["checkpoints"][0]["modified"],
        }
    ]
    for stamp in (facts["created"], facts["checkpoints"][0]["modified"]):
        assert datetime.fromisoformat(stamp).utcoffset().total_seconds() == 0
    assert facts["command"] == sys.argv and facts["version"] == version("breastnet")
    assert facts["config"] == "config.yaml"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == OmegaConf.to_container(cfg, resolve=True)
    assert saved["paths"]["work_dir"] == str(tmp_path / "work")

    page = report.html.read_text()
    assert "<h2>Provenance</h2>" in page and '<a href="config.yaml">' in page
    assert facts["checkpoints"][0]["sha256"] in page


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_commit_is_this_checkout() -> None:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    state = git_state()
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and state["commit"] == head
    assert isinstance(state["dirty"], bool)


def test_no_git_gives_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(breastnet, "__file__", str(tmp_path / "breastnet" / "__init__.py"))
    (tmp_path / "breastnet").mkdir()
    assert git_state() == {"commit": None, "dirty": None}  # not a checkout
    monkeypatch.setattr(breastnet, "__file__", str(ROOT / "breastnet" / "__init__.py"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert git_state() == {"commit": None, "dirty": None}  # no git


def test_unresolvable_values_stay_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BREASTNET_UNSET", raising=False)
    cfg = OmegaConf.create(
        {"a": 1, "b": "${a}", "c": {"d": "${oc.env:BREASTNET_UNSET}", "e": ["${a}", "???"]}}
    )
    expected = {"a": 1, "b": 1, "c": {"d": "${oc.env:BREASTNET_UNSET}", "e": [1, "???"]}}
    assert resolved(cfg) == expected
    assert yaml.safe_load(config_yaml(cfg)) == expected


def test_end_to_end_models_have_no_separate_patch_checkpoint(tmp_path: Path) -> None:
    lineage = SimpleNamespace(patch=tmp_path / "patch", image=tmp_path / "image", frozen=False)
    on_features = used_checkpoints(lineage, SimpleNamespace(backbone=None))
    assert on_features == [tmp_path / "patch" / "best.ckpt", tmp_path / "image" / "best.ckpt"]
    end_to_end = used_checkpoints(lineage, SimpleNamespace(backbone=object()))
    assert end_to_end == [tmp_path / "image" / "best.ckpt"]
