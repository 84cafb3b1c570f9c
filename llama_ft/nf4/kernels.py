"""Triton kernels for NF4 (QLoRA 4-bit) frozen weights with a fused LoRA term.

    forward:   y  = x W^T + s_lora * t B^T     tile (BLOCK_M, BLOCK_N) of y, loop over K
    dx:        dx = dy W  + s_lora * u A       tile (BLOCK_M, BLOCK_K) of dx, loop over N
    W[n, k] = NF4[code(n, k)] * absmax[n, k // 64]  from packed uint8 (N, K/2) and absmax fp32 (N, K/64)
t = x A^T and u = dy B are (M, r) and come in precomputed (tiny GEMMs); the kernels add their up-projection
into the same accumulator before the single store (r <= FUSED_R_MAX; a larger r adds its term with one addmm
after the kernel), as the FP8 kernels do.

The decode runs inside the GEMM's loop, on the weight tile (BLOCK_N rows x 64 columns, one absmax group):
load the packed tile (BLOCK_N, 32) bytes, split the nibbles (high = even column, low = odd: bitsandbytes'
order), look both up in the 16-entry code book (a gather from a 64-byte table that stays in L1), interleave
them (tl.join + reshape: (BLOCK_N, 32, 2) -> (BLOCK_N, 64)), multiply each row by its absmax in fp32, cast to
the activation dtype and hand the tile to tl.dot. No dequantized copy of W exists in memory.

Block-size rule: the weight tile's K extent (BLOCK_K: the forward's contraction tile, dx's output columns) is
one or two absmax groups, 64 or 128, and divides K, so the K loop and dx's column tiles need no masks: each row
of the tile has one scale (a vector of BLOCK_N) or two (picked per byte with a select). K % 64 == 0 is required
(every Llama projection); a 128 becomes 64 where 128 does not divide K (`_fit_k`). N and M are masked.

Tiles: `tile_configs` gives, per kernel and size of M, a few configurations, the default first; on a GPU
triton.autotune picks among them once per (power-of-two bucket of M, N, K, r) through the FP8 family's
`run` (shared: Launch, run, tuned_configs, use_triton). `llama-ft kernels --compile` compiles every one.

Interpreter (TRITON_INTERPRET=1, CPU): DOT_DTYPE is fp32 there (its bf16 dot multiplies raw bits), so the
tile is not rounded to bf16 before the dot under the interpreter; on a GPU it is.
"""

from __future__ import annotations

from typing import Any

import torch

from llama_ft.fp8.kernels import (  # shared with the FP8 family: dispatch, launches, autotune, tile order
    HAS_TRITON,
    Launch,
    _bucket,
    _dot_dtype,
    _r_block,
    _tiles,
    device_capability,
    interpreting,
    lora_operands,
    run,
    tuned_configs,
    use_triton,
)
from llama_ft.nf4.reference import GROUP, code_table

if HAS_TRITON:
    import triton
    import triton.language as tl

    from llama_ft.fp8.kernels import _grouped_tile, _lora_tile

__all__ = ["FUSED_R_MAX", "dx_launch", "dx_triton", "forward_triton", "fwd_launch", "supports", "tile_configs",
           "tuned_configs", "use_triton"]

FUSED_R_MAX = 64
"""The largest LoRA rank whose up-projection is fused into the kernels' output tile (BLOCK_R 16..64)."""
MODE = "nf4"
"""The mode label of these launches (FP8's are weight-only and fp8-compute) in autotune keys and the compile check;
`_mode` adds "-k64" where 128 does not divide K, whose tile set differs (one autotuner per set)."""


