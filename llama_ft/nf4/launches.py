"""Every launch the NF4 dispatcher can make, built on meta tensors, for `llama-ft kernels --compile`.

As for FP8 (llama_ft/fp8/launches.py), the launches come from the dispatcher's own functions (kernels.fwd_launch,
dx_launch) on tensors of the device "meta": the compile check sees the arguments, strides and constexprs a real
launch passes, with no memory and no GPU. What varies:
    kernel        forward, dx
    dtype         of x / dy (bf16 in training; fp16 and fp32 the dispatcher also takes)
    LoRA          fused at BLOCK_R 16, 32, 64 (r <= FUSED_R_MAX), or none (no adapter, or r > 64: unfused)
    M             > 64 (training) or <= 64 (small batches): the default tiles differ
    tiles         every configuration of kernels.tile_configs (what autotune chooses among)
Shapes: Llama 70B q_proj at 4,096 tokens (M 4096, N 8192, K 8192). Every 70B and 8B projection specializes
alike (N, K, K/2, K/64 and the strides are multiples of 16), so one shape stands for all of them.
"""

from __future__ import annotations

import torch

from llama_ft.fp8.launches import DEFAULT_RANKS, DTYPES, RANKS, SMALL_M, TRAINING_M, CheckLaunch
from llama_ft.nf4 import kernels
from llama_ft.nf4.reference import GROUP

N, K = 8192, 8192


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def check_launches(cap: tuple[int, int], defaults_only: bool = False) -> list[CheckLaunch]:
    """The launches for a GPU of capability `cap`; with defaults_only, only the training ones (bf16, M 4096,
    r 16 and 64)."""
    out = []
    code = _meta(16, dtype=torch.float32)
    packed = _meta(N, K // 2, dtype=torch.uint8)
    absmax = _meta(N, K // GROUP, dtype=torch.float32)
    for dtype in DTYPES[:1] if defaults_only else DTYPES:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        for m in (TRAINING_M,) if defaults_only else (TRAINING_M, SMALL_M):
            y, dx = _meta(m, N, dtype=dtype), _meta(m, K, dtype=dtype)
            x, dy = _meta(m, K, dtype=dtype), _meta(m, N, dtype=dtype)
            for r in DEFAULT_RANKS if defaults_only else (None, *RANKS):
                t = u = b = a = None
                if r is not None:
                    t, u = _meta(m, r, dtype=dtype), _meta(m, r, dtype=dtype)
                    b, a = _meta(N, r, dtype=dtype), _meta(r, K, dtype=dtype)
                label = f"{name} {'no LoRA' if r is None else f'r{r}'} M{'>' if m > SMALL_M else '<='}{SMALL_M}"
                training = dtype == torch.bfloat16 and m == TRAINING_M and r in DEFAULT_RANKS
                out.append(CheckLaunch(label, kernels.fwd_launch(x, packed, absmax, code, t, b, y, 2.0, cap),
                                       training))
                out.append(CheckLaunch(label, kernels.dx_launch(dy, packed, absmax, code, u, a, dx, 2.0, cap),
                                       training))
    return out
