"""FP8 format, PyTorch reference, Triton kernels (TRITON_INTERPRET=1 on CPU) and autograd,
each against an independent float64 computation."""

from __future__ import annotations

import pytest
import torch

from llama_ft.errors import UserError
from llama_ft.fp8 import (
    FP8LoRALinear,
    dequantize_fp8,
    fp8_lora_linear,
    kernels,
    quantize_activation_reference,
    quantize_fp8_reference,
    reference,
    scales_from_bytes,
    scales_to_bytes,
)
from llama_ft.lora import LoraSpec

if kernels.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _e4m3_roundtrip_kernel(b_ptr, decoded_ptr, value_ptr, encoded_ptr):
        """All 256 bytes through the integer decoder (bf16, stored widened to fp32), and the fp32 e4m3 values
        through the integer encoder."""
        i = tl.arange(0, 256)
        tl.store(decoded_ptr + i, kernels._e4m3_to_bf16(tl.load(b_ptr + i)).to(tl.float32))
        tl.store(encoded_ptr + i, kernels._e4m3_bits(tl.load(value_ptr + i)))

SHAPES = [(1, 1), (127, 129), (130, 200), (256, 384), (64, 300)]
E4M3_GRID = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
E4M3_GRID = torch.unique(E4M3_GRID[torch.isfinite(E4M3_GRID)])
cpu_kernels = pytest.mark.skipif(not kernels.interpreting(), reason="CPU tensors run kernels only when interpreted")