if HAS_TRITON:

    @triton.jit
    def _nf4_tile(q_ptr, s_ptr, code_ptr, rn, n_ok, k0, K, NB_K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_DTYPE: tl.constexpr):
        """W[rn, k0:k0+BLOCK_K] (BLOCK_N, BLOCK_K) in DOT_DTYPE from the packed bytes; k0 is a multiple of BLOCK_K
        (64 or 128: one or two absmax groups a row) and the tile lies inside K; rows past N read as 0."""
        half = tl.arange(0, BLOCK_K // 2)
        p = tl.load(q_ptr + rn[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=n_ok[:, None], other=0)
        p = p.to(tl.int32)
        hi = tl.load(code_ptr + (p >> 4))  # element 2j of the pair
        lo = tl.load(code_ptr + (p & 0xF))  # element 2j + 1
        s = tl.load(s_ptr + rn * NB_K + k0 // 64, mask=n_ok, other=0.0)[:, None]
        if BLOCK_K == 128:  # bytes 32..63 of the tile are the next group: a select, not a reshape of the scales
            s2 = tl.load(s_ptr + rn * NB_K + k0 // 64 + 1, mask=n_ok, other=0.0)[:, None]
            s = tl.where(half[None, :] < 32, s, s2)
            w = tl.reshape(tl.join(hi * s, lo * s), (BLOCK_N, BLOCK_K))
        else:  # one group: scaled after the interleave (scaling before it made Triton 3.9 fail on the fp32 dx for
            # sm_90/100: "Illegal shared layout" in TritonGPUOptimizeDotOperands)
            w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K)) * s
        return w.to(DOT_DTYPE)

    @triton.jit
    def _nf4_fwd_kernel(
        x_ptr, q_ptr, s_ptr, code_ptr, t_ptr, b_ptr, y_ptr,
        M, N, K, R, scaling, NB_K,
        stride_xm, stride_xk, stride_tm, stride_tr, stride_bn, stride_br, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_LORA: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

        # int64 row indices: M x K and M x N pass 2^31 elements at long sequences on 405B shapes
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # K % BLOCK_K == 0 (the launch's rule): no column mask
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk, mask=m_ok[:, None],
                        other=0.0)
            w = _nf4_tile(q_ptr, s_ptr, code_ptr, rn, n_ok, k0, K, NB_K, BLOCK_N, BLOCK_K, DOT_DTYPE)
            acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w))
        if HAS_LORA:
            acc += scaling * _lora_tile(t_ptr, b_ptr, rm, rn, m_ok, n_ok, R, stride_tm, stride_tr, stride_bn,
                                        stride_br, BLOCK_R, DOT_DTYPE)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _nf4_dx_kernel(
        dy_ptr, q_ptr, s_ptr, code_ptr, u_ptr, a_ptr, dx_ptr,
        M, N, K, R, scaling, NB_K,
        stride_dym, stride_dyn, stride_um, stride_ur, stride_ar, stride_ak, stride_dxm, stride_dxk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_LORA: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):
        pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        k0 = pid_k * BLOCK_K  # the output's columns: whole absmax groups, inside K (K % BLOCK_K == 0)
        rk = k0 + tl.arange(0, BLOCK_K)
        rn = tl.arange(0, BLOCK_N).to(tl.int64)
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + rn
            n_ok = nn < N
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + nn[None, :] * stride_dyn,
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            w = _nf4_tile(q_ptr, s_ptr, code_ptr, nn, n_ok, k0, K, NB_K, BLOCK_N, BLOCK_K, DOT_DTYPE)
            acc += tl.dot(dy.to(DOT_DTYPE), w)
        if HAS_LORA:  # the output's columns are whole (K % BLOCK_K == 0): every rk is inside K
            acc += scaling * _lora_tile(u_ptr, a_ptr, rm, rk, m_ok, rk < K, R, stride_um, stride_ur, stride_ak,
                                        stride_ar, BLOCK_R, DOT_DTYPE)
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# tiles


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> Any:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m), num_warps=warps,
                         num_stages=stages)


