"""Pure-PyTorch math of the NF4 (QLoRA 4-bit) LoRA linear: the CPU path and the oracle for the Triton kernels.

    forward:  y  = x W^T + s * t B^T            t = x_l A^T   (M, r), precomputed
    dx:       dx = dy W  + s * u A              u = dy B      (M, r), precomputed
    x (M, K)  W (N, K) dequantized from NF4  A (r, K)  B (N, r)  dy (M, N)

Storage the kernels read (one row of W after another, bitsandbytes' nibble order):
    packed  uint8 (N, ceil(K/2))   byte j of a row: element 2j in the HIGH nibble, element 2j+1 in the LOW one
    absmax  fp32  (N, ceil(K/64))  one scale per 64 consecutive weights of a row
    W[n, k] = NF4_CODE_VALUES[code(n, k)] * absmax[n, k // 64]     in fp32, then cast to the compute dtype
The kernels need K % 64 == 0 (every Llama projection); this reference takes any K (a last, partial group; an
odd K leaves the low nibble of a row's last byte unused, so it is given as `k`).
W is rounded to the input dtype (as the kernels' dot operand is), products are computed in fp32 and cast to the
input dtype.

W is dequantized one stripe of rows (about STRIPE_ELEMENTS weights) at a time, never whole, for the reason
fp8/reference.py gives: a whole fp32 W plus its expanded scales is gigabytes at 70B shapes, and CPU ranks keep
such freed chunks resident; a fixed-size stripe is reused from the heap call after call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llama_ft.nf4.format import NF4_CODE

GROUP = 64
"""Weights per absmax scale (bitsandbytes' blocksize 64 along a row)."""
STRIPE_ELEMENTS = 1 << 21
"""Weights dequantized at once (fp32): 8 MiB, about 24 MiB of transients with the codes and expanded scales."""

NF4_CODE_VALUES = tuple(NF4_CODE.tolist())
"""The 16 NormalFloat-4 values (fp32) indexed by code (format.NF4_CODE: bitsandbytes' get_4bit_type("nf4"))."""

_CODES: dict[torch.device, torch.Tensor] = {}


def code_table(device: torch.device | str) -> torch.Tensor:
    """format.NF4_CODE on `device`, made once per device."""
    device = torch.device(device)
    t = _CODES.get(device)
    if t is None:
        t = _CODES[device] = NF4_CODE.to(device)
    return t


def stripes(n: int, k: int) -> list[slice]:
    """Row ranges of W (N, K) of about STRIPE_ELEMENTS weights each."""
    rows = max(1, STRIPE_ELEMENTS // max(k, 1))
    return [slice(r, min(r + rows, n)) for r in range(0, n, rows)]


def dequantize_rows(packed: torch.Tensor, absmax: torch.Tensor, rows: slice, dtype: torch.dtype,
                    k: int | None = None) -> torch.Tensor:
    """W[rows] (len(rows), K) in `dtype` from packed (N, ceil(K/2)) uint8 and absmax (N, ceil(K/64)) fp32:
    code values times their scale in fp32, then cast. K defaults to 2 * packed.shape[1]."""
    k = 2 * packed.shape[1] if k is None else k
    p = packed[rows]
    codes = torch.stack((p >> 4, p & 0xF), dim=-1).reshape(p.shape[0], -1)[:, :k]
    w = code_table(packed.device)[codes.long()]
    w.mul_(absmax[rows].float().repeat_interleave(GROUP, dim=1)[:, :k])
    return w.to(dtype)


RowsFn = Callable[[slice, torch.dtype], torch.Tensor]
"""rows, dtype -> W[rows] (len(rows), K) decoded in that dtype."""


def stripe_forward(x: torch.Tensor, n: int, weight_rows: RowsFn, t: torch.Tensor | None, b: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
    """y (M, N) = x W^T + scaling * t B^T, in x.dtype: y[:, rows] = x W[rows]^T, W decoded stripe by stripe (in
    x.dtype, as the kernels' dot operand is), products in fp32."""
    left = x.float()
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for rows in stripes(n, x.shape[1]):
        y[:, rows] = left @ weight_rows(rows, x.dtype).float().T
    if t is not None:
        y.addmm_(t.float(), b.float().T, alpha=scaling)
    return y.to(x.dtype)


def stripe_dx(dy: torch.Tensor, k: int, weight_rows: RowsFn, u: torch.Tensor | None, a: torch.Tensor | None,
              scaling: float) -> torch.Tensor:
    """dx (M, K) = dy W + scaling * u A, in dy.dtype: the sum over stripes of dy[:, rows] W[rows]."""
    left = dy.float()
    dx = torch.zeros(dy.shape[0], k, dtype=torch.float32, device=dy.device)
    for rows in stripes(dy.shape[1], k):
        dx.addmm_(left[:, rows], weight_rows(rows, dy.dtype).float())
    if u is not None:
        dx.addmm_(u.float(), a.float(), alpha=scaling)
    return dx.to(dy.dtype)


def forward_ref(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, t: torch.Tensor | None,
                b: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """y (M, N) = x W^T + scaling * t B^T, in x.dtype, from the row layout."""
    k = x.shape[1]
    return stripe_forward(x, packed.shape[0], lambda rows, dt: dequantize_rows(packed, absmax, rows, dt, k), t, b,
                          scaling)


def dx_ref(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, u: torch.Tensor | None,
           a: torch.Tensor | None, scaling: float, k: int | None = None) -> torch.Tensor:
    """dx (M, K) = dy W + scaling * u A, in dy.dtype, from the row layout. K defaults to 2 * packed.shape[1]
    (give it for an odd K)."""
    k = 2 * packed.shape[1] if k is None else k
    return stripe_dx(dy, k, lambda rows, dt: dequantize_rows(packed, absmax, rows, dt, k), u, a, scaling)
