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

    def forward(self, x2, storage, t, b, scaling):
        if kernels.supports(self.k):
            packed, absmax = self._rows_layout(storage)
            if kernels.use_triton(x2):
                return kernels.forward_triton(x2.contiguous(), packed, absmax, t, b, scaling)
            return reference.forward_ref(x2, packed, absmax, t, b, scaling)
        packed, absmax = storage[0], storage[1].view(torch.float32)
        y = torch.empty(x2.shape[0], self.n, dtype=torch.float32, device=x2.device)
        left = x2.float()
        for rows in reference.stripes(self.n, self.k):
            y[:, rows] = left @ flat_rows(packed, absmax, self.n, self.k, rows, x2.dtype).float().T
        if t is not None:
            y.addmm_(t.float(), b.float().T, alpha=scaling)
        return y.to(x2.dtype)

    def dx(self, dy2, storage, u, a, scaling):
        if kernels.supports(self.k):
            packed, absmax = self._rows_layout(storage)
            if kernels.use_triton(dy2):
                return kernels.dx_triton(dy2.contiguous(), packed, absmax, u, a, scaling)
            return reference.dx_ref(dy2, packed, absmax, u, a, scaling)
        packed, absmax = storage[0], storage[1].view(torch.float32)
        dx = torch.zeros(dy2.shape[0], self.k, dtype=torch.float32, device=dy2.device)
        left = dy2.float()
        for rows in reference.stripes(self.n, self.k):
            dx.addmm_(left[:, rows], flat_rows(packed, absmax, self.n, self.k, rows, dy2.dtype).float())
        if u is not None:
            dx.addmm_(u.float(), a.float(), alpha=scaling)
        return dx.to(dy2.dtype)