def generation(cap: tuple[int, int]) -> str:
    """wgmma (sm_90, and sm_100 which takes Hopper's tiles as the FP8 family does) or mma (sm_80/86/89/120: 99 KB
    of shared memory on all but sm_80)."""
    return "wgmma" if cap == (9, 0) or (10, 0) <= cap < (11, 0) else "mma"


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per (kernel, generation, 16- or 32-bit inputs): (for M > 64, for
# M <= 64), the default first. In dx, BLOCK_N is the contraction tile and BLOCK_K the output's columns. BLOCK_K is
# one or two absmax groups (64, 128); where K % 128 != 0 a 128 becomes 64 (`_fit_k`). Each set compiles with zero
# spill stores for its inputs, LoRA at r 16..64 and without, on each architecture of its generation (`llama-ft
# kernels --compile all`, triton 3.9; BENCHMARKS.md). What compiling candidates ruled out (bf16 unless said):
#   - forward 128 x 128 x 128 on mma: 137 KB of shared memory (sm_86/89/120 have 99 KB), 156-416 B of spills on
#     sm_80/86; on sm_90 it is spill-free (217-254 registers, 169 KB) and autotune may take it there.
#   - forward 128 x 256 x 64: 28-1,560 B everywhere; forward 64 x 128 x 128 on 4 warps: 80-712 B.
#   - forward 128 x 64 x 64 on sm_80: 4 B at r 32.  dx 64 x 64 x 64 on 4 warps (sm_80): 28 B; on 8 warps none.
#   - dx 64 x 64 x 128 on sm_80: 16 B at r 64.
#   - fp32 (tf32 dots) on mma: 128 x 128 forward 36-48 B, 64 x 128 forward (M <= 64) 108 B, dx with a 128-row
#     contraction tile 24-88 B; hence the smaller fp32 sets there. On sm_100 the fp32 forward's 128 x 128 and
#     64 x 128 tiles spill 4-20 B (ptxas stops at 128 registers), as does 64 x 64 x 64 on 8 warps (16 B).
#   - at ptxas's 128-register ceiling: dx 128 x 64 x 64 (sm_86/89, 8 B) and forward 64 x 64 x 64 on 4 warps
#     (sm_86/89/120, 4 B).
_TILES: dict[tuple[str, str, int], tuple[list[list[int]], list[list[int]]]] = {
    ("fwd", "mma", 2): ([[128, 128, 64, 8, 3], [128, 128, 64, 8, 4]], [[64, 128, 64, 4, 4], [64, 64, 64, 8, 4]]),
    ("fwd", "wgmma", 2): ([[128, 128, 64, 8, 3], [128, 128, 128, 8, 3], [128, 64, 128, 8, 3], [128, 128, 64, 8, 4]],
                          [[64, 128, 64, 4, 4], [64, 64, 128, 4, 4], [64, 128, 128, 8, 3]]),
    ("dx", "mma", 2): ([[128, 64, 128, 8, 3], [128, 32, 128, 8, 4], [128, 128, 64, 8, 3]],
                       [[64, 64, 64, 8, 4], [64, 32, 128, 4, 4], [64, 128, 64, 8, 3]]),
    ("dx", "wgmma", 2): ([[128, 64, 128, 8, 3], [128, 128, 64, 8, 3], [128, 64, 64, 8, 3], [128, 32, 128, 8, 4]],
                         [[64, 64, 128, 8, 3], [64, 64, 64, 8, 4], [64, 128, 64, 8, 3]]),
    ("fwd", "mma", 4): ([[128, 64, 64, 8, 3], [64, 64, 64, 8, 4]], [[64, 64, 64, 8, 4]]),
    ("fwd", "wgmma", 4): ([[128, 64, 64, 8, 3]], [[64, 64, 64, 4, 4]]),
    ("dx", "mma", 4): ([[128, 32, 64, 8, 3], [64, 64, 64, 4, 4]], [[64, 64, 64, 4, 4]]),
    ("dx", "wgmma", 4): ([[128, 64, 64, 8, 3], [128, 128, 64, 8, 3]], [[64, 64, 64, 4, 4], [64, 128, 64, 4, 3]]),
}


def tile_configs(kernel: str, cap: tuple[int, int], m: int, dtype: torch.dtype = torch.bfloat16) -> list[Any]:
    """The tile configurations of `kernel` ("fwd" or "dx") for this GPU generation, M and input dtype: the default
    first (see _TILES)."""
    if interpreting():  # cost is per program and op: small grids
        return [_cfg(32, 64, 64, 4, 1, group_m=4)]
    large, small = _TILES[(kernel, generation(cap), 4 if dtype.itemsize == 4 else 2)]
    return [_cfg(*t) for t in (small if m <= 64 else large)]


def _fit_k(configs: list[Any], k: int) -> list[Any]:
    """The configurations with BLOCK_K 64 where 128 does not divide K (the kernels have no column masks)."""
    out = []
    for c in configs:
        if k % c.kwargs["BLOCK_K"]:
            c = triton.Config({**c.kwargs, "BLOCK_K": GROUP}, num_warps=c.num_warps, num_stages=c.num_stages)
        if all(c.kwargs != o.kwargs or (c.num_warps, c.num_stages) != (o.num_warps, o.num_stages) for o in out):
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------------------------
# launches


def supports(k: int) -> bool:
    """Whether the kernels take a weight of K columns (whole absmax groups); the dispatcher sends others to the
    reference."""
    return k % GROUP == 0


def _mode(k: int) -> str:
    return MODE if k % 128 == 0 else f"{MODE}-k64"


def _check(packed: torch.Tensor, absmax: torch.Tensor, k: int) -> None:
    assert k % GROUP == 0, f"the NF4 kernels need K % {GROUP} == 0, got K = {k}"
    assert packed.dtype == torch.uint8 and packed.shape[1] * 2 == k and packed.is_contiguous(), packed.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (packed.shape[0], k // GROUP), absmax.shape
    assert absmax.is_contiguous()


def fwd_launch(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               t: torch.Tensor | None, b: torch.Tensor | None, y: torch.Tensor, scaling: float,
               cap: tuple[int, int], tiles: dict | None = None) -> Launch:
    """The forward launch writing y (M, N) = x W^T [+ scaling * t B^T]; t (M, r) and b (N, r) or both None.
    code: the 16 fp32 NF4 values on x's device."""
    m, k = x.shape
    n = packed.shape[0]
    _check(packed, absmax, k)
    has_lora, r, t_, b_ = lora_operands(t, b, y)
    configs = _fit_k(_tiles(tile_configs("fwd", cap, m, y.dtype), tiles), k)
    assert all(c.kwargs["BLOCK_K"] in (64, 128) for c in configs)
    args = (x, packed, absmax, code, t_, b_, y, m, n, k, r, float(scaling), absmax.shape[1],
            x.stride(0), x.stride(1), t_.stride(0), t_.stride(1), b_.stride(0), b_.stride(1), y.stride(0), y.stride(1))
    constexprs = dict(BLOCK_R=_r_block(r), HAS_LORA=has_lora, DOT_DTYPE=_dot_dtype(y))
    return Launch(_nf4_fwd_kernel, args, constexprs, configs,
                  lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
                  _mode(k), cap, _bucket(m))


def dx_launch(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
              u: torch.Tensor | None, a: torch.Tensor | None, dx: torch.Tensor, scaling: float,
              cap: tuple[int, int], tiles: dict | None = None) -> Launch:
    """The input-gradient launch writing dx (M, K) = dy W [+ scaling * u A]; u (M, r) and a (r, K) or both None."""
    m, n = dy.shape
    k = dx.shape[1]
    _check(packed, absmax, k)
    has_lora, r, u_, a_ = lora_operands(u, a, dx)
    configs = _fit_k(_tiles(tile_configs("dx", cap, m, dx.dtype), tiles), k)
    assert all(c.kwargs["BLOCK_K"] in (64, 128) for c in configs)
    args = (dy, packed, absmax, code, u_, a_, dx, m, n, k, r, float(scaling), absmax.shape[1],
            dy.stride(0), dy.stride(1), u_.stride(0), u_.stride(1), a_.stride(0), a_.stride(1), dx.stride(0),
            dx.stride(1))
    constexprs = dict(BLOCK_R=_r_block(r), HAS_LORA=has_lora, DOT_DTYPE=_dot_dtype(dx))
    return Launch(_nf4_dx_kernel, args, constexprs, configs,
                  lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),),
                  _mode(k), cap, _bucket(m))


