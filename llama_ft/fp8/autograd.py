"""Autograd for y = x W^T + s * (x_l A^T) B^T with a frozen FP8 W: gives dx (and dx_l), dA, dB.

    x (..., K)       input of the frozen base matmul
    x_l (..., K)     input of the LoRA branch: dropout(x) while training with dropout, else x itself
    W (N, K)         FP8 bytes q (uint8) + block scales (fp32, stored as bytes), never materialised whole
    A (r, K), B (N, r), s = alpha / r

    forward   t  = x_l A^T                       (M, r)   torch matmul
              y  = x W^T + s t B^T               one kernel, LoRA fused into the output tile
    backward  u  = dy B                          (M, r)   torch matmul
              dx = dy W + s u A                  one kernel, LoRA fused   (x_l is x)
              dx = dy W;  dx_l = s u A           when x_l is a separate dropout output
              dA = s u^T x_l                     (r, K)   torch matmul (cuBLAS on GPU)
              dB = s dy^T t                      (N, r)   torch matmul

The base alone (fp8_linear, for the adapters switched off: lora.lora_disabled) is the same two kernels
with the LoRA term left out (t = u = None): y = x W^T, dx = dy W.

The small dA/dB/t/u GEMMs go to cuBLAS: they are memory-bound, M x r x K with r <= 64, and a
custom kernel would not beat it. The big GEMMs go to the Triton kernels on CUDA tensors (and
under TRITON_INTERPRET=1), and to the PyTorch reference elsewhere.

ZeRO-3: the weight, scale and LoRA tensors arrive as partitioned Parameters. DeepSpeed gathers a
module's parameters around its forward and before its backward; if one is nonetheless not
available when backward runs (e.g. released by a prefetch limit), it is gathered for the
duration and partitioned again, as DeepSpeed's own LinearFunctionForZeroStage3 does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from llama_ft.fp8 import kernels, reference
from llama_ft.fp8.format import scales_from_bytes


def base_forward(x2, q, scales, t, b, scaling, fp8_compute):
    if kernels.use_triton(x2):
        return kernels.forward_triton(x2.contiguous(), q, scales, t, b, scaling, fp8_compute)
    return reference.forward_ref(x2, q, scales, t, b, scaling, fp8_compute)


def base_dx(dy2, q, scales, u, a, scaling, fp8_compute):
    if kernels.use_triton(dy2):
        return kernels.dx_triton(dy2.contiguous(), q, scales, u, a, scaling, fp8_compute)
    return reference.dx_ref(dy2, q, scales, u, a, scaling, fp8_compute)


@contextlib.contextmanager
def available(*params: torch.Tensor) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters whole for the block, if DeepSpeed has released them."""
    gathered = []
    for p in params:
        status = getattr(p, "ds_status", None)
        if status is not None and status.name == "NOT_AVAILABLE":
            p.all_gather()
            gathered.append(p)
    try:
        yield
    finally:
        for p in gathered:
            p.partition()


class FP8LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, q, scale_bytes, lora_a, lora_b, scaling: float, fp8_compute: bool):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, k)
        t = xl2 @ lora_a.to(xl2.dtype).T
        y = base_forward(x2, q, scales_from_bytes(scale_bytes), t, lora_b.to(x2.dtype), scaling, fp8_compute)
        ctx.save_for_backward(xl2, t, q, scale_bytes, lora_a, lora_b)
        ctx.separate_lora_input = x_lora is not None
        ctx.scaling, ctx.fp8_compute, ctx.x_shape = scaling, fp8_compute, x.shape
        return y.reshape(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xl2, t, q, scale_bytes, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        with available(q, scale_bytes, lora_a, lora_b):
            a, b = lora_a.to(dy2.dtype), lora_b.to(dy2.dtype)
            u = dy2 @ b
            dx = dx_l = None
            if ctx.needs_input_grad[0]:
                # LoRA's share of dx is fused into the kernel unless it belongs to a separate dropout input
                fused = not ctx.separate_lora_input
                dx = base_dx(dy2, q, scales_from_bytes(scale_bytes), u if fused else None, a if fused else None, s,
                             ctx.fp8_compute).reshape(ctx.x_shape)
            if ctx.separate_lora_input and ctx.needs_input_grad[1]:
                dx_l = (s * (u @ a)).reshape(ctx.x_shape)
            d_a = (s * (u.T @ xl2)).to(lora_a.dtype) if ctx.needs_input_grad[4] else None
            d_b = (s * (dy2.T @ t)).to(lora_b.dtype) if ctx.needs_input_grad[5] else None
        return dx, dx_l, None, None, d_a, d_b, None, None


def fp8_lora_linear(x: torch.Tensor, q: torch.Tensor, scale_bytes: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float, x_lora: torch.Tensor | None = None,
                    fp8_compute: bool = False) -> torch.Tensor:
    """y (..., N) = x W^T + scaling * (x_lora A^T) B^T with W given as FP8 bytes + block-scale bytes.

    `x_lora` defaults to `x`; pass dropout(x) to apply LoRA dropout. Differentiable in x, x_lora, A, B.
    """
    return FP8LoRAFunction.apply(x, x_lora, q, scale_bytes, lora_a, lora_b, float(scaling), bool(fp8_compute))


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T and dx = dy W: the frozen FP8 base without the LoRA branch (no LoRA GEMM at all)."""

    @staticmethod
    def forward(ctx, x, q, scale_bytes, fp8_compute: bool):
        x2 = x.reshape(-1, x.shape[-1])
        y = base_forward(x2, q, scales_from_bytes(scale_bytes), None, None, 0.0, fp8_compute)
        ctx.save_for_backward(q, scale_bytes)
        ctx.fp8_compute, ctx.x_shape = fp8_compute, x.shape
        return y.reshape(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        q, scale_bytes = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            with available(q, scale_bytes):
                dy2 = dy.reshape(-1, dy.shape[-1])
                dx = base_dx(dy2, q, scales_from_bytes(scale_bytes), None, None, 0.0, ctx.fp8_compute)
            dx = dx.reshape(ctx.x_shape)
        return dx, None, None, None


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale_bytes: torch.Tensor, fp8_compute: bool = False) -> torch.Tensor:
    """y (..., N) = x W^T with W given as FP8 bytes + block-scale bytes. Differentiable in x."""
    return FP8LinearFunction.apply(x, q, scale_bytes, bool(fp8_compute))
