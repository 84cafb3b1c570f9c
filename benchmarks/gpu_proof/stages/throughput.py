"""Stage 5, throughput: benchmarks/train_throughput.py --shape 8b (random weights) on one GPU: llama-ft packed
bf16, llama-ft packed FP8, HF Trainer + PEFT + ZeRO-3: trained and all tokens/s, model TFLOP/s, MFU (against
the device's dense bf16 peak), peak torch.cuda.max_memory_allocated. Dry run: the tiny shape, one CPU rank,
3 steps, HF only (llama-ft's run: the capacity stage)."""

from __future__ import annotations

from typing import Any

from ..runner import GiB, Proof, Stage
from .training import method_figures, run_training

THROUGHPUT_GPU = ["--shape", "8b", "--methods", "ours_packed,ours_fp8,hf", "--nproc", "1", "--steps", "8",
                  "--warmup", "3"]
# The dry run (a CI test) trains only the HF peer here: each training run costs about 20 CPU seconds of process
# start-up on 2 cores, and llama-ft's FP8 run, the same path as its bf16 one with --quantize, is rehearsed by
# the capacity stage.
THROUGHPUT_DRY = ["--smoke", "--methods", "hf", "--nproc", "1", "--steps", "3", "--warmup", "1"]


def stage_throughput(p: Proof, limit: float) -> dict[str, Any]:
    result, report, ran = run_training(p, limit, "throughput", THROUGHPUT_DRY if p.dry else THROUGHPUT_GPU)
    if report is None:
        return {**result, "status": "timeout" if ran.rc == 124 else "failed", "reason": ran.why(limit)}
    asked = report["config"]["methods"]
    methods = {m: method_figures(p, report["methods"][m]) for m in asked
               if "trained_tokens_per_s" in report["methods"][m]}
    r = report["ratios"]
    c = report["config"]
    summary = f"shape {c['shape']}, {c['dtype']}, {c['nproc']} rank(s): " + "; ".join(
        f"{report['method_labels'][m]} {f['trained_tokens_per_s']:,.0f} trained tok/s"
        + (f", MFU {100 * f['mfu']:.1f}%" if f["mfu"] is not None else f", {f['model_tflops_per_s']:.3g} TFLOP/s")
        + f", {f['peak_memory_bytes'] / GiB:.1f} GiB" for m, f in methods.items())
    if r.get("ours_packed_vs_hf") is not None:
        summary += f"; ours/HF {r['ours_packed_vs_hf']:.2f}x bf16, {r['ours_fp8_vs_hf'] or float('nan'):.2f}x FP8"
    result.update(results={"methods": methods, "ratios": r, "config": report["config"], "header": report["header"],
                           "goal_ours_vs_hf_1_5x": None if r.get("ours_packed_vs_hf") is None
                           else r["ours_packed_vs_hf"] >= 1.5},
                  table_md=ran.stdout.strip(), summary=summary)
    missing = [f"{m}: {report['methods'][m].get('failed') or report['methods'][m].get('unavailable')}"
               for m in asked if m not in methods]
    if missing:
        return {**result, "status": "failed", "reason": "; ".join(missing)[:500]}
    return {**result, "status": "ok"}


STAGE = Stage("throughput", "training throughput, 8B shape, one GPU", stage_throughput, 200, 200, 60)
