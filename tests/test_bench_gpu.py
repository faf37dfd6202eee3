"""bench/gpu.sh, the GPU rows' one-call benchmark, cannot run here (no GPU): its --smoke path runs the same chain
(our MLM and classification steps, transformers' PyTorch ones, MFU, the marked RESULTS.md section) at tiny shapes
on the CPU, and the GPU-only formatting is checked on a recorded-shape payload."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import GPU_BEGIN, GPU_END, gpu_section, with_gpu_section

ROOT = Path(__file__).parents[1]


def test_smoke_run_replaces_only_its_section(tmp_path):
    pytest.importorskip("torch")
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Benchmark results\n\nCPU rows stay.\n\n{GPU_BEGIN}\nold GPU rows\n{GPU_END}\n\nAfter.\n")
    out = subprocess.run(
        ["bash", "bench/gpu.sh", "--smoke", "--results", str(results), "--json", str(tmp_path / "gpu.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nCPU rows stay.") and text.rstrip().endswith("After.")
    assert "old GPU rows" not in text and text.count(GPU_BEGIN) == 1 and text.count(GPU_END) == 1
    for row in (
        "| MLM: ours |",
        "| MLM: transformers (PyTorch eager) |",
        "| classification: ours |",
        "| classification: transformers (PyTorch eager) |",
        ">= 2x PyTorch eager tokens/s",
    ):
        assert row in gpu_section(text)
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert payload["args"]["smoke"] and len(payload["seconds"]) == 4 and payload["matmul_peak_flops"] > 0


def test_gpu_payload_formats_mfu_goals_and_lever_rows():
    from bench.gpu import datasheet_peak, section

    names = [
        "MLM: ours",
        "MLM: ours, XLA attention (lever)",
        "MLM: ours, attention dropout 0.1 (lever)",
        "MLM: transformers (PyTorch eager)",
        "classification: ours",
        "classification: transformers (PyTorch eager)",
    ]
    seconds = dict(zip(names, [0.020, 0.030, 0.035, 0.050, 0.018, 0.045]))
    payload = {
        "args": {"model": "roberta-base", "batch": 32, "seq": 512, "steps": 10, "repeats": 5, "smoke": False},
        "machine": {"device": "NVIDIA H200", "backend": "gpu", "cores": 16, "jax": "0.10.2", "torch": "2.15.0"},
        "date": "2026-12-01",
        "model": {"dtype": "bfloat16", "attention_impl": "cudnn"},
        "seconds": seconds,
        "flops": {"MLM": 9.9e12, "classification": 9.3e12},
        "matmul_peak_flops": 7.9e14,
        "datasheet_peak_flops": datasheet_peak("NVIDIA H200"),
    }
    text = section(payload)
    assert text.startswith(GPU_BEGIN) and text.endswith(GPU_END) and "attention cudnn" in text
    assert "| bf16 MFU >= 50% (datasheet peak) | 50.0% | 52.2% |" in text  # 9.9e12 / 0.020 s / 989.4e12
    assert "| >= 2x PyTorch eager tokens/s | 2.50x | 2.50x |" in text
    assert "| MLM: ours, XLA attention (lever) | 30.0 | 546,133 | 1.50x |" in text
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12 and datasheet_peak("Tesla T4") is None


def test_results_section_is_replaced_or_appended():
    section = f"{GPU_BEGIN}\nnew\n{GPU_END}"
    assert with_gpu_section("# R\n", section) == f"# R\n\n{section}\n"
    again = with_gpu_section(with_gpu_section("# R\n", f"{GPU_BEGIN}\nold\n{GPU_END}"), section)
    assert again == f"# R\n\n{section}\n" and gpu_section(again) == section and gpu_section("# R\n") == ""


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)
