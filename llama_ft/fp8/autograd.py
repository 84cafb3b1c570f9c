"""The FP8 format's two GEMMs (`FP8Ops`) for the shared quantized-base autograd (llama_ft/quant/autograd.py).

    storage = (q uint8 (N, K) e4m3 bytes, scale_bytes uint8 (ceil(N/128), ceil(K/128) * 4) fp32 block scales)
    forward   y  = x W^T + s t B^T     one Triton kernel (LoRA fused) on CUDA / under the interpreter, else
    dx        dx = dy W + s u A        the PyTorch reference (reference.py)

fp8_compute rounds the left operand (x, or dy) to e4m3 per 1 x 128 tile too (FP8 tensor cores, sm_89+).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_ft.fp8 import kernels, reference
from llama_ft.fp8.format import scales_from_bytes
from llama_ft.quant.autograd import quant_linear, quant_lora_linear


def base_forward(x2, q, scales, t, b, scaling, fp8_compute):
    if kernels.use_triton(x2):
        return kernels.forward_triton(x2.contiguous(), q, scales, t, b, scaling, fp8_compute)
    return reference.forward_ref(x2, q, scales, t, b, scaling, fp8_compute)


def base_dx(dy2, q, scales, u, a, scaling, fp8_compute):
    if kernels.use_triton(dy2):
        return kernels.dx_triton(dy2.contiguous(), q, scales, u, a, scaling, fp8_compute)
    return reference.dx_ref(dy2, q, scales, u, a, scaling, fp8_compute)


@dataclass(frozen=True)
class FP8Ops:
    fp8_compute: bool = False

    def forward(self, x2, storage, t, b, scaling):
        q, scale_bytes = storage
        return base_forward(x2, q, scales_from_bytes(scale_bytes), t, b, scaling, self.fp8_compute)

    def dx(self, dy2, storage, u, a, scaling):
        q, scale_bytes = storage
        return base_dx(dy2, q, scales_from_bytes(scale_bytes), u, a, scaling, self.fp8_compute)


def fp8_lora_linear(x: torch.Tensor, q: torch.Tensor, scale_bytes: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float, x_lora: torch.Tensor | None = None,
                    fp8_compute: bool = False) -> torch.Tensor:
    """y (..., N) = x W^T + scaling * (x_lora A^T) B^T with W given as FP8 bytes + block-scale bytes.

    `x_lora` defaults to `x`; pass dropout(x) to apply LoRA dropout. Differentiable in x, x_lora, A, B.
    """
    return quant_lora_linear(x, FP8Ops(bool(fp8_compute)), q.shape[0], (q, scale_bytes), lora_a, lora_b, scaling,
                             x_lora=x_lora)


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale_bytes: torch.Tensor, fp8_compute: bool = False) -> torch.Tensor:
    """y (..., N) = x W^T with W given as FP8 bytes + block-scale bytes. Differentiable in x."""
    return quant_linear(x, FP8Ops(bool(fp8_compute)), q.shape[0], (q, scale_bytes))
