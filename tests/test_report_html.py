"""index.html opens from disk in a real browser, with every figure decoded."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from breastnet.reporting import write_report

from conftest import synthetic_results


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    results, store = synthetic_results()
    report = write_report(tmp_path / "report", results, patches=store.__getitem__)
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--dump-dom", report.html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    loaded = re.search(r'<body[^>]*data-images-loaded="(\d+)"', dom)
    assert loaded is not None, "the page script did not run"
    assert int(loaded.group(1)) == len(report.figures) == 8
    assert f"{report.metrics['image_accuracy']:.3f}" in dom and "Misclassified images" in dom
