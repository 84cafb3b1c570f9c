"""Triton kernels for FP8 (e4m3, 128x128 block scales) frozen weights with a fused LoRA term.

    quantize:  W (N, K) -> q uint8 (N, K), s fp32 (ceil(N/128), ceil(K/128))
    forward:   y  = x W^T + s_lora * t B^T     tile (BLOCK_M, BLOCK_N) of y, loop over K
    dx:        dx = dy W  + s_lora * u A       tile (BLOCK_M, BLOCK_K) of dx, loop over N
t = x A^T and u = dy B are (M, r) and come in precomputed (tiny GEMMs); the kernels add their
up-projection into the same accumulator before the single store, so y / dx are written once.

Weight-only mode: e4m3 tiles widen exactly to the dot dtype (bf16 on a GPU), the tensor-core
dot runs on (x, q), and the block scale multiplies the fp32 partial product.
fp8-compute mode: the left operand tile is scaled per row over its 128 contraction elements,
rounded to e4m3, and the dot runs fp8 x fp8; both scales multiply the fp32 partial product.

Block-size rules: the contraction tile divides 128 (one weight scale per row per tile) and is
exactly 128 in fp8-compute mode (one activation scale per 1 x 128 tile).

Interpreter notes (TRITON_INTERPRET=1, CPU): tl.dot on bf16 multiplies raw bits, so DOT_DTYPE
is fp32 there; fp32 -> fp8 casts round wrongly, so values are first rounded onto the e4m3 grid
in fp32 arithmetic (`_round_e4m3`), after which the cast is exact on every backend.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False

from llama_ft.fp8.format import BLOCK, num_blocks


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter."""
    return HAS_TRITON and (t.is_cuda or interpreting())


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
    def _to_e4m3(v, s):
        """fp32 v / s rounded onto e4m3 and cast (the cast is then exact)."""
        r = tl.math.div_rn(v, s)
        r = tl.minimum(tl.maximum(r, -448.0), 448.0)
        return _round_e4m3(r).to(tl.float8e4nv)

    @triton.jit
    def _rows_to_e4m3(a):
        """fp8-compute activations: scale each row of a tile by absmax / 448, round onto e4m3.
        Returns (the e4m3 tile, the per-row scales)."""
        af = a.to(tl.float32)
        amax = tl.max(tl.abs(af), axis=1)
        sa = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
        return _to_e4m3(af, sa[:, None]), sa

    @triton.jit
    def _grouped_tile(pid, num_m, num_other, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program `pid`, in grouped order: GROUP_M row tiles sweep each
        column of weight tiles together while it is in L2."""
        width = GROUP_M * num_other
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

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
        q = _to_e4m3(w, s).to(tl.uint8, bitcast=True)
        tl.store(q_ptr + rn[:, None] * K + rk[None, :], q, mask=mask)
        tl.store(s_ptr + pid_n * NB_K + pid_k, s)

    @triton.jit
    def _fwd_kernel(
        x_ptr, q_ptr, s_ptr, t_ptr, b_ptr, y_ptr,
        M, N, K, R, scaling, NB_K,
        stride_xm, stride_xk, stride_tm, stride_tr, stride_bn, stride_br, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_LORA: tl.constexpr, FP8_COMPUTE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

        # int64 row indices: M x K and M x N pass 2^31 elements at long sequences on 405B shapes
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wq = tl.load(q_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            w8 = wq.to(tl.float8e4nv, bitcast=True)
            sw = tl.load(s_ptr + (rn // 128) * NB_K + k0 // 128, mask=n_ok, other=0.0)
            if FP8_COMPUTE:
                x8, sx = _rows_to_e4m3(x)
                acc += tl.dot(x8, tl.trans(w8)) * sx[:, None] * sw[None, :]
            else:
                acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w8.to(DOT_DTYPE))) * sw[None, :]
        if HAS_LORA:
            rr = tl.arange(0, BLOCK_R)
            r_ok = rr < R
            t = tl.load(t_ptr + rm[:, None] * stride_tm + rr[None, :] * stride_tr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            acc += scaling * tl.dot(t.to(DOT_DTYPE), tl.trans(b.to(DOT_DTYPE)))
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dx_kernel(
        dy_ptr, q_ptr, s_ptr, u_ptr, a_ptr, dx_ptr,
        M, N, K, R, scaling, NB_K,
        stride_dym, stride_dyn, stride_um, stride_ur, stride_ar, stride_ak, stride_dxm, stride_dxk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr, HAS_LORA: tl.constexpr, FP8_COMPUTE: tl.constexpr, DOT_DTYPE: tl.constexpr,
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
                         mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            wq = tl.load(q_ptr + nn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            w8 = wq.to(tl.float8e4nv, bitcast=True)
            sw = tl.load(s_ptr + (n0 // 128) * NB_K + kb)
            if FP8_COMPUTE:
                d8, sd = _rows_to_e4m3(dy)
                acc += tl.dot(d8, w8) * (sd[:, None] * sw)
            else:
                acc += tl.dot(dy.to(DOT_DTYPE), w8.to(DOT_DTYPE)) * sw
        if HAS_LORA:
            rr = tl.arange(0, BLOCK_R)
            r_ok = rr < R
            u = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc += scaling * tl.dot(u.to(DOT_DTYPE), a.to(DOT_DTYPE))
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])


def _dot_dtype(t: torch.Tensor):
    if interpreting():
        return tl.float32  # the interpreter's bf16/fp16 dot is wrong; fp32 holds bf16 and e4m3 exactly
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(t.dtype, tl.float32)


def _r_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _blocks(fp8_compute: bool, m: int) -> dict:
    """Tile sizes: small under the interpreter (cost is per program and op), tensor-core sized on a GPU."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=64 if not fp8_compute else 128, BLOCK_K=64 if not fp8_compute else 128,
                    GROUP_M=4, num_warps=4)
    bm = 64 if m <= 64 else 128
    return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128 if fp8_compute else 64, GROUP_M=8, num_warps=8, num_stages=3)


