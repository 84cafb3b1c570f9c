"""Training checkpoints for exact resume, pickle-free: safetensors for tensors, JSON for the rest.

    checkpoint-STEP/
      adapter_config.json, adapter_model.safetensors   PEFT adapters (bf16 values the model uses)
      optimizer.safetensors     per LoRA tensor: "<peft key>::fp32" master weight,
                                "::exp_avg", "::exp_avg_sq" Adam moments (full, un-partitioned)
      trainer_state.json        step, data position, optimizer step, LR scheduler state, options
      rng_state_RANK.json       each rank's torch / python / numpy RNG state (dropout draws)

Optimizer state is stored whole (gathered through DeepSpeed's tensor-fragment API), so the
tensors do not depend on how ZeRO-3 partitioned them; the data position and RNG streams do,
so resuming needs the same world size, which trainer_state.json records and checks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors import safe_open
from safetensors.torch import save_file

from llama_ft.adapters import gathered, lora_named_parameters, read_adapter_tensors, save_adapters
from llama_ft.errors import UserError
from llama_ft.model.lora import LoraSpec

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"


@dataclass
class Progress:
    """Where training stands: optimizer steps done and the next micro-batch of the data stream."""

    step: int = 0
    epoch: int = 0
    micro_index: int = 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _inner_optimizer(engine):
    return engine.optimizer.optimizer


def _optimizer_step(engine) -> int:
    states = [s for s in _inner_optimizer(engine).state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state().tolist()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8))


def save_checkpoint(
    engine, model, scheduler, spec: LoraSpec, progress: Progress, out_dir: Path, base_model: str,
    options: dict[str, Any],
) -> None:
    """Write checkpoint-STEP atomically (a temporary sibling renamed by rank 0). Collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    save_adapters(model, tmp, spec, base_model)
    tensors: dict[str, torch.Tensor] = {}
    has_moments = _optimizer_step(engine) > 0  # same on every rank, so the gathers below match up
    for key, p in lora_named_parameters(model):
        # every rank takes part in each gather; rank 0 keeps the result
        full = {"fp32": safe_get_full_fp32_param(p)}
        for k in ADAM_KEYS:
            full[k] = safe_get_full_optimizer_state(p, k) if has_moments else torch.zeros_like(full["fp32"])
        if _rank() == 0:
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            for k, t in full.items():
                tensors[f"{key}::{k}"] = t.detach().float().cpu().reshape(shape).contiguous()
    (tmp / f"rng_state_{_rank()}.json").write_text(json.dumps(_rng_state()))
    if _rank() == 0:
        save_file(tensors, str(tmp / OPTIM_FILE), metadata={"format": "pt"})
        state = {
            "global_step": progress.step,
            "epoch": progress.epoch,
            "micro_index": progress.micro_index,
            "optimizer_step": _optimizer_step(engine),
            "world_size": world,
            "lr_scheduler": scheduler.state_dict(),
            "options": options,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    _barrier()
    if _rank() == 0:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    _barrier()


def load_checkpoint(engine, model, scheduler, ckpt_dir: str | os.PathLike) -> Progress:
    """Restore adapters, fp32 masters, Adam moments, step counts, LR schedule, RNG and data position."""
    ckpt = Path(ckpt_dir)
    flag = f"--resume_from_checkpoint {ckpt}"
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
        step, world_saved = int(state["global_step"]), int(state["world_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{flag}: {STATE_FILE} unreadable or missing fields ({e})") from e
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world_saved != world:
        raise UserError(f"{flag}: saved with {world_saved} ranks, this run has {world} (exact resume needs the same)")
    rng_path = ckpt / f"rng_state_{_rank()}.json"
    if not (ckpt / OPTIM_FILE).is_file() or not rng_path.is_file():
        raise UserError(f"{flag}: incomplete checkpoint (missing {OPTIM_FILE} or {rng_path.name})")

    adapters = read_adapter_tensors(ckpt)
    with safe_open(str(ckpt / OPTIM_FILE), framework="pt") as f:
        optim = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(lora_named_parameters(model))
    missing = [k for k in params if k not in adapters or f"{k}::fp32" not in optim]
    if missing:
        raise UserError(f"{flag}: no saved state for {missing[0]!r} (checkpoint from another model or LoRA setup?)")

    # bf16 working copies: rank 0 writes, ZeRO-3 scatters into every rank's partition
    for key, p in params.items():
        with gathered([p], modifier_rank=0):
            if _rank() == 0 or not hasattr(p, "ds_id"):
                p.data.copy_(optim[f"{key}::fp32"].to(p.dtype))

    opt_step = int(state.get("optimizer_step", 0))
    inner = _inner_optimizer(engine)
    if opt_step > 0:
        # Adam creates its state lazily at the first step; create it so it can be filled.
        for flat in engine.optimizer.fp32_partitioned_groups_flat:
            st = inner.state[flat]
            if "exp_avg" not in st:
                st["exp_avg"] = torch.zeros_like(flat)
                st["exp_avg_sq"] = torch.zeros_like(flat)
            # DeepSpeedCPUAdam counts steps in a Python int, torch.optim.AdamW in a tensor
            st["step"] = opt_step if type(inner).__name__ == "DeepSpeedCPUAdam" else torch.tensor(float(opt_step))
    for key, p in params.items():
        safe_set_full_fp32_param(p, optim[f"{key}::fp32"].to(p.device))
        if opt_step > 0:
            for k in ADAM_KEYS:
                safe_set_full_optimizer_state(p, optim[f"{key}::{k}"].to(p.device), k)

    scheduler.load_state_dict(state["lr_scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr(), strict=False):
        group["lr"] = lr
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    _set_rng_state(json.loads(rng_path.read_text()))
    _barrier()
    return Progress(step=step, epoch=int(state["epoch"]), micro_index=int(state["micro_index"]))


def checkpoint_summary(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """trainer_state.json as a dict (for logs and tests)."""
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())

