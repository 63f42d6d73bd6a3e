"""index.html: self-contained and escaped, and it opens from disk in a real browser."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from breastnet.report import write_report

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
    assert int(loaded.group(1)) == len(report.figures) == 9  # no 4-class ROC: 3 images a class
    assert {"confusion_2class", "roc_2class"} <= set(report.figures)
    assert f"{report.metrics['image_accuracy']:.3f}" in dom and "Misclassified images" in dom


def test_html_is_self_contained(report) -> None:
    rep, _ = report
    page = rep.html.read_text()
    accuracy = f"{rep.metrics['image_accuracy']:.3f}"
    assert f'<td class="num">{accuracy}</td>' in page
    low, high = rep.metrics["image_accuracy_ci"]
    assert f'<td class="num">{low:.3f}\u2013{high:.3f}</td>' in page and "95 % CI" in page
    assert "Benign/broken" in page and "unreadable: truncated TIFF" in page
    assert page.count("data:image/png;base64,") == len(rep.figures)
    assert len(re.findall(r"<img ", page)) == len(rep.figures)
    assert 'src="http' not in page and 'href="http' not in page and "<link" not in page
    assert "imagesLoaded" in page


def test_html_escapes_text(tmp_path: Path) -> None:
    results, _ = synthetic_results(n=4)
    results[-1].error = "<script>alert(1)</script>"
    page = write_report(tmp_path, results).html.read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page
