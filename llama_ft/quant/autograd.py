"""Autograd for y = x W^T + s * (x_l A^T) B^T with a frozen quantized W: gives dx (and dx_l), dA, dB.

    x (..., K)       input of the frozen base matmul
    x_l (..., K)     input of the LoRA branch: dropout(x) while training with dropout, else x itself
    W (N, K)         stored quantized (a format's storage tensors), never materialised whole
    A (r, K), B (N, r), s = alpha / r

    forward   t  = x_l A^T                       (M, r)   torch matmul
              y  = x W^T + s t B^T               ops.forward: one kernel, LoRA fused into the output tile
    backward  u  = dy B                          (M, r)   torch matmul
              dx = dy W + s u A                  ops.dx: one kernel, LoRA fused   (x_l is x)
              dx = dy W;  dx_l = s u A           when x_l is a separate dropout output
              dA = s u^T x_l                     (r, K)   torch matmul (cuBLAS on GPU)
              dB = s dy^T t                      (N, r)   torch matmul

The base alone (quant_linear, for the adapters switched off: lora.lora_disabled) is the same two GEMMs with
the LoRA term left out (t = u = None): y = x W^T, dx = dy W.

The small dA/dB/t/u GEMMs go to cuBLAS: they are memory-bound, M x r x K with r <= 64, and a custom kernel
would not beat it. The two big GEMMs are the format's (`BaseOps`): Triton kernels on CUDA tensors (and under
TRITON_INTERPRET=1), a PyTorch reference elsewhere.

ZeRO-3: the storage and LoRA tensors arrive as partitioned Parameters. DeepSpeed gathers a module's parameters
around its forward and before its backward; if one is nonetheless not available when backward runs (e.g.
released by a prefetch limit), it is gathered for the duration and partitioned again, as DeepSpeed's own
LinearFunctionForZeroStage3 does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch


class BaseOps(Protocol):
    """A storage format's two GEMMs over 2-D operands; `storage` is the layer's storage tensors, whole.

    forward: x2 (M, K), t (M, r) | None, b (N, r) | None  ->  y (M, N) = x2 W^T + scaling t b^T, in x2.dtype
    dx:      dy2 (M, N), u (M, r) | None, a (r, K) | None ->  dx (M, K) = dy2 W + scaling u a, in dy2.dtype
    """

    def forward(self, x2: torch.Tensor, storage: tuple[torch.Tensor, ...], t: torch.Tensor | None,
                b: torch.Tensor | None, scaling: float) -> torch.Tensor: ...

    def dx(self, dy2: torch.Tensor, storage: tuple[torch.Tensor, ...], u: torch.Tensor | None,
           a: torch.Tensor | None, scaling: float) -> torch.Tensor: ...


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


class QuantLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, ops: BaseOps, n_out: int, scaling: float, *storage):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, k)
        t = xl2 @ lora_a.to(xl2.dtype).T
        y = ops.forward(x2, storage, t, lora_b.to(x2.dtype), scaling)
        ctx.save_for_backward(xl2, t, lora_a, lora_b, *storage)
        ctx.separate_lora_input = x_lora is not None
        ctx.ops, ctx.scaling, ctx.x_shape = ops, scaling, x.shape
        return y.reshape(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, dy):
        xl2, t, lora_a, lora_b, *storage = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        with available(lora_a, lora_b, *storage):
            a, b = lora_a.to(dy2.dtype), lora_b.to(dy2.dtype)
            u = dy2 @ b
            dx = dx_l = None
            if ctx.needs_input_grad[0]:
                # LoRA's share of dx is fused into the kernel unless it belongs to a separate dropout input
                fused = not ctx.separate_lora_input
                dx = ctx.ops.dx(dy2, tuple(storage), u if fused else None, a if fused else None,
                                s).reshape(ctx.x_shape)
            if ctx.separate_lora_input and ctx.needs_input_grad[1]:
                dx_l = (s * (u @ a)).reshape(ctx.x_shape)
            d_a = (s * (u.T @ xl2)).to(lora_a.dtype) if ctx.needs_input_grad[2] else None
            d_b = (s * (dy2.T @ t)).to(lora_b.dtype) if ctx.needs_input_grad[3] else None
        return (dx, dx_l, d_a, d_b, None, None, None) + (None,) * len(storage)


class QuantLinearFunction(torch.autograd.Function):
    """y = x W^T and dx = dy W: the frozen quantized base without the LoRA branch (no LoRA GEMM at all)."""

    @staticmethod
    def forward(ctx, x, ops: BaseOps, n_out: int, *storage):
        x2 = x.reshape(-1, x.shape[-1])
        y = ops.forward(x2, storage, None, None, 0.0)
        ctx.save_for_backward(*storage)
        ctx.ops, ctx.x_shape = ops, x.shape
        return y.reshape(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, dy):
        storage = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            with available(*storage):
                dx = ctx.ops.dx(dy.reshape(-1, dy.shape[-1]), tuple(storage), None, None, 0.0)
            dx = dx.reshape(ctx.x_shape)
        return (dx, None, None) + (None,) * len(storage)


def quant_lora_linear(x: torch.Tensor, ops: BaseOps, n_out: int, storage: tuple[torch.Tensor, ...],
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                      x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., n_out) = x W^T + scaling * (x_lora A^T) B^T, W given by `storage` in the format of `ops`.

    `x_lora` defaults to `x`; pass dropout(x) to apply LoRA dropout. Differentiable in x, x_lora, A, B.
    """
    return QuantLoRAFunction.apply(x, x_lora, lora_a, lora_b, ops, int(n_out), float(scaling), *storage)


def quant_linear(x: torch.Tensor, ops: BaseOps, n_out: int, storage: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """y (..., n_out) = x W^T, W given by `storage` in the format of `ops`. Differentiable in x."""
    return QuantLinearFunction.apply(x, ops, int(n_out), *storage)
