"""NF4 (QLoRA 4-bit) PyTorch reference and Triton kernels (TRITON_INTERPRET=1 on CPU), against float64 math on a
weight decoded independently: bitsandbytes' dequantize_4bit of the same bytes, and the code book in float64."""

from __future__ import annotations

import pytest
import torch

from llama_ft.nf4 import kernels, reference

cpu_kernels = pytest.mark.skipif(not kernels.interpreting(), reason="CPU tensors run kernels only when interpreted")


def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _code_book() -> torch.Tensor:
    """bitsandbytes' NF4 code book in float64; where bitsandbytes is missing (the GPU image), our constant, which
    test_code_book_and_decode_equal_bitsandbytes checks against it wherever it is installed."""
    try:
        import bitsandbytes.functional as F
    except (ImportError, RuntimeError):
        return torch.tensor(reference.NF4_CODE_VALUES, dtype=torch.float64)
    return F.get_4bit_type("nf4", device="cpu").double()


def _float64_weight(packed: torch.Tensor, absmax: torch.Tensor, k: int) -> torch.Tensor:
    """W (N, K) float64, element by element from the storage's definition: column c is byte c // 2 of the row, its
    high nibble when c is even, low when odd; times absmax[:, c // 64]."""
    book = _code_book()
    col = torch.arange(k)
    byte = packed[:, col // 2].long()
    code = torch.where(col % 2 == 0, byte // 16, byte % 16)
    return book[code] * absmax[:, col // 64].double()


def _storage(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bytes (every byte is a valid pair of codes) and positive scales of very different sizes."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, generator=g)
    absmax = torch.rand(n, (k + 63) // 64, generator=g) * 0.1 * 10 ** torch.randint(-1, 2, (n, 1), generator=g)
    return packed, absmax + 1e-3


def _case(m: int, n: int, k: int, r: int, dtype: torch.dtype, seed: int):
    packed, absmax = _storage(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, dy = torch.randn(m, k, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
    a, b = torch.randn(r, k, generator=g).to(dtype), torch.randn(n, r, generator=g).to(dtype)
    return packed, absmax, x, dy, a, b


def _want(x, dy, a, b, w, scaling, lora):
    """float64 y = x W^T + s (x A^T) B^T and dx = dy W + s (dy B) A, from the dtype-rounded inputs."""
    x, dy, a, b = x.double(), dy.double(), a.double(), b.double()
    y, dx = x @ w.T, dy @ w
    if lora:
        y, dx = y + scaling * (x @ a.T) @ b.T, dx + scaling * (dy @ b) @ a
    return y, dx


def test_code_book_and_decode_equal_bitsandbytes():
    """Bytes and scales from bitsandbytes' quantize_4bit (blocks of 64 along rows of K % 64 == 0): our decode and
    the float64 one equal its dequantize_4bit exactly, so the nibble order and the code book are bitsandbytes'."""
    F = _bnb()
    assert torch.equal(torch.tensor(reference.NF4_CODE_VALUES), F.get_4bit_type("nf4", device="cpu"))
    torch.manual_seed(0)
    n, k = 6, 192
    w = torch.randn(n, k) * torch.rand(n, 1)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False,
                               quant_storage=torch.uint8)
    packed, absmax = q.reshape(n, k // 2), state.absmax.reshape(n, k // 64)
    want = F.dequantize_4bit(q, state)
    assert torch.equal(reference.dequantize_rows(packed, absmax, slice(0, n), torch.float32), want)
    assert torch.equal(_float64_weight(packed, absmax, k).float(), want)
    assert torch.equal(reference.dequantize_rows(packed, absmax, slice(2, 5), torch.bfloat16), want[2:5].bfloat16())


@pytest.mark.parametrize("k", [192, 100, 99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(k, dtype, monkeypatch):
    """Forward and dx with and without LoRA; K a multiple of 64, not (a partial last group), and odd (the last
    byte's low nibble unused). A small stripe makes the reference work over several stripes."""
    monkeypatch.setattr(reference, "STRIPE_ELEMENTS", 3 * k)
    m, n, r, s = 9, 11, 4, 0.75
    packed, absmax, x, dy, a, b = _case(m, n, k, r, dtype, seed=k)
    w = _float64_weight(packed, absmax, k)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: W and the outputs rounded to 8 bits
    for lora in (True, False):
        want_y, want_dx = _want(x, dy, a, b, w, s, lora)
        t, u = (x @ a.T, dy @ b) if lora else (None, None)
        y = reference.forward_ref(x, packed, absmax, t, b if lora else None, s)
        dx = reference.dx_ref(dy, packed, absmax, u, a if lora else None, s, k=k)
        assert y.dtype == dx.dtype == dtype and y.shape == (m, n) and dx.shape == (m, k)
        assert _rel(y, want_y) < tol and _rel(dx, want_dx) < tol, (lora, _rel(y, want_y), _rel(dx, want_dx))


@cpu_kernels
@pytest.mark.parametrize("m,n,k,r,tiles", [
    (70, 96, 192, 8, None),            # M and N not multiples of the tiles (32 x 64)
    (5, 40, 128, 72, None),            # r > 64: the LoRA term added after the kernel
    (70, 136, 256, 16, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=2)),  # two absmax groups a tile row
    (33, 70, 320, 16, dict(BLOCK_K=128)),  # 128 does not divide K: the launch takes 64
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_float64(m, n, k, r, tiles, dtype):
    packed, absmax, x, dy, a, b = _case(m, n, k, r, dtype, seed=m + n)
    w = _float64_weight(packed, absmax, k)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the interpreter truncates fp32 -> bf16
    for lora in (True, False):
        want_y, want_dx = _want(x, dy, a, b, w, 0.5, lora)
        t, u = (x @ a.T, dy @ b) if lora else (None, None)
        y = kernels.forward_triton(x, packed, absmax, t, b if lora else None, 0.5, tiles=tiles)
        dx = kernels.dx_triton(dy, packed, absmax, u, a if lora else None, 0.5, tiles=tiles)
        assert y.dtype == dx.dtype == dtype and y.shape == (m, n) and dx.shape == (m, k)
        assert _rel(y, want_y) < tol and _rel(dx, want_dx) < tol, (lora, _rel(y, want_y), _rel(dx, want_dx))


def test_kernels_refuse_k_not_a_multiple_of_64():
    """The dispatcher routes such weights to the reference (kernels.supports); a direct launch is refused."""
    assert kernels.supports(128) and not kernels.supports(100)
    packed, absmax = _storage(8, 96, seed=0)
    x = torch.randn(4, 96)
    with pytest.raises(AssertionError, match="K % 64"):
        kernels.fwd_launch(x, packed, absmax, reference.code_table("cpu"), None, None, torch.empty(4, 8), 1.0, (9, 0))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,r", [(4096, 8192, 8192, 64), (4096, 28672, 8192, 16),
                                     (2048 + 7, 1024 + 56, 4096 + 64, 64), (33, 4096, 4096, 16)])
def test_gpu_kernels_match_reference(m, n, k, r):
    """Training shapes (70B q and gate projections), ragged M and N with K % 128 != 0, a small batch: the autotuned
    kernels against the reference on the same GPU (W rounded to bf16 in both; products accumulated in fp32)."""
    torch.manual_seed(0)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    absmax = torch.rand(n, k // 64, device="cuda") * 0.05 + 1e-3
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    a = (torch.randn(r, k, device="cuda") * 0.01).to(torch.bfloat16)
    b = (torch.randn(n, r, device="cuda") * 0.01).to(torch.bfloat16)
    t, u = x @ a.T, dy @ b
    y = kernels.forward_triton(x, packed, absmax, t, b, 2.0)
    assert _rel(y, reference.forward_ref(x, packed, absmax, t, b, 2.0)) <= 5e-3
    dx = kernels.dx_triton(dy, packed, absmax, u, a, 2.0)
    assert _rel(dx, reference.dx_ref(dy, packed, absmax, u, a, 2.0)) <= 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_every_tile_configuration_matches_float64(dtype):
    """Each configuration autotune may pick (large and small M), in every input dtype, against float64."""
    torch.manual_seed(0)
    n, k, r = 1024 + 56, 2048, 16
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    absmax = torch.rand(n, k // 64, device="cuda") * 0.05 + 1e-3
    w = _float64_weight(packed.cpu(), absmax.cpu(), k).cuda()
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3  # fp32 runs TF32 dots
    for m in (512 + 3, 40):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        dy = torch.randn(m, n, device="cuda", dtype=dtype)
        a = (torch.randn(r, k, device="cuda") * 0.05).to(dtype)
        b = (torch.randn(n, r, device="cuda") * 0.05).to(dtype)
        want_y, want_dx = _want(x, dy, a, b, w, 2.0, True)
        for which, want in (("fwd", want_y), ("dx", want_dx)):
            for cfg in kernels.tile_configs(which, torch.cuda.get_device_capability(), m, dtype):
                tiles = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                if which == "fwd":
                    got = kernels.forward_triton(x, packed, absmax, x @ a.T, b, 2.0, tiles=tiles)
                else:
                    got = kernels.dx_triton(dy, packed, absmax, dy @ b, a, 2.0, tiles=tiles)
                assert _rel(got, want) <= tol, (which, m, tiles, _rel(got, want))


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("cap", [(8, 0), (9, 0)])
def test_gpu_tile_sets_fit_k(cap, monkeypatch):
    """The GPU tile sets (what autotune picks among): where 128 does not divide K, every weight tile is one absmax
    group (the kernels have no column masks) and the launch has a mode of its own, so that a tuner made for
    K % 128 == 0 is never handed such a K."""
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    code = torch.empty(16, device="meta")
    for k, wide in ((8192, True), (8192 + 64, False)):
        packed = torch.empty(256, k // 2, dtype=torch.uint8, device="meta")
        absmax = torch.empty(256, k // 64, device="meta")
        x, dy = torch.empty(4096, k, dtype=torch.bfloat16, device="meta"), torch.empty(4096, 256, device="meta")
        y, dx = torch.empty(4096, 256, dtype=torch.bfloat16, device="meta"), torch.empty(4096, k, device="meta")
        launches = [kernels.fwd_launch(x, packed, absmax, code, None, None, y, 1.0, cap),
                    kernels.dx_launch(dy.bfloat16(), packed, absmax, code, None, None, dx.bfloat16(), 1.0, cap)]
        blocks = {c.kwargs["BLOCK_K"] for ln in launches for c in ln.configs}
        assert blocks == ({64, 128} if wide else {64}), (k, cap, blocks)
        assert {ln.mode for ln in launches} == {"nf4" if wide else "nf4-k64"}
