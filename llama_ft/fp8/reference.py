"""Pure-PyTorch math of the FP8 LoRA linear: the CPU path and the oracle for the Triton kernels.

    forward:  y  = x W^T + s * t B^T            t = x_l A^T   (M, r), precomputed
    dx:       dx = dy W  + s * u A              u = dy B      (M, r), precomputed
    x (M, K)  W (N, K) dequantized from FP8  A (r, K)  B (N, r)  dy (M, N)

Weight-only mode multiplies by the dequantized W; fp8-compute mode first rounds the left
operand (x, or dy) to e4m3 per 1 x 128 tile of the contraction dim, as the kernel does.
Products are computed in fp32 and cast to the input dtype.

W is dequantized one stripe of rows (whole 128-row scale blocks, about STRIPE_ELEMENTS weights) at a
time, never whole: dequantizing a full (N, K) weight costs 12 bytes per weight element at once (the
expanded scales, the fp32 widening and their product), 0.19 GiB for one MLP projection of Llama-3.2-1B and
2.6 GiB at 405B. On CPU ranks glibc keeps such freed chunks resident, which the planner cannot see; a stripe
of a fixed size is reused from the heap call after call.
"""

from __future__ import annotations

import torch

from llama_ft.fp8.format import BLOCK, dequantize_fp8, quantize_activation_reference

STRIPE_ELEMENTS = 1 << 21
"""Weights dequantized at once (fp32): 8 MiB, 24 MiB of transients with the expanded scales."""


def stripes(n: int, k: int) -> list[slice]:
    """Row ranges of W (N, K): whole scale blocks, about STRIPE_ELEMENTS weights each."""
    rows = max(BLOCK, STRIPE_ELEMENTS // max(k, 1) // BLOCK * BLOCK)
    return [slice(r, min(r + rows, n)) for r in range(0, n, rows)]


def _weight(q: torch.Tensor, scales: torch.Tensor, rows: slice) -> torch.Tensor:
    """W[rows] (rows, K) in fp32; `rows` starts on a scale block."""
    blocks = slice(rows.start // BLOCK, -(-rows.stop // BLOCK))
    return dequantize_fp8(q[rows], scales[blocks], torch.float32)


def _left(a: torch.Tensor, fp8_compute: bool) -> torch.Tensor:
    return quantize_activation_reference(a) if fp8_compute else a.float()


def forward_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, t: torch.Tensor | None,
                b: torch.Tensor | None, scaling: float, fp8_compute: bool = False) -> torch.Tensor:
    """y (M, N) = x W^T + scaling * t B^T, in x.dtype. y[:, rows] = x W[rows]^T, stripe by stripe."""
    left = _left(x, fp8_compute)
    y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32, device=x.device)
    for rows in stripes(*q.shape):
        y[:, rows] = left @ _weight(q, scales, rows).T
    if t is not None:
        y.addmm_(t.float(), b.float().T, alpha=scaling)
    return y.to(x.dtype)


def dx_ref(dy: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, u: torch.Tensor | None,
           a: torch.Tensor | None, scaling: float, fp8_compute: bool = False) -> torch.Tensor:
    """dx (M, K) = dy W + scaling * u A, in dy.dtype: the sum over stripes of dy[:, rows] W[rows]."""
    left = _left(dy, fp8_compute)  # quantized over the whole contraction dim N, as the kernel's tiles
    dx = torch.zeros(dy.shape[0], q.shape[1], dtype=torch.float32, device=dy.device)
    for rows in stripes(*q.shape):
        dx.addmm_(left[:, rows], _weight(q, scales, rows))
    if u is not None:
        dx.addmm_(u.float(), a.float(), alpha=scaling)
    return dx.to(dy.dtype)