def quantize_fp8_triton(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    s = torch.empty(num_blocks(n), num_blocks(k), dtype=torch.float32, device=w.device)
    _quantize_kernel[(num_blocks(n), num_blocks(k))](w, q, s, n, k, w.stride(0), w.stride(1), num_blocks(k),
                                                     BLOCK_Q=BLOCK)
    return q, s


def forward_triton(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, t: torch.Tensor | None,
                   b: torch.Tensor | None, scaling: float, fp8_compute: bool = False, **blocks) -> torch.Tensor:
    """y (M, N) = x W^T + scaling * t B^T; x (M, K), q (N, K) uint8, t (M, r), b (N, r)."""
    m, k = x.shape
    n = q.shape[0]
    assert q.is_contiguous() and scales.is_contiguous()
    cfg = {**_blocks(fp8_compute, m), **blocks}
    assert BLOCK % cfg["BLOCK_K"] == 0 and (not fp8_compute or cfg["BLOCK_K"] == BLOCK)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    has_lora = t is not None
    r = t.shape[1] if has_lora else 1
    t_ = t if has_lora else x
    b_ = b if has_lora else x
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _fwd_kernel[grid](
        x, q, scales, t_, b_, y, m, n, k, r, float(scaling), scales.shape[1],
        x.stride(0), x.stride(1), t_.stride(0), t_.stride(1), b_.stride(0), b_.stride(1), y.stride(0), y.stride(1),
        BLOCK_R=_r_block(r), HAS_LORA=has_lora, FP8_COMPUTE=fp8_compute, DOT_DTYPE=_dot_dtype(x), **cfg,
    )
    return y


def dx_triton(dy: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, u: torch.Tensor | None,
              a: torch.Tensor | None, scaling: float, fp8_compute: bool = False, **blocks) -> torch.Tensor:
    """dx (M, K) = dy W + scaling * u A; dy (M, N), q (N, K) uint8, u (M, r), a (r, K)."""
    m, n = dy.shape
    k = q.shape[1]
    cfg = {**_blocks(fp8_compute, m), **blocks}
    # here the contraction runs over N: its tile must divide 128 (and be 128 for fp8 compute),
    # and the output's K tile must divide 128 so each tile has one weight scale
    cfg["BLOCK_N"], cfg["BLOCK_K"] = cfg["BLOCK_K"], min(cfg["BLOCK_N"], BLOCK)
    assert BLOCK % cfg["BLOCK_N"] == 0 and BLOCK % cfg["BLOCK_K"] == 0
    assert not fp8_compute or cfg["BLOCK_N"] == BLOCK
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    has_lora = u is not None
    r = u.shape[1] if has_lora else 1
    u_ = u if has_lora else dy
    a_ = a if has_lora else dy
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, cfg["BLOCK_K"]),)
    _dx_kernel[grid](
        dy, q, scales, u_, a_, dx, m, n, k, r, float(scaling), scales.shape[1],
        dy.stride(0), dy.stride(1), u_.stride(0), u_.stride(1), a_.stride(0), a_.stride(1), dx.stride(0), dx.stride(1),
        BLOCK_R=_r_block(r), HAS_LORA=has_lora, FP8_COMPUTE=fp8_compute, DOT_DTYPE=_dot_dtype(dy), **cfg,
    )
    return dx
