"""Every launch the FP8 dispatcher can make, built on meta tensors, for `llama-ft kernels --compile`.

The launches come from the dispatcher's own functions (kernels.fwd_launch, dx_launch, quantize_launch) on
tensors of the device "meta", so the compile check sees the arguments, strides and constexprs a real launch
passes, with no memory and no GPU. What varies:
    kernel        quantize (weights), quantize rows (fp8-compute activations), forward, dx
    mode          weight-only; fp8-compute on 8.9+ (refused below)
    dtype         of x / dy (bf16 in training; fp16 and fp32 the dispatcher also takes)
    LoRA          fused at BLOCK_R 16, 32, 64 (r <= FUSED_R_MAX), or none (no adapter, or r > 64: unfused)
    M             > 64 (training) or <= 64 (small batches): the default tiles differ
    tiles         every configuration of kernels.tile_configs (what autotune chooses among)
Shapes: Llama 70B q_proj at 4,096 tokens (M 4096, N 8192, K 8192). Every 70B and 8B projection specializes
alike (N, K, K/128 and the strides are multiples of 16), so one shape stands for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_ft.fp8 import kernels
from llama_ft.fp8.format import num_blocks
from llama_ft.gpus import has_fp8_tensor_cores

TRAINING_M, N, K = 4096, 8192, 8192
SMALL_M = 64
RANKS = (16, 32, 64)
DEFAULT_RANKS = (16, 64)
"""The ranks whose default tiles must not spill (issue 25: r 16 and r 64 at training shapes)."""
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class CheckLaunch:
    label: str                  # what the launch is, e.g. "bf16 r64 M>64"
    launch: kernels.Launch
    training: bool              # bf16 at training shapes with r 16 or 64: its first config is a default


def meta_tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def lora_cases(name: str, m: int, n: int, k: int, dtype: torch.dtype, defaults_only: bool):
    """(label, training default?, (t, u, b, a)) for each LoRA rank a launch is checked at (None: no LoRA): meta
    operands t, u (M, r), B (N, r), A (r, K). Shared by every quantized format's launch list."""
    for r in DEFAULT_RANKS if defaults_only else (None, *RANKS):
        ops = (None,) * 4
        if r is not None:
            ops = (meta_tensor(m, r, dtype=dtype), meta_tensor(m, r, dtype=dtype), meta_tensor(n, r, dtype=dtype),
                   meta_tensor(r, k, dtype=dtype))
        label = f"{name} {'no LoRA' if r is None else f'r{r}'} M{'>' if m > SMALL_M else '<='}{SMALL_M}"
        yield label, dtype == torch.bfloat16 and m == TRAINING_M and r in DEFAULT_RANKS, ops


def check_launches(cap: tuple[int, int], defaults_only: bool = False) -> list[CheckLaunch]:
    """The launches for a GPU of capability `cap`; with defaults_only, only the training ones (bf16, M 4096,
    r 16 and 64, both modes) and the quantize kernel on bf16 weights."""
    out = []
    q = meta_tensor(N, K, dtype=torch.uint8)
    s = meta_tensor(num_blocks(N), num_blocks(K), dtype=torch.float32)
    for dtype in DTYPES[:1] if defaults_only else DTYPES:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        w = meta_tensor(N, K, dtype=dtype)
        out.append(CheckLaunch(f"{name} weights", kernels.quantize_launch(w, q, s, cap), dtype == torch.bfloat16))
        modes = [False, True] if has_fp8_tensor_cores(cap) else [False]
        for fp8_compute in modes:
            for m in (TRAINING_M,) if defaults_only else (TRAINING_M, SMALL_M):
                y, dx = meta_tensor(m, N, dtype=dtype), meta_tensor(m, K, dtype=dtype)
                x, dy = meta_tensor(m, K, dtype=dtype), meta_tensor(m, N, dtype=dtype)
                sx = sdy = None
                if fp8_compute:  # the GEMMs read e4m3 bytes + scales, made by the row quantizer
                    x8, sx = meta_tensor(m, K, dtype=torch.uint8), meta_tensor(m, num_blocks(K), dtype=torch.float32)
                    dy8, sdy = meta_tensor(m, N, dtype=torch.uint8), meta_tensor(m, num_blocks(N), dtype=torch.float32)
                    if m == TRAINING_M:
                        out.append(CheckLaunch(f"{name} activations", kernels.quantize_rows_launch(x, x8, sx, cap),
                                               dtype == torch.bfloat16))
                    x, dy = x8, dy8
                for label, training, (t, u, b, a) in lora_cases(name, m, N, K, dtype, defaults_only):
                    out.append(CheckLaunch(label, kernels.fwd_launch(x, sx, q, s, t, b, y, 2.0, fp8_compute, cap),
                                           training))
                    out.append(CheckLaunch(label, kernels.dx_launch(dy, sdy, q, s, u, a, dx, 2.0, fp8_compute, cap),
                                           training))
    return out
