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

from llama_ft.fp8.launches import DTYPES, SMALL_M, TRAINING_M, CheckLaunch, lora_cases, meta_tensor
from llama_ft.nf4 import kernels
from llama_ft.nf4.reference import GROUP

N, K = 8192, 8192


def check_launches(cap: tuple[int, int], defaults_only: bool = False) -> list[CheckLaunch]:
    """The launches for a GPU of capability `cap`; with defaults_only, only the training ones (bf16, M 4096,
    r 16 and 64)."""
    out = []
    code = meta_tensor(16, dtype=torch.float32)
    packed = meta_tensor(N, K // 2, dtype=torch.uint8)
    absmax = meta_tensor(N, K // GROUP, dtype=torch.float32)
    for dtype in DTYPES[:1] if defaults_only else DTYPES:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        for m in (TRAINING_M,) if defaults_only else (TRAINING_M, SMALL_M):
            y, dx = meta_tensor(m, N, dtype=dtype), meta_tensor(m, K, dtype=dtype)
            x, dy = meta_tensor(m, K, dtype=dtype), meta_tensor(m, N, dtype=dtype)
            for label, training, (t, u, b, a) in lora_cases(name, m, N, K, dtype, defaults_only):
                out.append(CheckLaunch(label, kernels.fwd_launch(x, packed, absmax, code, t, b, y, 2.0, cap),
                                       training))
                out.append(CheckLaunch(label, kernels.dx_launch(dy, packed, absmax, code, u, a, dx, 2.0, cap),
                                       training))
    return out
