"""PEFT-format LoRA adapters, saved from and loaded into ZeRO-3 partitions.

Files (byte-compatible with `peft.PeftModel.save_pretrained` for LoRA):
    adapter_config.json          written by peft's own LoraConfig
    adapter_model.safetensors    {"base_model.model.<module path>.lora_A.weight": (r, in),
                                  "base_model.model.<module path>.lora_B.weight": (out, r)}

Only LoRA tensors are ever gathered, one module at a time, so saving a 405B run's adapters
costs one layer's A and B per rank, never the frozen base.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llama_ft.errors import EXIT_USER_ERROR, StopRun, UserError
from llama_ft.fsutil import default_mode, disk_full_message, fsync_path, is_disk_full
from llama_ft.hostcomm import from_rank0
from llama_ft.lora import LoraSpec, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def peft_key(module_path: str, which: str) -> str:
    """`model.layers.0.self_attn.q_proj`, "A" -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return f"{PEFT_PREFIX}{module_path}.lora_{which}.weight"


def lora_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(PEFT key, parameter) for every LoRA A and B, in model order."""
    for path, m in lora_modules(model).items():
        yield peft_key(path, "A"), m.lora_A
        yield peft_key(path, "B"), m.lora_B


def gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    """GatheredParameters for ZeRO-3 params, a no-op for ordinary ones."""
    z3 = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(z3, modifier_rank=modifier_rank) if z3 else contextlib.nullcontext()


def gather_lora_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Full LoRA tensors on rank 0's CPU (other ranks get {}); all ranks must call it.

    Gathers one LoRALinear's A and B at a time.
    """
    out: dict[str, torch.Tensor] = {}
    for path, m in lora_modules(model).items():
        with gathered([m.lora_A, m.lora_B]):
            if _rank() == 0:
                for which, p in (("A", m.lora_A), ("B", m.lora_B)):
                    t = p.detach().to("cpu", copy=True)
                    out[peft_key(path, which)] = t.to(dtype) if dtype is not None else t
    return out


def write_adapter_config(out_dir: Path, spec: LoraSpec, base_model: str) -> None:
    """adapter_config.json through peft's LoraConfig, so the fields are exactly PEFT's."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=sorted(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    cfg.save_pretrained(str(out_dir))


def write_adapter_files(state: dict[str, torch.Tensor], out_dir: Path, spec: LoraSpec, base_model: str) -> None:
    """adapter_model.safetensors and adapter_config.json into `out_dir`, each through a temporary name,
    fsynced, then renamed: a reader never sees a half file. Not collective (rank 0 calls it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{ADAPTER_WEIGHTS}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        default_mode(tmp)
        fsync_path(tmp)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".adapter_config.") as cfg_dir:
            write_adapter_config(Path(cfg_dir), spec, base_model)
            fsync_path(Path(cfg_dir) / ADAPTER_CONFIG)
            os.replace(Path(cfg_dir) / ADAPTER_CONFIG, out_dir / ADAPTER_CONFIG)
        os.replace(tmp, out_dir / ADAPTER_WEIGHTS)
        fsync_path(out_dir)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapters(model: nn.Module, out_dir: str | os.PathLike, spec: LoraSpec, base_model: str) -> None:
    """Save PEFT-format adapters from a (partitioned) model. Collective: every rank calls it.

    Rank 0 writes (write_adapter_files). A full disk is one line from rank 0 and a quiet stop on the
    others (the files already there stay as they were), never a hang at the barrier.
    """
    out_dir = Path(out_dir)
    state = gather_lora_state(model)
    failure = None
    if _rank() == 0:
        try:
            write_adapter_files(state, out_dir, spec, base_model)
        except Exception as e:  # reported below, after every rank knows
            failure = e
    if from_rank0([int(failure is not None)])[0] and failure is None:
        raise StopRun(EXIT_USER_ERROR)
    if failure is not None:
        if is_disk_full(failure):
            raise UserError(disk_full_message(out_dir / ADAPTER_WEIGHTS)) from None
        raise failure


def read_adapter_tensors(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path}: missing (expected PEFT adapter weights in safetensors)")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_adapters(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-named LoRA tensors into the model's (partitioned) A and B. Collective.

    Raises UserError naming `source` when a tensor is missing, unexpected or mis-shaped.
    """
    expected = dict(lora_named_parameters(model))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"{source}: tensor {extra[0]!r} has no LoRA module in this model")
    for key, p in expected.items():
        if key not in tensors:
            raise UserError(f"{source}: missing tensor {key!r}")
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        if tuple(tensors[key].shape) != shape:
            raise UserError(f"{source}: {key!r} has shape {list(tensors[key].shape)}, model expects {list(shape)}")
    for path, m in lora_modules(model).items():
        with gathered([m.lora_A, m.lora_B], modifier_rank=0):
            if _rank() == 0 or not hasattr(m.lora_A, "ds_id"):
                m.lora_A.data.copy_(tensors[peft_key(path, "A")])
                m.lora_B.data.copy_(tensors[peft_key(path, "B")])
