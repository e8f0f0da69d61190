"""The device check script runs end to end on a CPU at tiny sizes (--smoke), so that a
machine with a GPU only has to run it."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gpu_check


def test_gpu_check_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    for section in ("gpu_tests", "fidelity_fp32", "bf16_agreement", "throughput"):
        assert "error" not in results[section] and "skipped" not in results[section], section
    assert results["gpu_tests"]["passed"]
    assert results["fidelity_fp32"]["all_equal"]
    for shape in ("qwen3-0.6b", "llama-3.2-1b"):
        assert results["bf16_agreement"][f"{shape}/bfloat16"]["logits_cosine"] > 0.99
        assert results["bf16_agreement"][f"{shape}/float32"]["top1_agreement"] == 1.0
    throughput = results["throughput"]
    for label in ("transformers_static_cache", "molink_cuda_graphs", "molink_eager"):
        assert throughput[label]["2"]["tokens_per_s"] > 0
        assert throughput[label]["batch1_decode_ms_per_token"] > 0


def test_sections_can_be_chosen(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    argv = ["--smoke", "--device", "cpu", "--out", str(out), "--sections", "fidelity_fp32"]
    assert gpu_check.main(argv) == 0
    results = json.loads(out.read_text())
    assert "fidelity_fp32" in results and "gpu_tests" not in results and "throughput" not in results
    assert all(row["differences"] == [] for row in results["fidelity_fp32"]["per_arch"].values())
