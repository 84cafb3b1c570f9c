"""What the throughput and capacity stages share: a training run of benchmarks/train_throughput.py under the
proof's runner, and the figures of one measured method (with MFU where the device's dense bf16 peak is
known). Not a stage itself."""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

from ..runner import HERE, Proof, Ran, shown

# Dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity), for MFU; matched against the device
# name in this order. A device not listed gets no MFU (model TFLOP/s are still reported).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0))


def peak_bf16_tflops(device: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS:
        if name in device:
            return peak
    return None


def run_training(p: Proof, limit: float, name: str, flags: list[str]) -> tuple[dict[str, Any], dict | None, Ran]:
    out, work = p.scratch / f"{name}.json", p.scratch / name
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "train_throughput.py"), *flags, "--timeout", f"{limit:.0f}", "--dir",
           str(work), "--json", str(out)]
    ran = p.run(cmd, limit, name)
    # The checkpoints the runs end with (optimizer states: 10 GiB at the 70B shape) are not needed: free the disk
    # for the load stage's checkpoint. Logs and metrics stay.
    for ckpt in work.glob("runs/*/output/checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"commands": [shown(cmd)]}, (json.loads(out.read_text()) if out.exists() else None), ran


def method_figures(p: Proof, res: dict[str, Any]) -> dict[str, Any]:
    """The figures of one measured method, with MFU where the device's peak is known."""
    peak = peak_bf16_tflops(p.report["header"].get("gpu_name", ""))
    return {"trained_tokens_per_s": res["trained_tokens_per_s"], "tokens_per_s": res["tokens_per_s"],
            "step_time_s": res["step_time_s"], "model_tflops_per_s": res["model_tflops_per_s"],
            "mfu": res["model_tflops_per_s"] / peak if peak else None, "peak_bf16_tflops": peak,
            "peak_memory_bytes": res["peak_memory_bytes"], "peak_memory_kind": res["peak_memory_kind"]}
