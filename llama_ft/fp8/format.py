"""FP8 storage format of frozen base weights, and its pure-PyTorch quantizer (the oracle).

Format (OCP FP8 e4m3, "e4m3fn": max 448, no infinities):
    W (N, K) real  ~=  q (N, K) e4m3  *  s[n // 128, k // 128]        s: (ceil(N/128), ceil(K/128)) fp32
    s = absmax(block) / 448  (1 for an all-zero block);  q = round_to_nearest_even(W / s)

One scale per 128x128 block serves both x @ W^T (forward) and dy @ W (input gradient).
q is stored as uint8 bytes and viewed as float8_e4m3fn where used: ZeRO-3 cannot all-gather
float8 dtypes over gloo and zero.Init upcasts floating tensors, but uint8 passes untouched.
For the same reason the fp32 scales are stored as their raw bytes, uint8 (nb_n, nb_k * 4).
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def num_blocks(n: int, block: int = BLOCK) -> int:
    return math.ceil(n / block)


def quantize_fp8_reference(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise e4m3 quantization in PyTorch: returns (q uint8 (N, K), scales fp32 (nb_n, nb_k)).

    Works one 128-row stripe at a time, so the fp32 scratch is 128 x K, not N x K.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb_n, nb_k = num_blocks(n, block), num_blocks(k, block)
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(nb_n, nb_k, dtype=torch.float32, device=w.device)
    for bn in range(nb_n):
        rows = slice(bn * block, min((bn + 1) * block, n))
        stripe = torch.zeros(block, nb_k * block, dtype=torch.float32, device=w.device)
        stripe[: rows.stop - rows.start, :k] = w[rows].float()
        blocks = stripe.view(block, nb_k, block)
        amax = blocks.abs().amax(dim=(0, 2))
        s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        v = (blocks / s[None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
        q[rows] = v.to(FP8).view(torch.uint8).view(block, nb_k * block)[: rows.stop - rows.start, :k]
        scales[bn] = s
    return q, scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block: int = BLOCK) -> torch.Tensor:
    """W = q * s, expanded blockwise: (N, K) in `dtype` (computed in fp32, then cast)."""
    n, k = q.shape
    s = scales.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return (q.view(FP8).float() * s).to(dtype)


def quantize_activation_reference(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """fp8-compute mode's activation rounding, per 1 x 128 tile along the last dim, dequantized back.

    x (M, K) -> x' (M, K) fp32 with x' = e4m3(x / s_row_tile) * s_row_tile, s = absmax(tile) / 448.
    """
    m, k = x.shape
    nb = num_blocks(k, block)
    xp = torch.zeros(m, nb * block, dtype=torch.float32, device=x.device)
    xp[:, :k] = x.float()
    tiles = xp.view(m, nb, block)
    amax = tiles.abs().amax(dim=2, keepdim=True)
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float()
    return (q * s).view(m, nb * block)[:, :k]


def scales_to_bytes(scales: torch.Tensor) -> torch.Tensor:
    """fp32 (nb_n, nb_k) -> uint8 (nb_n, nb_k * 4), the same bytes."""
    return scales.contiguous().view(torch.uint8)


def scales_from_bytes(raw: torch.Tensor) -> torch.Tensor:
    """uint8 (nb_n, nb_k * 4) -> fp32 (nb_n, nb_k), the same bytes."""
    return raw.contiguous().view(torch.float32)
