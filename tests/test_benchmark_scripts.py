"""The benchmark scripts run: a --smoke pass of benchmarks/fp8_lora_linear.py on the PyTorch reference path,
and its refusal (exit 2, one line) to run the real benchmark without a CUDA GPU. Times are not checked here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from proc import run_job

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "fp8_lora_linear.py"
METHODS = {"weight_only", "fp8_compute", "bf16_lora", "deepspeed_fp8"}


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the reference path: fast on CPU
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_fp8_lora_linear_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert set(report["methods"]) == METHODS and report["baseline"] == "bf16_lora"
    for key in ("device", "torch", "triton", "deepspeed", "date", "timing", "command"):
        assert report["header"][key], key
    rows = report["rows"]
    assert [(r["layer"], r["N"], r["K"]) for r in rows] == [("q_proj", 256, 256), ("gate_proj", 512, 256),
                                                             ("down_proj", 256, 512)]
    for row in rows:
        m, n, k, r = row["M"], row["N"], row["K"], row["r"]
        assert row["flop"] == 4 * m * n * k + 6 * m * r * (n + k)
        assert set(row["results"]) == METHODS
        for name, res in row["results"].items():
            if "unavailable" in res:
                assert isinstance(res["unavailable"], str) and res["unavailable"], (name, res)
                continue
            assert res["ms"] > 0 and math.isfinite(res["ms"]), (name, res)
            assert res["tflops"] == pytest.approx(row["flop"] / (res["ms"] * 1e-3) / 1e12)
            base = row["results"]["bf16_lora"]["ms"]
            assert res["speedup_vs_bf16_lora"] == pytest.approx(base / res["ms"])
        # ours and the baseline always run (the reference path on CPU); DeepSpeed's FP8 op has no CPU backend
        for name in ("weight_only", "fp8_compute", "bf16_lora"):
            assert "ms" in row["results"][name], (name, row["results"][name])
        if not torch.cuda.is_available():
            assert row["results"]["deepspeed_fp8"]["unavailable"]
        assert 0 < row["rel_err_weight_only"] <= 1e-2
        assert 0 < row["rel_err_fp8_compute"] <= 5e-2

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and "DeepSpeed OptimizedLinear FP8" in table[0]
    assert report["header"]["torch"] in proc.stdout.splitlines()[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA GPU")
def test_fp8_lora_linear_needs_cuda():
    proc = _run("--models", "70b")
    assert proc.returncode == 2
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert "needs a CUDA GPU" in last and "--smoke" in last
    assert sum("CUDA GPU" in line for line in proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_load_benchmark_smoke(tmp_path):
    """benchmarks/load.py on the tiny shape: both loaders run on 2 ranks and the byte counts show
    what each does (ours: each rank about half, once in all; HF: rank 0 reads it all)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llama-ft" / "torch_extensions"))
    out = tmp_path / "load.json"
    proc = run_job([sys.executable, str(REPO / "benchmarks" / "load.py"), "--shape", "tiny", "--dir", str(tmp_path),
                    "--json", str(out)], timeout=600, cwd=REPO, env=env)  # kills torchrun's ranks too on a timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| stream | all |" in proc.stdout and "| hf | all |" in proc.stdout
    report = json.loads(out.read_text())
    ckpt = report["checkpoint_bytes"]
    rows = {(r["loader"], r["rank"]): r for r in report["rows"]}
    stream = [rows[("stream", r)]["bytes_read"] for r in (0, 1)]
    assert sum(stream) <= 1.05 * ckpt and all(0.4 * ckpt <= b <= 0.6 * ckpt for b in stream)
    assert rows[("hf", 0)]["bytes_read"] >= 0.99 * ckpt  # transformers 5: rank 0 reads every tensor
    for r in report["rows"]:
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 0 and r["partition_bytes"] > 0