def _nearest_e4m3(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest e4m3 grid value of each float64 element, and whether it was an exact tie."""
    d = (v.reshape(-1, 1) - E4M3_GRID.reshape(1, -1)).abs()
    best, idx = d.sort(dim=1)
    tie = (best[:, 1] - best[:, 0]).abs() < 1e-12
    return E4M3_GRID[idx[:, 0]].reshape(v.shape), tie.reshape(v.shape)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_reference_against_float64(shape, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.03).to(dtype)
    if shape[0] > 1:
        w[: min(shape[0], 128) // 2] *= 40  # blocks of very different ranges
    q, s = quantize_fp8_reference(w)
    nb = ((shape[0] + 127) // 128, (shape[1] + 127) // 128)
    assert q.dtype == torch.uint8 and q.shape == shape and s.shape == nb and s.dtype == torch.float32
    wd = w.double()
    for bn in range(nb[0]):
        for bk in range(nb[1]):
            blk = wd[bn * 128:(bn + 1) * 128, bk * 128:(bk + 1) * 128]
            assert s[bn, bk].item() == pytest.approx(blk.abs().max().item() / 448.0, rel=1e-7)
    scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    # the format is defined on the IEEE fp32 quotient W / s; the rounding of it is checked in float64
    want, tie = _nearest_e4m3((w.float() / scale).double().clamp(-448, 448))
    scale = scale.double()
    got = q.view(torch.float8_e4m3fn).double()
    assert torch.equal(got[~tie], want[~tie])  # round to nearest (ties are left to the even rule)
    err = (dequantize_fp8(q, s, torch.float64) - wd).abs()
    assert (err <= torch.maximum(wd.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)).all()


def test_zero_block_and_scale_bytes():
    w = torch.zeros(130, 260)
    w[129, 259] = 3.0
    q, s = quantize_fp8_reference(w)
    assert s[0, 0] == 1.0 and (q[:128, :128] == 0).all()
    assert s[1, 2] == 3.0 / 448
    assert torch.equal(scales_from_bytes(scales_to_bytes(s)), s)
    assert scales_to_bytes(s).dtype == torch.uint8 and scales_to_bytes(s).shape == (2, 12)


@cpu_kernels
@pytest.mark.parametrize("shape", SHAPES + [(256, 130)])
def test_triton_quantize_matches_torch_bit_for_bit(shape):
    torch.manual_seed(1)
    w = (torch.randn(shape) * torch.rand(shape) * 2).to(torch.bfloat16)
    w[:1, :3] = 0
    w[-1, :4] = -0.0  # the sign of zero survives
    q_ref, s_ref = quantize_fp8_reference(w)
    q, s = kernels.quantize_fp8_triton(w)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
def test_e4m3_integer_decode_and_encode_are_exact_for_all_256_bytes():
    """sm_80/86 decode e4m3 bytes with integer operations: every byte, NaNs and -0.0 included, must give what
    torch's own float8_e4m3fn gives; the quantizer's integer encoder must give each finite value's byte back."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = byte.view(torch.float8_e4m3fn).float()  # torch's cast: the independent reference
    finite = torch.isfinite(want)
    values = torch.where(finite, want, torch.zeros(()))
    decoded = torch.empty(256, device=device)
    encoded = torch.empty(256, dtype=torch.uint8, device=device)
    _e4m3_roundtrip_kernel[(1,)](byte.to(device), decoded, values.to(device), encoded)
    decoded, encoded = decoded.cpu(), encoded.cpu()
    assert torch.equal(decoded.isnan(), ~finite) and (~finite).sum() == 2  # 0x7F and 0xFF
    assert torch.equal(decoded[finite], want[finite])
    assert torch.equal(torch.signbit(decoded[finite]), torch.signbit(want[finite]))  # 0x80 is -0.0
    assert torch.equal(encoded[finite], byte[finite])


def test_activation_quantization_is_per_1x128_tile():
    torch.manual_seed(2)
    x = torch.randn(3, 300, dtype=torch.float64)
    x[1, 128:256] *= 1000
    xq = quantize_activation_reference(x)
    for tile in (slice(0, 128), slice(128, 256), slice(256, 300)):
        s = x[:, tile].abs().amax(dim=1, keepdim=True) / 448
        assert ((xq[:, tile] - x[:, tile]).abs() <= torch.maximum(x[:, tile].abs() * 2**-4, s * 2**-10) + 1e-9).all()


def _case(m, n, k, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # block scales that differ by up to 2^12, so a scale-indexing slip cannot hide in the tolerance
    spread = 2.0 ** torch.randint(-6, 7, ((n + 127) // 128, (k + 127) // 128), generator=g).float()
    w = torch.randn(n, k, generator=g) * 0.05 * spread.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    q, s = quantize_fp8_reference(w)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) * 0.1).to(dtype)
    b = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    return q, s, x, a, b, dy


@pytest.mark.parametrize("fp8_compute", [False, True])
@pytest.mark.parametrize("stripe", [None, 1])  # 1: W dequantized 128 rows at a time, the last stripe partial
def test_reference_matches_float64_math(fp8_compute, stripe, monkeypatch):
    if stripe:
        monkeypatch.setattr(reference, "STRIPE_ELEMENTS", stripe)
    q, s, x, a, b, dy = _case(37, 300, 200, 8, torch.float32)
    assert len(reference.stripes(*q.shape)) == (3 if stripe else 1)
    wd = dequantize_fp8(q, s, torch.float64)
    xd = quantize_activation_reference(x).double() if fp8_compute else x.double()
    t = x @ a.T
    y = reference.forward_ref(x, q, s, t, b, 2.0, fp8_compute)
    y_ref = xd @ wd.T + 2.0 * t.double() @ b.double().T
    # fp32 sums over K = 200: the error scales with the largest output (block scales span 2^12)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6 * y_ref.abs().max().item())
    u = dy @ b
    dyd = quantize_activation_reference(dy).double() if fp8_compute else dy.double()
    dx = reference.dx_ref(dy, q, s, u, a, 2.0, fp8_compute)
    dx_ref = dyd @ wd + 2.0 * u.double() @ a.double()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-6 * dx_ref.abs().max().item())
    if fp8_compute:  # fp8 compute stays close to the exact product
        assert _rel(y, x.double() @ wd.T + 2.0 * t.double() @ b.double().T) < 5e-2


GPU_TILES = dict(BLOCK_M=128, GROUP_M=8, num_warps=8)  # a GPU-sized row tile, under the interpreter


def _gpu_tiles(fp8_compute: bool) -> tuple[dict, dict]:
    """(forward, dx) tiles in each kernel's own names: the contraction tile is 128 for fp8 compute."""
    red = 128 if fp8_compute else 64
    return dict(GPU_TILES, BLOCK_N=128, BLOCK_K=red), dict(GPU_TILES, BLOCK_N=red, BLOCK_K=128)


@cpu_kernels
@pytest.mark.parametrize("m,n,k,r,gpu_tiles", [(33, 130, 200, 8, False), (16, 64, 128, 16, False),
                                               (5, 257, 96, 4, False), (130, 300, 260, 16, True)])
@pytest.mark.parametrize("mode,dtype", [("weight-only", torch.float32), ("weight-only", torch.bfloat16),
                                        ("weight-only-int", torch.bfloat16), ("fp8-compute", torch.float32),
                                        ("fp8-compute", torch.bfloat16)])
def test_triton_kernels_match_reference(m, n, k, r, gpu_tiles, mode, dtype):
    """Both dispatch paths of weight-only mode (the hardware e4m3 conversion of 8.9+, the integer decode of
    sm_80/86: its bytes alone differ, so one dtype) and fp8 compute, against the PyTorch reference (itself checked
    against float64 above)."""
    fp8_compute = mode == "fp8-compute"
    cap = (8, 0) if mode == "weight-only-int" else (9, 0)
    q, s, x, a, b, dy = _case(m, n, k, r, dtype, seed=m)
    t, u = x @ a.T, dy @ b
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the interpreter truncates fp32 -> bf16
    fwd_tiles, dx_tiles = _gpu_tiles(fp8_compute) if gpu_tiles else (None, None)
    for lora in (True, False):
        y = kernels.forward_triton(x, q, s, t if lora else None, b if lora else None, 0.5, fp8_compute,
                                   tiles=fwd_tiles, capability=cap)
        y_ref = reference.forward_ref(x, q, s, t if lora else None, b if lora else None, 0.5, fp8_compute)
        assert y.dtype == dtype and _rel(y, y_ref) < tol
        dx = kernels.dx_triton(dy, q, s, u if lora else None, a if lora else None, 0.5, fp8_compute,
                               tiles=dx_tiles, capability=cap)
        dx_ref = reference.dx_ref(dy, q, s, u if lora else None, a if lora else None, 0.5, fp8_compute)
        assert dx.dtype == dtype and _rel(dx, dx_ref) < tol


@cpu_kernels
@pytest.mark.parametrize("m,k", [(1, 1), (37, 300), (130, 128)])
def test_row_quantizer_matches_the_reference_bit_for_bit(m, k):
    """fp8 compute quantizes x (and dy) once, before the GEMM: per 1 x 128 tile, s = absmax / 448 in fp32 and the
    nearest e4m3 of x / s; the dequantized tiles must equal quantize_activation_reference's exactly."""
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) * 10
    x[0, : min(k, 128)] = 0  # an all-zero tile: scale 1
    q, s = kernels.quantize_rows_triton(x)
    assert q.dtype == torch.uint8 and s.shape == (m, (k + 127) // 128)
    want_s = torch.zeros(m, (k + 127) // 128)
    for j in range(want_s.shape[1]):
        amax = x[:, j * 128:(j + 1) * 128].abs().amax(dim=1)
        want_s[:, j] = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    assert torch.equal(s, want_s)
    got = q.view(torch.float8_e4m3fn).float() * s.repeat_interleave(128, 1)[:, :k]
    assert torch.equal(got, quantize_activation_reference(x))


@cpu_kernels
def test_rank_above_the_fused_tile_adds_lora_after_the_kernel():
    """r > FUSED_R_MAX: the kernel runs without LoRA and one addmm adds s t B^T (and s u A): still the formula."""
    r = kernels.FUSED_R_MAX + 16
    q, s, x, a, b, dy = _case(20, 130, 200, r, torch.float32, seed=9)
    t, u = x @ a.T, dy @ b
    wd = dequantize_fp8(q, s, torch.float64)
    y = kernels.forward_triton(x, q, s, t, b, 0.5)
    assert _rel(y, x.double() @ wd.T + 0.5 * t.double() @ b.double().T) < 1e-5
    dx = kernels.dx_triton(dy, q, s, u, a, 0.5)
    assert _rel(dx, dy.double() @ wd + 0.5 * u.double() @ a.double()) < 1e-5


@cpu_kernels
def test_kernels_refuse_fp8_compute_without_fp8_tensor_cores():
    q, s, x, a, b, dy = _case(16, 64, 128, 4, torch.float32)
    for run in (lambda: kernels.forward_triton(x, q, s, None, None, 1.0, True, capability=(8, 0)),
                lambda: kernels.dx_triton(dy, q, s, None, None, 1.0, True, capability=(8, 6))):
        with pytest.raises(UserError, match="has no FP8 tensor cores"):
            run()


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("dropout", [False, True])
def test_autograd_matches_float64_autograd(path, dropout, monkeypatch):
    """dx, dA, dB (and the dropout branch's dx) of fp8_lora_linear vs float64 autograd of the formula."""
    if path == "reference":
        monkeypatch.setattr(kernels, "use_triton", lambda t: False)
    q, s, x, a, b, dy = _case(2 * 11, 130, 200, 8, torch.float32, seed=3)
    x = x.reshape(2, 11, 200)
    dy = dy.reshape(2, 11, 130)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) > 0.3).float() / 0.7
    xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, a, b))
    x_l = xs * mask if dropout else None
    y = fp8_lora_linear(xs, q, scales_to_bytes(s), As, Bs, 2.0, x_lora=x_l)
    y.backward(dy)

    wd = dequantize_fp8(q, s, torch.float64)
    x64, a64, b64 = (t.double().requires_grad_(True) for t in (x, a, b))
    xl64 = x64 * mask.double() if dropout else x64
    y64 = x64 @ wd.T + 2.0 * (xl64 @ a64.T) @ b64.T
    y64.backward(dy.double())
    for got, want in ((y, y64), (xs.grad, x64.grad), (As.grad, a64.grad), (Bs.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_fp8_module_from_linear():
    torch.manual_seed(5)
    lin = torch.nn.Linear(200, 130, bias=False)
    m = FP8LoRALinear.from_linear(lin, LoraSpec(r=8, alpha=16, dropout=0.0))
    assert m.weight.dtype == torch.uint8 and not m.weight.requires_grad and not m.weight_scale.requires_grad
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(4, 200)
    q, s = quantize_fp8_reference(lin.weight.detach())
    ref = x.double() @ dequantize_fp8(q, s, torch.float64).T + 2.0 * (x.double() @ m.lora_A.double().T) @ \
        m.lora_B.double().T
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-4, atol=1e-4)
    assert _rel(dequantize_fp8(m.weight, scales_from_bytes(m.weight_scale)), lin.weight.detach()) < 3e-2


# --------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (1024 + 56, 8192)])
def test_gpu_quantize_matches_torch(n, k):
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    q, s = kernels.quantize_fp8_triton(w)
    q_ref, s_ref = quantize_fp8_reference(w)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,r", [(4096, 8192, 8192, 64), (4096, 28672, 8192, 16), (2048 + 7, 1024, 4096 + 64, 64)])
def test_gpu_weight_only_error_vs_float64(m, n, k, r):
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    q, s = kernels.quantize_fp8_triton(w.to(torch.bfloat16))
    wd = dequantize_fp8(q, s, torch.float64)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a = (torch.randn(r, k, device="cuda") * 0.01).to(torch.bfloat16)
    b = (torch.randn(n, r, device="cuda") * 0.01).to(torch.bfloat16)
    t = x @ a.T
    y = kernels.forward_triton(x, q, s, t, b, 2.0, False)
    ref = x.double() @ wd.T + 2.0 * t.double() @ b.double().T
    assert _rel(y, ref) <= 1e-2
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    u = dy @ b
    dx = kernels.dx_triton(dy, q, s, u, a, 2.0, False)
    assert _rel(dx, dy.double() @ wd + 2.0 * u.double() @ a.double()) <= 1e-2
    y8 = kernels.forward_triton(x, q, s, t, b, 2.0, True)
    assert _rel(y8, ref) <= 6e-2
    dx8 = kernels.dx_triton(dy, q, s, u, a, 2.0, True)
    assert _rel(dx8, dy.double() @ wd + 2.0 * u.double() @ a.double()) <= 6e-2


@pytest.mark.gpu
def test_gpu_integer_decode_equals_the_hardware_conversion_and_autotune_reports():
    """The sm_80/86 path (integer e4m3 decoding) run on this GPU gives, with the same tiles, the very outputs of the
    hardware conversion: both widen e4m3 exactly. And autotune (the default on a GPU) says what it picked."""
    torch.manual_seed(0)
    w = torch.randn(1024, 2048, device="cuda") * 0.02
    q, s = kernels.quantize_fp8_triton(w.to(torch.bfloat16))
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    fwd = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    dxt = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    for cap in ((8, 0), (9, 0)) if torch.cuda.get_device_capability() >= (8, 9) else ((8, 0),):
        y = kernels.forward_triton(x, q, s, None, None, 1.0, tiles=fwd, capability=cap)
        dx = kernels.dx_triton(dy, q, s, None, None, 1.0, tiles=dxt, capability=cap)
        if cap == (8, 0):
            y_int, dx_int = y, dx
    assert torch.equal(y, y_int) and torch.equal(dx, dx_int)
    kernels.forward_triton(x, q, s, None, None, 1.0)  # no tiles: autotuned on a GPU
    picked = kernels.tuned_configs()
    assert not kernels.autotuning() or any(t["kernel"] == "_fwd_kernel" for t in picked), picked
