"""Stage 8, nf4: the 4-bit (NF4, QLoRA's format) base against the QLoRA path users run, in two commands.
(1) benchmarks/nf4_lora_linear.py at the 70B layer shapes (q, gate, down; 4,096 tokens; r 16 and 64): ours (NF4
decoded inside the Triton GEMMs, LoRA fused) vs PEFT's LoRA on a bitsandbytes Linear4bit, bnb.matmul_4bit + eager
LoRA and bf16, forward + backward, CUDA-event medians, error vs float64; goal ours >= 1.3x PEFT + bitsandbytes.
(2) benchmarks/train_throughput.py --shape 8b --methods ours_nf4,hf_qlora on one GPU, 3 steps (random weights):
llama-ft packed on an NF4 base vs HF Trainer + PEFT on a bitsandbytes NF4 base: trained tokens/s, step time,
peak memory. Last in the order (it was added after the others' budgets were set): it runs on what the budget
leaves, the kernels first; rerun alone with `--stages nf4`. Dry run: --smoke (tiny q_proj) with
TRITON_INTERPRET=1, then the tiny shape, one CPU rank, both methods (this dry run is the CI rehearsal of the pair:
tests/test_gpu_proof.py)."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..runner import HERE, GiB, Proof, Stage, finite, shown
from .training import method_figures, run_training

KERNELS_GPU = ["--models", "70b", "--layers", "q,gate,down", "--tokens", "4096", "--ranks", "16,64", "--warmup", "3",
               "--iters", "10", "--err-rows", "1024"]
KERNELS_DRY = ["--smoke", "--layers", "q", "--warmup", "0", "--iters", "1"]
TRAINING_GPU = ["--shape", "8b", "--methods", "ours_nf4,hf_qlora", "--nproc", "1", "--steps", "3", "--warmup", "1"]
TRAINING_DRY = ["--smoke", "--methods", "ours_nf4,hf_qlora", "--nproc", "1", "--steps", "2", "--warmup", "1"]
KERNELS_SHARE = 0.4  # of the stage's limit: the kernels' command; training gets what that leaves


def _kernels(p: Proof, limit: float) -> dict[str, Any]:
    out = p.scratch / "nf4_lora_linear.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "nf4_lora_linear.py"), *(KERNELS_DRY if p.dry else KERNELS_GPU),
           "--json", str(out)]
    ran = p.run(cmd, limit, "nf4-kernels")
    result: dict[str, Any] = {"command": ("TRITON_INTERPRET=1 " if p.dry else "") + shown(cmd)}
    if ran.rc != 0 or not out.exists():
        return {**result, "status": "timeout" if ran.rc == 124 else "failed", "reason": ran.why(limit)}
    report = json.loads(out.read_text())
    unmeasured = [f"{r['model']} {r['layer']} r={r['r']} {m}: {r['results'][m]['unavailable']}"
                  for r in report["rows"] for m in ("ours_nf4", "peft_qlora") if "ms" not in r["results"][m]]
    models = report["summary"]
    summary = "; ".join(
        f"{m}: ours {v['ours_vs_peft_qlora'] or float('nan'):.2f}x PEFT + bitsandbytes (geomean, goal >= 1.3x), "
        f"worst rel err ours {v['worst_rel_err']['ours_nf4'] or float('nan'):.1e}" for m, v in models.items())
    result.update(models=models, rows=report["rows"], header=report["header"], table_md=ran.stdout.strip(),
                  summary=summary, status="failed" if unmeasured else "ok")
    if unmeasured:
        result["reason"] = f"not measured: {unmeasured[0]}"
    return result


def _training(p: Proof, limit: float) -> dict[str, Any]:
    result, report, ran = run_training(p, limit, "nf4-training", TRAINING_DRY if p.dry else TRAINING_GPU)
    out: dict[str, Any] = {"command": result["commands"][0]}
    if report is None:
        return {**out, "status": "timeout" if ran.rc == 124 else "failed", "reason": ran.why(limit)}
    asked = report["config"]["methods"]
    methods = {m: method_figures(p, report["methods"][m]) for m in asked
               if "trained_tokens_per_s" in report["methods"][m]}
    ratio = report["ratios"].get("ours_nf4_vs_hf_qlora")
    summary = "; ".join(f"{report['method_labels'][m]} {f['trained_tokens_per_s']:,.0f} trained tok/s, "
                        f"{f['step_time_s']:.2f} s/step, {f['peak_memory_bytes'] / GiB:.1f} GiB"
                        for m, f in methods.items())
    if finite(ratio):
        summary += f"; ours/QLoRA {ratio:.2f}x"
    out.update(methods=methods, ratio_ours_nf4_vs_hf_qlora=ratio, config=report["config"], table_md=ran.stdout.strip(),
               summary=summary)
    missing = [f"{m}: {report['methods'][m].get('failed') or report['methods'][m].get('unavailable')}"
               for m in asked if m not in methods]
    return {**out, "status": "failed", "reason": "; ".join(missing)[:500]} if missing else {**out, "status": "ok"}


def stage_nf4(p: Proof, limit: float) -> dict[str, Any]:
    import time

    t0 = time.monotonic()
    kernels = _kernels(p, KERNELS_SHARE * limit)
    training = _training(p, limit - (time.monotonic() - t0))
    parts = {"kernels": kernels, "training": training}
    bad = [f"{k}: {v['status']} ({v.get('reason', '')})" for k, v in parts.items() if v["status"] != "ok"]
    result: dict[str, Any] = {
        "commands": [kernels["command"], training["command"]],
        "results": {k: {key: val for key, val in v.items() if key not in ("command", "table_md")}
                    for k, v in parts.items()},
        "summary": " | ".join(v["summary"] for v in parts.values() if v.get("summary")),
        "table_md": "\n\n".join(v["table_md"] for v in parts.values() if v.get("table_md")),
    }
    if bad:
        timed_out = all(v["status"] == "timeout" for v in parts.values() if v["status"] != "ok")
        return {**result, "status": "timeout" if timed_out else "failed", "reason": "; ".join(bad)[:600]}
    return {**result, "status": "ok"}


STAGE = Stage("nf4", "4-bit (NF4) base vs PEFT + bitsandbytes QLoRA", stage_nf4, 170, 150, 45)
