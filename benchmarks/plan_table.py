"""The table of `llama-ft plan` verdicts (docs/memory.md) for Llama 3.1 8B/70B/405B on common machines (no runs: the
planner's arithmetic only, well under a second).

    python benchmarks/plan_table.py            # markdown on stdout

Settings (docs/memory.md states them): LoRA r=64 on all seven linears, packed rows of 4096 tokens, one row per
micro-batch, gradient checkpointing, sdpa, bf16 training, ds_configs/zero3.json, GPU memory as nvidia-smi
reports it (H100 80GB: 81559 MiB, H200: 143771 MiB); host memory is not checked, the column says what a node
needs at the offload ratio shown.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama_ft.plan.command import make_plan  # noqa: E402

GiB = 2**30
MACHINES = {"1 x 8 H100 80GB": (1, 8, 81559 / 1024), "2 x 8 H100 80GB": (2, 8, 81559 / 1024),
            "1 H200 141GB": (1, 1, 143771 / 1024)}
MODELS = [("8b", False), ("70b", False), ("70b", True), ("405b", False), ("405b", True)]
FLAGS = ["--lora_r", "64", "--packing", "--max_seq_len", "4096", "--per_device_train_batch_size", "1",
         "--gradient_checkpointing"]


def row(model: str, fp8: bool, machine: str) -> str:
    nodes, gpus, gb = MACHINES[machine]
    argv = [model, "--nodes", str(nodes), "--gpus_per_node", str(gpus), "--gpu_memory_gb", f"{gb:.2f}", *FLAGS,
            *(["--quantize"] if fp8 else [])]
    at_zero, _ = make_plan(argv)
    p, _ = make_plan([*argv, "--offload_ratio", "auto"])
    base = "FP8" if fp8 else "bf16"
    best = p["min_offload_ratio"]
    if best is None:
        bad = p["cannot_fit"]
        return (f"| {model.upper()} | {base} | {machine} | {at_zero['per_gpu']['total_bytes'] / GiB:.1f} | no | "
                f"does not fit at any ratio ({bad['term'].removesuffix('_bytes')} "
                f"{bad['term_bytes'] / GiB:.1f} GiB; {bad['total_bytes'] / GiB:.1f} GiB per GPU at 1.0) | - | - |")
    return (f"| {model.upper()} | {base} | {machine} | {at_zero['per_gpu']['total_bytes'] / GiB:.1f} | "
            f"{'yes' if at_zero['fits'] else 'no'} | {best:.2f} ({p['per_gpu']['total_bytes'] / GiB:.1f} GiB) | "
            f"{p['per_host']['total_bytes'] / GiB:.0f} | {p['step_time_lower_bound_s']:.2f} |")


def main() -> int:
    print("| model | base weights | machine | GiB per GPU, no offload | fits | smallest --offload_ratio (GiB per GPU "
          "then) | GiB per host then | PCIe s/step at least |")
    print("|---|---|---|---:|---|---|---:|---:|")
    for model, fp8 in MODELS:
        for machine in MACHINES:
            print(row(model, fp8, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
