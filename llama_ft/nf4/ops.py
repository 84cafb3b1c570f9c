"""The NF4 format's two GEMMs (`NF4Ops`) for the shared quantized-base autograd (llama_ft/quant/autograd.py).

    storage = (packed uint8 (ceil(N*K/2),) codes over the flattened W, absmax_bytes uint8 (ceil(N*K/64) * 4,))
    forward   y  = x W^T + s t B^T
    dx        dx = dy W + s u A

When K % 64 == 0 (every Llama projection) no block spans two rows, so the flat storage is, byte for byte, the
row layout the kernels read: packed (N, K/2), absmax (N, K/64); Triton on CUDA / under the interpreter
(kernels.py), else the PyTorch reference (reference.py). Otherwise (a block can span two rows) W is decoded
stripe by stripe from block-aligned flat ranges (format.dequantize_nf4) and multiplied in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_ft.nf4 import kernels, reference
from llama_ft.nf4.format import BLOCK, dequantize_nf4


def flat_rows(packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, rows: slice,
              dtype: torch.dtype) -> torch.Tensor:
    """W[rows] (len(rows), K) in `dtype` from the flat storage, whatever K: the blocks covering the rows'
    elements [rows.start * K, rows.stop * K) are decoded and the rows cut out."""
    e0, e1 = rows.start * k, rows.stop * k
    b0, b1 = e0 // BLOCK, -(-e1 // BLOCK)
    s0, s1 = b0 * BLOCK, min(b1 * BLOCK, n * k)
    w = dequantize_nf4(packed[s0 // 2: -(-s1 // 2)], absmax[b0:b1], (s1 - s0,), dtype)
    return w[e0 - s0: e1 - s0].view(rows.stop - rows.start, k)


@dataclass(frozen=True)
class NF4Ops:
    n: int
    k: int

    def _rows_layout(self, storage: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        packed, absmax_bytes = storage
        return packed.view(self.n, self.k // 2), absmax_bytes.view(torch.float32).view(self.n, self.k // BLOCK)

    def _flat_rows(self, storage: tuple[torch.Tensor, ...]) -> reference.RowsFn:
        packed, absmax = storage[0], storage[1].view(torch.float32)
        return lambda rows, dtype: flat_rows(packed, absmax, self.n, self.k, rows, dtype)

    def forward(self, x2, storage, t, b, scaling):
        if not kernels.supports(self.k):
            return reference.stripe_forward(x2, self.n, self._flat_rows(storage), t, b, scaling)
        gemm = kernels.forward_triton if kernels.use_triton(x2) else reference.forward_ref
        return gemm(x2.contiguous(), *self._rows_layout(storage), t, b, scaling)

    def dx(self, dy2, storage, u, a, scaling):
        if not kernels.supports(self.k):
            return reference.stripe_dx(dy2, self.k, self._flat_rows(storage), u, a, scaling)
        gemm = kernels.dx_triton if kernels.use_triton(dy2) else reference.dx_ref
        return gemm(dy2.contiguous(), *self._rows_layout(storage), u, a, scaling)
