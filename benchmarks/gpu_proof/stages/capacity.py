"""Stage 6, capacity: a 70B-shape FP8 LoRA run (r 64, one packed row of 2,048 tokens, gradient checkpointing,
--offload_ratio auto) for 4 steps on one GPU, beside `llama-ft plan --json` for the very same flags:
predicted vs measured peak memory (max_memory_allocated against the plan's total less its CUDA context and
fragmentation margin; max_memory_reserved against the total less the context), the offload ratio auto chose,
step time. Dry run: the tiny shape, one CPU rank, peak RSS against the CPU-rank plan."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from typing import Any

import train_throughput

from ..runner import REPO, GiB, Proof, Stage, shown
from .training import method_figures, run_training

CAPACITY_GPU = ["--shape", "70b", "--methods", "ours_fp8", "--nproc", "1", "--batch", "1", "--seq", "2048",
                "--lora-r", "64", "--gradient-checkpointing", "--offload-ratio", "auto", "--steps", "4",
                "--warmup", "2"]
CAPACITY_DRY = ["--smoke", "--methods", "ours_fp8", "--nproc", "1", "--batch", "1", "--seq", "256",
                "--gradient-checkpointing", "--offload-ratio", "auto", "--steps", "3", "--warmup", "1"]


def capacity_flags(p: Proof) -> tuple[argparse.Namespace, list[str]]:
    """The capacity run's arguments as train_throughput parses them, and the training flags of its run: the
    planner is asked about exactly these."""
    try:
        args = train_throughput.parse_args(CAPACITY_DRY if p.dry else CAPACITY_GPU)
    except SystemExit as e:  # its one-line refusal is on stderr already
        raise RuntimeError(f"train_throughput.py refused the capacity flags (exit {e.code})") from None
    args.bf16 = not p.dry  # what train_throughput's device_setup decides: bf16 on a GPU, fp32 on CPU
    return args, train_throughput.ours_flags(args, "ours_fp8")


def stage_capacity(p: Proof, limit: float) -> dict[str, Any]:
    args, flags = capacity_flags(p)
    result, report, ran = run_training(p, max(10.0, limit - 15), "capacity", CAPACITY_DRY if p.dry else CAPACITY_GPU)
    info = p.env_info
    model_dir = p.scratch / "capacity" / f"model-{args.shape}"
    model = str(model_dir) if (model_dir / "config.json").exists() else args.shape
    # the machine as the run's own `--offload_ratio auto` sees it (llama_ft/train/memory_plan.py this_machine)
    machine = ["--host_memory_gb", f"{info.get('host_memory_bytes', 0) / GiB:.4f}"] + (
        ["--device", "cpu"] if p.dry else ["--gpu_memory_gb", f"{info.get('gpu_memory_bytes', 0) / GiB:.4f}"])
    plan_cmd = [sys.executable, "-m", "llama_ft.cli", "plan", model, "--json", "--nodes", "1", "--gpus_per_node",
                "1", *machine, "--", *flags, "--deepspeed", str(REPO / "ds_configs" / "zero3.json")]
    result["commands"].append(shown(plan_cmd))
    planned = p.run(plan_cmd, 60, "capacity-plan")
    plan = None
    with contextlib.suppress(ValueError):
        plan = json.loads(planned.stdout) if planned.rc in (0, 1) else None  # 1: "does not fit", still a plan
    res: dict[str, Any] = {"shape": args.shape, "train_flags": flags}
    if plan is not None:
        from llama_ft.train.memory_plan import planned_peak_bytes  # torch: after stage 1's wheels

        per = plan["per_gpu"]
        # max_memory_allocated against the plan less the CUDA context and the fragmentation margin
        # (llama_ft/train/memory_plan.py planned_peak_bytes), max_memory_reserved against the total less the
        # context. A CPU rank's RSS holds it all.
        context = per.get("cuda_context_bytes", 0)
        predicted = planned_peak_bytes(per, "cpu" if p.dry else "cuda")
        res.update(predicted_bytes=predicted, predicted_reserved_bytes=per["total_bytes"] - context,
                   predicted_total_bytes=per["total_bytes"], plan_fits=plan["fits"],
                   plan_min_offload_ratio=plan["min_offload_ratio"], plan_peak_at=plan["peak_at"],
                   plan_dominant_term=plan["dominant_term"], plan_per_gpu=per)
    else:
        res["plan_error"] = planned.why(60)
    measured = report["methods"].get("ours_fp8", {}) if report else {}
    if "trained_tokens_per_s" in measured:
        res.update(measured_bytes=measured["peak_memory_bytes"], measured_kind=measured["peak_memory_kind"],
                   run=method_figures(p, measured), flags_match=measured["train_flags"] == flags)
        reserved = [b for b in measured.get("cuda_max_reserved_bytes_per_rank", []) if b]
        if reserved:
            res["measured_reserved_bytes"] = max(reserved)
        log = p.scratch / "capacity" / "runs" / "ours_fp8" / "log.txt"
        used = re.search(r"--offload_ratio auto: ([0-9.]+)", log.read_text(errors="replace")) if log.exists() else None
        res["offload_ratio_used"] = float(used.group(1)) if used else None
    if "predicted_bytes" in res and "measured_bytes" in res:
        res["error"] = (res["predicted_bytes"] - res["measured_bytes"]) / res["measured_bytes"]
        res["goal"] = 0.15 if p.dry else 0.10  # DESIGN.md: within 10% on GPU, 15% on CPU
        res["within_goal"] = abs(res["error"]) <= res["goal"]
        if "measured_reserved_bytes" in res:
            res["error_reserved"] = ((res["predicted_reserved_bytes"] - res["measured_reserved_bytes"])
                                     / res["measured_reserved_bytes"])
    result["results"] = res
    if report is not None:
        result["table_md"] = ran.stdout.strip()
    what = "peak RSS" if p.dry else "max_memory_allocated"
    if "measured_bytes" in res:
        result["summary"] = (f"{args.shape} FP8, {what} {res['measured_bytes'] / GiB:.2f} GiB"
                             + (f" vs planner {res['predicted_bytes'] / GiB:.2f} GiB ({100 * res['error']:+.1f}%)"
                                if "error" in res else "")
                             + f", offload ratio {res.get('offload_ratio_used')}, "
                             f"step {res['run']['step_time_s']:.2f} s")
    if ran.rc == 124:
        return {**result, "status": "timeout", "reason": ran.why(limit)}
    if "measured_bytes" not in res:
        why = measured.get("failed") if report else ran.why(limit)
        return {**result, "status": "failed", "reason": f"the 70B-shape run: {why or 'no figures'}"}
    if plan is None:
        return {**result, "status": "failed", "reason": f"llama-ft plan: {res['plan_error']}"}
    if not res["flags_match"]:  # then the prediction would be for another run than the one measured
        return {**result, "status": "failed", "reason": f"the run's training flags {measured['train_flags']} "
                                                        f"differ from those the planner was given {flags}"}
    return {**result, "status": "ok"}


STAGE = Stage("capacity", "capacity: 70B-shape FP8 LoRA on one GPU vs the planner", stage_capacity, 170, 150, 60)
