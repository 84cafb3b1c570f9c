"""The planner inside a run: `--offload --offload_ratio auto` (the smallest offload ratio with which this run
fits), and at the end the plan beside the memory the run used (train_results.json "memory").

The machine is the one the run is on: each rank's GPU (`total_memory` of the device), the host's
MemTotal, WORLD_SIZE ranks in nodes of LOCAL_WORLD_SIZE. On CPU ranks every partition is host memory
already, so the plan checks the host and the ratio is 0 (nothing to move).
"""

from __future__ import annotations

import logging
import os

import torch

from llama_ft.errors import UserError
from llama_ft.plan import plan_training

log = logging.getLogger(__name__)


def host_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def this_machine(world_size: int) -> dict:
    """nodes, gpus_per_node, memory sizes and device of the machine this rank runs on."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    on_gpu = torch.cuda.is_available()
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if on_gpu else None
    return {"nodes": max(1, world_size // max(1, local)), "gpus_per_node": local, "gpu_memory_bytes": gpu,
            "host_memory_bytes": host_memory_bytes(), "device": "cuda" if on_gpu else "cpu"}


def resolve_offload_ratio(cfg, ds_config: dict, llama_config, world_size: int,
                          machine: dict | None = None) -> float | None:
    """The fraction of frozen base-weight bytes build_lora_model keeps in host memory (None: no offload).

    --offload alone: 1.0; --offload_ratio R: R; auto: the planner's smallest ratio that fits on
    `machine` (default: this one), or a UserError naming the term that does not fit at any ratio.
    """
    if not cfg.offload:
        return None
    if cfg.offload_ratio is None:
        return 1.0
    if cfg.offload_ratio != "auto":
        return float(cfg.offload_ratio)
    machine = machine or this_machine(world_size)
    plan = plan_training(cfg, ds_config, llama_config, **machine)
    ratio = plan["min_offload_ratio"]
    if ratio is None:
        short = plan["cannot_fit"]
        raise UserError(
            f"--offload_ratio auto: this run does not fit at any offload ratio: {short['where'].replace('_', ' ')} "
            f"needs {short['total_bytes'] / 2**30:.1f} GiB of {short['capacity_bytes'] / 2**30:.1f} GiB even at "
            f"ratio {short['offload_ratio']:g}; the largest term is {short['term']} "
            f"({short['term_bytes'] / 2**30:.1f} GiB). See llama-ft plan")
    log.info("--offload_ratio auto: %.2f (llama-ft plan: %.1f GiB per %s of %.1f GiB)", ratio,
             plan["per_gpu" if machine["device"] == "cuda" else "per_host"]["total_bytes"] / 2**30,
             "GPU" if machine["device"] == "cuda" else "host",
             (machine["gpu_memory_bytes"] if machine["device"] == "cuda" else machine["host_memory_bytes"]) / 2**30)
    return ratio


def planned_peak_bytes(per_gpu: dict, device: str) -> int:
    """The part of the plan's per-rank total a measurement sees. A CPU rank's peak RSS holds every term. On a
    GPU the total holds the CUDA context + NCCL, which torch's allocator never sees, and a fragmentation
    margin, which it reserves but does not hand out: max_memory_allocated is compared with the rest."""
    if device == "cpu":
        return int(per_gpu["total_bytes"])
    return int(per_gpu["total_bytes"] - per_gpu.get("cuda_context_bytes", 0) - per_gpu.get("fragmentation_bytes", 0))


def used_vs_planned(cfg, ds_config: dict, llama_config, world_size: int, peak_bytes: int) -> dict:
    """train_results.json's "memory": the largest rank's peak (`peak_bytes`: GPU max_memory_allocated, CPU
    peak RSS, both since the build started) beside what `llama-ft plan` gives for this run on this machine."""
    machine = this_machine(world_size)
    kind = "max_memory_allocated" if machine["device"] == "cuda" else "peak RSS"
    out: dict = {"measured_bytes": int(peak_bytes), "measured": kind}
    try:
        plan = plan_training(cfg, ds_config, llama_config, **machine)
    except Exception as e:  # noqa: BLE001 - the run is done and saved: an account the plan cannot give is no failure
        log.warning("memory: no plan to compare with (%s)", " ".join(str(e).split())[:300])
        return out | {"planned_bytes": None, "plan_error": str(e)}
    planned = planned_peak_bytes(plan["per_gpu"], machine["device"])
    return out | {"planned_bytes": planned, "planned_total_bytes": int(plan["per_gpu"]["total_bytes"]),
                  "plan_peak_at": plan["peak_at"],
                  "error_pct": round(100 * (planned - peak_bytes) / peak_bytes, 1) if peak_bytes else None}
