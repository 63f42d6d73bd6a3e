"""experiments/bench_features.py runs end to end on tiny settings and prints its table."""

import importlib.util

import pytest
import torch

from conftest import ROOT


def test_bench_features_prints_ratios_against_the_first_encoder(
    capsys: pytest.CaptureFixture,
) -> None:
    spec = importlib.util.spec_from_file_location(
        "bench_features", ROOT / "experiments" / "bench_features.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(
            [
                "--models",
                "mobilenet_v2",
                "vit_tiny_patch16_224",
                "kaiko_vits16",
                "--tiles",
                "2",
                "--chunk",
                "2",
                "--threads",
                "1",
                "--gpu",
                "--gpu-models",
                "mobilenet_v2",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "tiles/s" not in line]
    cpu = [r for r in rows if "---" not in r][:3]
    assert [r.split(" | ")[0] for r in cpu] == [
        "| mobilenet_v2",
        "| vit_tiny_patch16_224",
        "| kaiko_vits16",
    ]
    assert cpu[0].endswith("| 1.000x |") and "| 5.5 M |" in cpu[1] and "| 21.7 M |" in cpu[2]
    if not torch.cuda.is_available():
        assert "no CUDA device: the GPU rows (bf16, compile) are skipped" in out
