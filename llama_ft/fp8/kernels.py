"""Triton kernels for FP8 (e4m3, 128x128 block scales) frozen weights with a fused LoRA term.

    quantize:  W (N, K) -> q uint8 (N, K), s fp32 (ceil(N/128), ceil(K/128))
    quantize rows (fp8 compute): a (M, K) -> a8 uint8 (M, K), sa fp32 (M, ceil(K/128)), one scale per 1 x 128
    forward:   y  = x W^T + s_lora * t B^T     tile (BLOCK_M, BLOCK_N) of y, loop over K
    dx:        dx = dy W  + s_lora * u A       tile (BLOCK_M, BLOCK_K) of dx, loop over N
t = x A^T and u = dy B are (M, r) and come in precomputed (tiny GEMMs); the kernels add their
up-projection into the same accumulator before the single store, so y / dx are written once
(r <= FUSED_R_MAX; a larger r adds its term with one cuBLAS addmm after the kernel).

Weight-only mode: e4m3 tiles widen exactly to the dot dtype (bf16 on a GPU), the tensor-core
dot runs on (x, q), and the block scale multiplies the fp32 partial product. On GPUs without an
e4m3 type (compute capability < 8.9: A100, A6000) the bytes are decoded with integer operations
(INT_DECODE, `_e4m3_to_bf16`); from 8.9 on the hardware converts them.
fp8-compute mode (8.9+): the left operand (x, or dy) is quantized once, per 1 x 128 tile of its
contraction dim, by `_quantize_rows_kernel`; the GEMM's dot runs fp8 x fp8 and both scales multiply
the fp32 partial product.

Block-size rules: both tiles of W divide 128 (one weight scale per tile, loaded as a scalar) and the
contraction tile is exactly 128 in fp8-compute mode (one activation scale per 1 x 128 tile).

Tiles: `tile_configs` gives, per kernel, mode, GPU generation and size of M, a few configurations that
compile without register spills for that generation (`llama-ft kernels --compile` shows each one's
registers, spills and shared memory). The first is the default; on a GPU, triton.autotune picks among
them once per (power-of-two bucket of M, N, K, r) and `tuned_configs()` says what it picked.

Interpreter notes (TRITON_INTERPRET=1, CPU): tl.dot on bf16 multiplies raw bits, so DOT_DTYPE
is fp32 there; fp32 -> fp8 casts round wrongly, so values are rounded onto the e4m3 grid in fp32
arithmetic (`_round_e4m3`) and their bytes assembled with integer operations (`_e4m3_bits`), which
is exact on every backend and needs no e4m3 type (sm_80/86 have none).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False

from llama_ft.errors import UserError
from llama_ft.fp8.format import BLOCK, num_blocks
from llama_ft.gpus import fp8_compute_refusal, int_decode

FUSED_R_MAX = 64
"""The largest LoRA rank whose up-projection is fused into the kernels' output tile (BLOCK_R 16..64)."""
INTERPRETER_CAPABILITY = (9, 0)
"""The GPU generation the dispatcher assumes under the interpreter (tests pass `capability=` to try others)."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter."""
    return HAS_TRITON and (t.is_cuda or interpreting())


def autotuning() -> bool:
    """triton.autotune on a GPU unless LLAMA_FT_AUTOTUNE=0 (then every launch takes the default tiles)."""
    return not interpreting() and os.environ.get("LLAMA_FT_AUTOTUNE", "1") != "0"


