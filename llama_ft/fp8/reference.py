"""Pure-PyTorch math of the FP8 LoRA linear: the CPU path and the oracle for the Triton kernels.

    forward:  y  = x W^T + s * t B^T            t = x_l A^T   (M, r), precomputed
    dx:       dx = dy W  + s * u A              u = dy B      (M, r), precomputed
    x (M, K)  W (N, K) dequantized from FP8  A (r, K)  B (N, r)  dy (M, N)

Weight-only mode multiplies by the dequantized W; fp8-compute mode first rounds the left
operand (x, or dy) to e4m3 per 1 x 128 tile of the contraction dim, as the kernel does.
Products are computed in fp32 and cast to the input dtype.
"""

from __future__ import annotations

import torch

from llama_ft.fp8.format import dequantize_fp8, quantize_activation_reference


def _left(a: torch.Tensor, fp8_compute: bool) -> torch.Tensor:
    return quantize_activation_reference(a) if fp8_compute else a.float()


def forward_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, t: torch.Tensor | None,
                b: torch.Tensor | None, scaling: float, fp8_compute: bool = False) -> torch.Tensor:
    """y (M, N) = x W^T + scaling * t B^T, in x.dtype."""
    w = dequantize_fp8(q, scales, torch.float32)
    y = _left(x, fp8_compute) @ w.T
    if t is not None:
        y = y + scaling * (t.float() @ b.float().T)
    return y.to(x.dtype)


def dx_ref(dy: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, u: torch.Tensor | None,
           a: torch.Tensor | None, scaling: float, fp8_compute: bool = False) -> torch.Tensor:
    """dx (M, K) = dy W + scaling * u A, in dy.dtype."""
    w = dequantize_fp8(q, scales, torch.float32)
    dx = _left(dy, fp8_compute) @ w
    if u is not None:
        dx = dx + scaling * (u.float() @ a.float())
    return dx.to(dy.dtype)