# ---------------------------------------------------------------------------------------------------------------
# entry points


def _fused(t: torch.Tensor | None) -> bool:
    return t is not None and t.shape[1] <= FUSED_R_MAX


def forward_triton(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, t: torch.Tensor | None,
                   b: torch.Tensor | None, scaling: float, *, tiles: dict | None = None) -> torch.Tensor:
    """y (M, N) = x W^T + scaling * t B^T; x (M, K), packed (N, K/2) uint8, absmax (N, K/64) fp32, t (M, r),
    b (N, r). K % 64 == 0."""
    y = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype, device=x.device)
    fused = _fused(t)
    run(fwd_launch(x, packed, absmax, code_table(x.device), t if fused else None, b if fused else None, y, scaling,
                   device_capability(x), tiles))
    if t is not None and not fused:
        y.addmm_(t, b.T, alpha=scaling)
    return y


def dx_triton(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, u: torch.Tensor | None,
              a: torch.Tensor | None, scaling: float, *, tiles: dict | None = None) -> torch.Tensor:
    """dx (M, K) = dy W + scaling * u A; dy (M, N), packed (N, K/2) uint8, absmax (N, K/64) fp32, u (M, r),
    a (r, K). K % 64 == 0."""
    dx = torch.empty(dy.shape[0], packed.shape[1] * 2, dtype=dy.dtype, device=dy.device)
    fused = _fused(u)
    run(dx_launch(dy, packed, absmax, code_table(dy.device), u if fused else None, a if fused else None, dx, scaling,
                  device_capability(dy), tiles))
    if u is not None and not fused:
        dx.addmm_(u, a, alpha=scaling)
    return dx