if HAS_TRITON:

    @triton.jit
    def _round_e4m3(v):
        """Nearest e4m3 value (ties to even) of fp32 v, |v| <= 448, computed exactly in fp32."""
        bits = v.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6)  # below 2^-6 e4m3 is subnormal with a fixed step of 2^-9
        step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
        t = tl.abs(v) / step  # exact: division by a power of two
        r = (t + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds to an integer, ties to even
        return tl.where(bits < 0, -r, r) * step  # the sign bit, so -0.0 stays -0.0 as in torch

    @triton.jit
    def _e4m3_bits(r):
        """The e4m3fn byte (uint8) of fp32 r, which is already on the e4m3 grid: integer operations only, so
        that quantization compiles where Triton has no e4m3 type (compute capability < 8.9).
            normal (|r| >= 2^-6): sign | (fp32 exponent - 120) << 3 | top 3 mantissa bits
            subnormal:            sign | |r| / 2^-9   (an integer 0..7, exact)"""
        bits = r.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = bits & 0x7FFFFFFF
        e = a >> 23
        normal = ((e - 120) << 3) | ((a >> 20) & 7)
        sub = (tl.abs(r) * 512.0).to(tl.int32)
        return (tl.where(e >= 121, normal, sub) | sign).to(tl.uint8)

    @triton.jit
    def _e4m3_to_bf16(b):
        """e4m3fn bytes (uint8 tile) -> the same values as bf16, exactly, with integer operations.
            normal (exponent field e >= 1): 2^(e-7) (1 + m/8) is bf16 exponent e + 120, mantissa m << 4
            subnormal (e = 0):              m 2^-9, m = 0..7: exact in fp32, whose top 16 bits are its bf16
            S.1111.111:                     NaN (e4m3fn has no infinities)"""
        v = b.to(tl.int32)
        mag = v & 0x7F
        bits = (mag + (120 << 3)) << 4
        sub = (mag.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True) >> 16
        bits = tl.where(mag < 8, sub, bits)
        bits = tl.where(mag == 0x7F, 0x7FC0, bits)
        bits = bits | ((v & 0x80) << 8)
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _widen(wq, DOT_DTYPE: tl.constexpr, INT_DECODE: tl.constexpr):
        """uint8 e4m3 tile -> DOT_DTYPE, exact (every e4m3 value is a bf16, fp16 and fp32 value)."""
        if INT_DECODE:
            return _e4m3_to_bf16(wq).to(DOT_DTYPE)
        else:
            return wq.to(tl.float8e4nv, bitcast=True).to(DOT_DTYPE)

    @triton.jit
    def _grouped_tile(pid, num_m, num_other, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program `pid`, in grouped order: GROUP_M row tiles sweep each
        column of weight tiles together while it is in L2."""
        width = GROUP_M * num_other
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @triton.jit
    def _lora_tile(t_ptr, b_ptr, rm, rn, m_ok, n_ok, R, stride_tm, stride_tr, stride_bn, stride_br,
                   BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr):
        """t[rm, :R] b[rn, :R]^T, (BLOCK_M, BLOCK_N) in fp32: the LoRA term of an output tile, shared by every
        quantized format's kernels. Forward: t = x A^T (M, r), b = B (N, r). Input gradient: t = dy B (M, r) and
        b = A read transposed (rows: the output's K columns; stride_bn = A's column stride)."""
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr, mask=m_ok[:, None] & r_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0)
        return tl.dot(t.to(DOT_DTYPE), tl.trans(b.to(DOT_DTYPE)))

    @triton.jit
    def _quantize_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_wn, stride_wk, NB_K, BLOCK_Q: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = (pid_n * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
        rk = pid_k * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0)
        w = w.to(tl.float32)
        amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
        s = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
        r = _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(w, s), -448.0), 448.0))
        tl.store(q_ptr + rn[:, None] * K + rk[None, :], _e4m3_bits(r), mask=mask)
        tl.store(s_ptr + pid_n * NB_K + pid_k, s)

    @triton.jit
    def _quantize_rows_kernel(a_ptr, q_ptr, s_ptr, M, K, stride_am, stride_ak, NB_K, BLOCK_M: tl.constexpr,
                              BLOCK_Q: tl.constexpr):
        """fp8-compute activations, once before the GEMM: a (M, K) -> q uint8 (M, K) e4m3 and s fp32
        (M, ceil(K/128)), one scale per 1 x 128 tile: s = absmax / 448 (1 for an all-zero tile), q = e4m3(a / s).
        A pass of its own so that the GEMM's K loop only loads, multiplies and scales: quantizing each x tile
        inside it held the tile in fp32 registers next to two accumulators (spills at 255 registers), and
        redid the rounding for every column tile of the output."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rk = pid_k * BLOCK_Q + tl.arange(0, BLOCK_Q)
        m_ok = rm < M
        mask = m_ok[:, None] & (rk[None, :] < K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(a), axis=1)
        s = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
        r = _round_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(a, s[:, None]), -448.0), 448.0))
        tl.store(q_ptr + rm[:, None] * K + rk[None, :], _e4m3_bits(r), mask=mask)
        tl.store(s_ptr + rm * NB_K + pid_k, s, mask=m_ok)

    @triton.jit
    def _fwd_kernel(
        x_ptr, sx_ptr, q_ptr, s_ptr, t_ptr, b_ptr, y_ptr,
        M, N, K, R, scaling, NB_K,
        stride_xm, stride_xk, stride_tm, stride_tr, stride_bn, stride_br, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_LORA: tl.constexpr, FP8_COMPUTE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        INT_DECODE: tl.constexpr,
    ):
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

        # int64 row indices: M x K and M x N pass 2^31 elements at long sequences on 405B shapes
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        n_block = (pid_n * BLOCK_N) // 128
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0)
            wq = tl.load(q_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            # one weight scale for the whole tile (BLOCK_N divides 128): a scalar, where a vector over the tile's
            # columns cost up to 32 registers a thread in the wgmma accumulator layout
            sw = tl.load(s_ptr + n_block * NB_K + k0 // 128)
            if FP8_COMPUTE:  # x holds e4m3 bytes, sx one scale per row of this 1 x 128 tile
                sx = tl.load(sx_ptr + rm * NB_K + k0 // 128, mask=m_ok, other=0.0)
                acc += tl.dot(x.to(tl.float8e4nv, bitcast=True), tl.trans(wq.to(tl.float8e4nv, bitcast=True))) \
                    * (sx * sw)[:, None]
            else:
                acc += tl.dot(x.to(DOT_DTYPE), tl.trans(_widen(wq, DOT_DTYPE, INT_DECODE))) * sw
        if HAS_LORA:
            acc += scaling * _lora_tile(t_ptr, b_ptr, rm, rn, m_ok, n_ok, R, stride_tm, stride_tr, stride_bn,
                                        stride_br, BLOCK_R, DOT_DTYPE)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dx_kernel(
        dy_ptr, sdy_ptr, q_ptr, s_ptr, u_ptr, a_ptr, dx_ptr,
        M, N, K, R, scaling, NB_K, NB_N,
        stride_dym, stride_dyn, stride_um, stride_ur, stride_ar, stride_ak, stride_dxm, stride_dxk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_LORA: tl.constexpr, FP8_COMPUTE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        INT_DECODE: tl.constexpr,
    ):
        pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.arange(0, BLOCK_N).to(tl.int64)
        m_ok = rm < M
        k_ok = rk < K
        kb = (pid_k * BLOCK_K) // 128
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            nn = n0 + rn
            n_ok = nn < N
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + nn[None, :] * stride_dyn,
                         mask=m_ok[:, None] & n_ok[None, :], other=0)
            wq = tl.load(q_ptr + nn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            sw = tl.load(s_ptr + (n0 // 128) * NB_K + kb)
            if FP8_COMPUTE:  # dy holds e4m3 bytes, sd one scale per row of this 1 x 128 tile
                sd = tl.load(sdy_ptr + rm * NB_N + n0 // 128, mask=m_ok, other=0.0)
                acc += tl.dot(dy.to(tl.float8e4nv, bitcast=True), wq.to(tl.float8e4nv, bitcast=True)) \
                    * (sd * sw)[:, None]
            else:
                acc += tl.dot(dy.to(DOT_DTYPE), _widen(wq, DOT_DTYPE, INT_DECODE)) * sw
        if HAS_LORA:
            acc += scaling * _lora_tile(u_ptr, a_ptr, rm, rk, m_ok, k_ok, R, stride_um, stride_ur, stride_ak,
                                        stride_ar, BLOCK_R, DOT_DTYPE)
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# tiles


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> Any:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m), num_warps=warps,
                         num_stages=stages)


def generation(cap: tuple[int, int]) -> str:
    """The tile family of a GPU: sm80 (mma, no fp8), sm89 (mma + fp8: Ada and consumer Blackwell), sm90
    (wgmma), sm100 (tcgen05)."""
    if cap >= (10, 0) and cap < (11, 0):
        return "sm100"
    if cap == (9, 0):
        return "sm90"
    return "sm80" if int_decode(cap) else "sm89"


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per (kernel, mode, generation): (for M > 64, for M <= 64), the
# default first. In dx, BLOCK_N is the contraction tile and BLOCK_K the output's columns. Every entry compiles
# with zero spill stores for bf16, fp16 and fp32, with LoRA at r 16..64 and without, on each architecture of its
# generation (`llama-ft kernels --compile all`, triton 3.9; the table is in docs/fp8.md). What it ruled out:
#   - 128 x 256 output tiles: 280-1,400 B of spills on every generation.
#   - fp8 compute with 4 warps on a 128 x 128 tile: ~800-1,100 B (two fp32 accumulators over 128 threads).
#   - a vector of weight scales across the tile's columns (now one scalar per tile): it alone made the 128 x 128
#     tiles spill 8-300 B on sm_80/86 (weight-only) and sm_89/90 (fp8 compute).
#   - 32-deep K tiles on 128 x 128 (sm_80, sm_89): ptxas settles at 128 registers and spills 4-8 B there.
#   - sm80 (integer decode): 128 x 128 x 64 is spill-free but at 242-255 registers on sm_86; the default takes
#     128 x 64 x 64 (136-172 registers) and leaves the wider tile to autotune.
#   - 64 x 64 x 64 on 4 warps (sm_89 forward, sm_80/86 dx at M <= 64): 8-16 B; on 8 warps: none.
# fp32 inputs (tf32 dots) hold twice the bytes per tile: their contraction tile is halved down to 32 (`_halve`).
_WO_SMALL = [[64, 128, 32, 4, 4], [64, 128, 32, 8, 3]]
_TILES: dict[tuple[str, str, str], tuple[list[list[int]], list[list[int]]]] = {
    ("fwd", "weight-only", "sm80"): ([[128, 64, 64, 8, 3], [128, 128, 64, 8, 3]], _WO_SMALL),
    ("fwd", "weight-only", "sm89"): ([[128, 128, 64, 8, 3], [128, 64, 64, 8, 3]], _WO_SMALL),
    ("fwd", "weight-only", "sm90"): ([[128, 128, 64, 8, 3], [128, 128, 64, 8, 4], [128, 64, 64, 8, 3]], _WO_SMALL),
    ("dx", "weight-only", "*"): ([[128, 64, 128, 8, 3], [128, 32, 128, 8, 4], [128, 64, 64, 8, 3]],
                                 [[64, 64, 128, 8, 3], [64, 64, 64, 8, 3]]),
    ("fwd", "fp8-compute", "sm89"): ([[128, 128, 128, 8, 3], [128, 64, 128, 8, 3]], [[64, 64, 128, 4, 4]]),
    ("fwd", "fp8-compute", "sm90"): ([[128, 128, 128, 8, 3], [128, 128, 128, 8, 4], [128, 64, 128, 8, 3]],
                                     [[64, 128, 128, 4, 4], [64, 64, 128, 4, 4]]),
    ("dx", "fp8-compute", "sm89"): ([[128, 128, 64, 8, 3], [64, 128, 64, 4, 4]], [[64, 128, 64, 4, 4]]),
    ("dx", "fp8-compute", "sm90"): ([[128, 128, 128, 8, 3], [128, 128, 128, 8, 4], [128, 128, 64, 8, 3]],
                                    [[64, 128, 64, 4, 4]]),
}


def _halve(kernel: str, t: list[int]) -> list[int]:
    """The tile with its contraction dimension halved, to 32 at least: BLOCK_K of the forward, BLOCK_N of dx."""
    bm, bn, bk, warps, stages = t
    return [bm, bn, max(32, bk // 2), warps, stages] if kernel == "fwd" else [bm, max(32, bn // 2), bk, warps, stages]


def tile_configs(kernel: str, fp8_compute: bool, cap: tuple[int, int], m: int,
                 dtype: torch.dtype = torch.bfloat16) -> list[Any]:
    """The tile configurations of `kernel` ("fwd" or "dx") for this mode, GPU generation, M and input dtype: the
    default first (see _TILES for why each is there)."""
    if interpreting():  # cost is per program and op: small grids of 64-wide tiles
        red = 128 if fp8_compute else 64
        if kernel == "fwd":
            return [_cfg(32, 64 if not fp8_compute else 128, red, 4, 1, group_m=4)]
        return [_cfg(32, red, 64 if not fp8_compute else 128, 4, 1, group_m=4)]
    mode = "fp8-compute" if fp8_compute else "weight-only"
    gen = generation(cap)
    gen = "sm90" if gen == "sm100" else gen  # Blackwell takes Hopper's tiles (spill-free on sm_100 too)
    large, small = _TILES.get((kernel, mode, gen)) or _TILES[(kernel, mode, "*")]
    tiles = small if m <= 64 else large
    if dtype.itemsize == 4 and not fp8_compute:
        tiles = [_halve(kernel, t) for t in tiles]
    return [_cfg(*t) for t in tiles]


def _bucket(m: int) -> int:
    """Autotune's M key: the next power of two (64 at least), so that batches of varying length share tiles."""
    return max(64, triton.next_power_of_2(m))


# ---------------------------------------------------------------------------------------------------------------
# launches


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the dispatcher makes it: the kernel, its arguments (tensors, ints, floats) in order,
    the compile-time arguments other than the tiles, the tile configurations it may run with (the first is the
    default), and the grid as a function of the chosen tiles. `llama-ft kernels --compile` builds the same
    launches on meta tensors and compiles each configuration."""

    kernel: Any
    args: tuple
    constexprs: dict[str, Any]
    configs: list[Any]
    grid: Callable[[dict], tuple[int, ...]]
    mode: str
    capability: tuple[int, int]
    m_bucket: int


_TUNERS: dict[tuple, Any] = {}


def run(launch: Launch) -> None:
    """Launch with the default tiles, or through triton.autotune (one tuner per kernel, mode, generation and M
    bucket; it keys on N, K, r and the dtypes within it)."""
    if len(launch.configs) == 1 or not autotuning():
        cfg = launch.configs[0]
        launch.kernel[launch.grid(cfg.kwargs)](*launch.args, **launch.constexprs, **cfg.all_kwargs())
        return
    key = (launch.kernel.__name__, launch.mode, launch.capability, launch.m_bucket)
    tuner = _TUNERS.get(key)
    if tuner is None:
        tuner = _TUNERS[key] = triton.autotune(configs=launch.configs, key=["N", "K", "R"])(launch.kernel)
    tuner[launch.grid](*launch.args, **launch.constexprs)


def tuned_configs() -> list[dict[str, Any]]:
    """What autotune picked so far: one row per (kernel, mode, generation, M bucket, N, K, r, dtypes)."""
    rows = []
    for (name, mode, cap, bucket), tuner in _TUNERS.items():
        for key, cfg in tuner.cache.items():
            rows.append({"kernel": name, "mode": mode, "capability": list(cap), "m_bucket": bucket,
                         "key": [str(k) for k in key], "config": {**cfg.kwargs, "num_warps": cfg.num_warps,
                                                                  "num_stages": cfg.num_stages}})
    return rows


def _dot_dtype(t: torch.Tensor):
    if interpreting():
        return tl.float32  # the interpreter's bf16/fp16 dot is wrong; fp32 holds bf16 and e4m3 exactly
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(t.dtype, tl.float32)


def _r_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def device_capability(t: torch.Tensor) -> tuple[int, int]:
    if t.is_cuda:
        return torch.cuda.get_device_capability(t.device)
    return INTERPRETER_CAPABILITY


def _check_mode(fp8_compute: bool, cap: tuple[int, int], t: torch.Tensor) -> None:
    if fp8_compute:
        name = torch.cuda.get_device_name(t.device) if t.is_cuda else f"the GPU assumed ({cap})"
        refusal = fp8_compute_refusal(name, cap)
        if refusal:
            raise UserError(refusal)


def _tiles(configs: list[Any], tiles: dict | None) -> list[Any]:
    """Explicit tiles (tests, benchmarks) replace the choice: one configuration, the default's warps and stages
    unless given."""
    if not tiles:
        return configs
    base = configs[0]
    t = dict(tiles)
    warps, stages = t.pop("num_warps", base.num_warps), t.pop("num_stages", base.num_stages)
    return [triton.Config({**base.kwargs, **t}, num_warps=warps, num_stages=stages)]


def lora_operands(left: torch.Tensor | None, right: torch.Tensor | None,
                  out: torch.Tensor) -> tuple[bool, int, torch.Tensor, torch.Tensor]:
    """(HAS_LORA, r, left, right) for a launch: the LoRA operands (t and B, or u and A; both or neither), or `out`
    standing in for both (never read with HAS_LORA False) and r = 1. Shared by every quantized format's launches."""
    if left is None:
        return False, 1, out, out
    return True, left.shape[1], left, right


def fwd_launch(x: torch.Tensor, sx: torch.Tensor | None, q: torch.Tensor, scales: torch.Tensor,
               t: torch.Tensor | None, b: torch.Tensor | None, y: torch.Tensor, scaling: float, fp8_compute: bool,
               cap: tuple[int, int], tiles: dict | None = None) -> Launch:
    """The forward launch writing y (M, N) = x W^T [+ scaling * t B^T]; t (M, r) and b (N, r) or both None.
    fp8 compute: x is (M, K) e4m3 bytes and sx (M, ceil(K/128)) their scales (`quantize_rows_launch`)."""
    m, k = x.shape
    n = q.shape[0]
    has_lora, r, t_, b_ = lora_operands(t, b, y)
    sx_ = sx if fp8_compute else scales  # not read in weight-only mode
    configs = _tiles(tile_configs("fwd", fp8_compute, cap, m, y.dtype), tiles)
    for c in configs:  # one weight scale per tile: both tiles of W divide 128
        assert BLOCK % c.kwargs["BLOCK_K"] == 0 and BLOCK % c.kwargs["BLOCK_N"] == 0
        assert not fp8_compute or c.kwargs["BLOCK_K"] == BLOCK
    args = (x, sx_, q, scales, t_, b_, y, m, n, k, r, float(scaling), scales.shape[1],
            x.stride(0), x.stride(1), t_.stride(0), t_.stride(1), b_.stride(0), b_.stride(1), y.stride(0), y.stride(1))
    constexprs = dict(BLOCK_R=_r_block(r), HAS_LORA=has_lora, FP8_COMPUTE=fp8_compute, DOT_DTYPE=_dot_dtype(y),
                      INT_DECODE=int_decode(cap))
    return Launch(_fwd_kernel, args, constexprs, configs,
                  lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
                  "fp8-compute" if fp8_compute else "weight-only", cap, _bucket(m))


def dx_launch(dy: torch.Tensor, sdy: torch.Tensor | None, q: torch.Tensor, scales: torch.Tensor,
              u: torch.Tensor | None, a: torch.Tensor | None, dx: torch.Tensor, scaling: float, fp8_compute: bool,
              cap: tuple[int, int], tiles: dict | None = None) -> Launch:
    """The input-gradient launch writing dx (M, K) = dy W [+ scaling * u A]; u (M, r) and a (r, K) or both None.
    fp8 compute: dy is (M, N) e4m3 bytes and sdy (M, ceil(N/128)) their scales."""
    m, n = dy.shape
    k = q.shape[1]
    has_lora, r, u_, a_ = lora_operands(u, a, dx)
    sdy_ = sdy if fp8_compute else scales  # not read in weight-only mode
    configs = _tiles(tile_configs("dx", fp8_compute, cap, m, dx.dtype), tiles)
    for c in configs:
        # the contraction runs over N: its tile divides 128 (and is 128 for fp8 compute), and the output's
        # K tile divides 128 so each tile has one weight scale
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert BLOCK % bn == 0 and BLOCK % bk == 0 and (not fp8_compute or bn == BLOCK)
    args = (dy, sdy_, q, scales, u_, a_, dx, m, n, k, r, float(scaling), scales.shape[1], num_blocks(n),
            dy.stride(0), dy.stride(1), u_.stride(0), u_.stride(1), a_.stride(0), a_.stride(1), dx.stride(0),
            dx.stride(1))
    constexprs = dict(BLOCK_R=_r_block(r), HAS_LORA=has_lora, FP8_COMPUTE=fp8_compute, DOT_DTYPE=_dot_dtype(dx),
                      INT_DECODE=int_decode(cap))
    return Launch(_dx_kernel, args, constexprs, configs,
                  lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),),
                  "fp8-compute" if fp8_compute else "weight-only", cap, _bucket(m))


def quantize_launch(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, cap: tuple[int, int]) -> Launch:
    n, k = w.shape
    args = (w, q, s, n, k, w.stride(0), w.stride(1), num_blocks(k))
    return Launch(_quantize_kernel, args, dict(BLOCK_Q=BLOCK), [triton.Config({}, num_warps=4, num_stages=1)],
                  lambda meta: (num_blocks(n), num_blocks(k)), "other", cap, 0)


ROWS_BLOCK_M = 32
"""Rows per program of the activation quantizer (one 1 x 128 tile per row): 32 x 128 fp32 over 4 warps."""


def quantize_rows_launch(a: torch.Tensor, q: torch.Tensor, s: torch.Tensor, cap: tuple[int, int]) -> Launch:
    m, k = a.shape
    args = (a, q, s, m, k, a.stride(0), a.stride(1), num_blocks(k))
    return Launch(_quantize_rows_kernel, args, dict(BLOCK_M=ROWS_BLOCK_M, BLOCK_Q=BLOCK),
                  [triton.Config({}, num_warps=4, num_stages=1)],
                  lambda meta: (triton.cdiv(m, ROWS_BLOCK_M), num_blocks(k)), "fp8-compute", cap, 0)


# ---------------------------------------------------------------------------------------------------------------
# entry points


def quantize_rows_triton(a: torch.Tensor, cap: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """a (M, K) -> (e4m3 bytes uint8 (M, K), fp32 scales (M, ceil(K/128))): fp8 compute's 1 x 128 tiles."""
    m, k = a.shape
    q = torch.empty(m, k, dtype=torch.uint8, device=a.device)
    s = torch.empty(m, num_blocks(k), dtype=torch.float32, device=a.device)
    run(quantize_rows_launch(a, q, s, cap or device_capability(a)))
    return q, s


def quantize_fp8_triton(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    s = torch.empty(num_blocks(n), num_blocks(k), dtype=torch.float32, device=w.device)
    run(quantize_launch(w, q, s, device_capability(w)))
    return q, s


def _fused(t: torch.Tensor | None) -> bool:
    return t is not None and t.shape[1] <= FUSED_R_MAX


def forward_triton(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, t: torch.Tensor | None,
                   b: torch.Tensor | None, scaling: float, fp8_compute: bool = False, *,
                   tiles: dict | None = None, capability: tuple[int, int] | None = None) -> torch.Tensor:
    """y (M, N) = x W^T + scaling * t B^T; x (M, K), q (N, K) uint8, t (M, r), b (N, r).
    `capability` overrides the GPU generation (the interpreter assumes INTERPRETER_CAPABILITY)."""
    assert q.is_contiguous() and scales.is_contiguous()
    cap = capability or device_capability(x)
    _check_mode(fp8_compute, cap, x)
    y = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
    fused = _fused(t)
    x_, sx = quantize_rows_triton(x, cap) if fp8_compute else (x, None)
    run(fwd_launch(x_, sx, q, scales, t if fused else None, b if fused else None, y, scaling, fp8_compute, cap,
                   tiles))
    if t is not None and not fused:
        y.addmm_(t, b.T, alpha=scaling)
    return y


def dx_triton(dy: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, u: torch.Tensor | None,
              a: torch.Tensor | None, scaling: float, fp8_compute: bool = False, *,
              tiles: dict | None = None, capability: tuple[int, int] | None = None) -> torch.Tensor:
    """dx (M, K) = dy W + scaling * u A; dy (M, N), q (N, K) uint8, u (M, r), a (r, K)."""
    cap = capability or device_capability(dy)
    _check_mode(fp8_compute, cap, dy)
    dx = torch.empty(dy.shape[0], q.shape[1], dtype=dy.dtype, device=dy.device)
    fused = _fused(u)
    dy_, sdy = quantize_rows_triton(dy, cap) if fp8_compute else (dy, None)
    run(dx_launch(dy_, sdy, q, scales, u if fused else None, a if fused else None, dx, scaling, fp8_compute, cap,
                  tiles))
    if u is not None and not fused:
        dx.addmm_(u, a, alpha=scaling)
    return dx
