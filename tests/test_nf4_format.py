"""NF4 format (llama_ft/nf4/format.py) against bitsandbytes 0.50.2, byte for byte and bit for bit.

bitsandbytes is the independent reference: its quantize_4bit / dequantize_4bit / create_dynamic_map on the same
weights. Shapes cover blocks that span two rows (K not a multiple of 64), a partial last block, an odd element count.
"""

from __future__ import annotations

import pytest
import torch

from llama_ft.nf4 import format as nf4
from llama_ft.nf4.format import (
    BLOCK,
    DYNAMIC_CODE,
    NF4_CODE,
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    quantize_nf4_reference,
)

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(128, 200), (96, 128), (300, 67), (7, 9), (3,), (64,), (1, 1)]


def bnb_quantize(w: torch.Tensor, nested: bool = False):
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested,
                                  quant_storage=torch.uint8)
    return q, state


def bnb_dequantize(q: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    state.dtype = dtype
    # its CPU kernel returns a 1-D shape (n,) as (1, n): the values are what is compared
    return bnbf.dequantize_4bit(q, state).reshape(state.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe, -0.0 != 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    yield torch.randn(shape, generator=g).to(dtype)
    yield (torch.randn(shape, generator=g) * 1e-30).to(dtype) if dtype != torch.float16 else \
        (torch.randn(shape, generator=g) * 1e-6).to(dtype)  # tiny (fp16: its subnormals)
    yield (torch.randn(shape, generator=g) * (1e30 if dtype != torch.float16 else 1e4)).to(dtype)  # huge
    w = torch.randn(shape, generator=g)
    w.view(-1)[: min(w.numel(), 70)] = 0  # an all-zero first block (and a zero-padded row start)
    w.view(-1)[-1] = 0
    yield w.to(dtype)


def test_code_books_are_bitsandbytes():
    assert same_bits(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert same_bits(DYNAMIC_CODE, bnbf.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_equal_bitsandbytes(shape, dtype):
    for w in weights(shape, dtype):
        packed, absmax = quantize_nf4_reference(w)
        q, state = bnb_quantize(w)
        assert same_bits(packed, q.view(-1)) and same_bits(absmax, state.absmax)
        assert packed.numel() == -(-w.numel() // 2) and absmax.numel() == -(-w.numel() // BLOCK)
        for out in DTYPES:
            assert same_bits(dequantize_nf4(packed, absmax, shape, out), bnb_dequantize(q, state, out))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_zeros_and_extremes(dtype):
    """Values exactly on the midpoint between two code points (absmax 1, so the scaled value is the input),
    exact code points, zeros, an all-zero tensor and an all-zero partial last block."""
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(dtype).float()  # the midpoints as this dtype holds them
    row = torch.cat([torch.tensor([1.0]), mids, -mids, NF4_CODE, torch.zeros(2)])
    row = torch.cat([row, torch.zeros(BLOCK - row.numel() % BLOCK)])[:BLOCK * (row.numel() // BLOCK + 1)]
    row[::BLOCK] = 1.0  # absmax 1 in every block
    cases = [row.to(dtype), torch.zeros(130, dtype=dtype), torch.cat([row, torch.zeros(5)]).to(dtype),
             torch.cat([row, torch.zeros(6)]).to(dtype)]
    for w in cases:
        packed, absmax = quantize_nf4_reference(w)
        q, state = bnb_quantize(w)
        assert same_bits(packed, q.view(-1)) and same_bits(absmax, state.absmax)
        for out in DTYPES:
            assert same_bits(dequantize_nf4(packed, absmax, w.shape, out), bnb_dequantize(q, state, out))


def test_first_element_is_the_high_nibble():
    """Independent of bitsandbytes: code 0 (-1.0) then code 15 (+1.0) packs to 0x0F; an odd count pads code 7."""
    packed, _ = quantize_nf4_reference(torch.tensor([-1.0, 1.0, 1.0]))
    assert packed.tolist() == [0x0F, 0xF7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_ranges_give_slices_of_the_whole(dtype, monkeypatch):
    """A loader quantizes row ranges: a range starting on a block boundary with a multiple of 64 elements (or
    running to the end, partial last block included) gives exactly that slice of the whole tensor's result.
    A small chunk size makes quantize_nf4_reference take several chunks as well."""
    monkeypatch.setattr(nf4, "_CHUNK", 3 * BLOCK)
    n, k = 195, 96  # K = 96: a block spans two rows; every even row starts a block
    w = torch.randn(n, k).to(dtype)
    whole_p, whole_a = quantize_nf4_reference(w)
    q, state = bnb_quantize(w)
    assert same_bits(whole_p, q.view(-1)) and same_bits(whole_a, state.absmax)
    for r0, r1 in [(0, 2), (2, 10), (10, 194), (194, 195), (40, 195), (0, 195)]:
        e0, e1 = r0 * k, r1 * k
        assert e0 % BLOCK == 0 and (e1 % BLOCK == 0 or r1 == n)
        p, a = quantize_nf4_reference(w[r0:r1])
        assert same_bits(p, whole_p[e0 // 2: -(-e1 // 2)])
        assert same_bits(a, whole_a[e0 // BLOCK: -(-e1 // BLOCK)])
    # K = 200: a block spans two rows; rows [8r, 8r + 8) hold 1600 = 25 blocks, so such ranges are aligned
    w = torch.randn(40, 200).to(dtype)
    whole_p, whole_a = quantize_nf4_reference(w)
    p, a = quantize_nf4_reference(w[8:24])
    assert same_bits(p, whole_p[8 * 100: 24 * 100]) and same_bits(a, whole_a[25: 75])


@pytest.mark.parametrize("shape", [(128, 200), (300, 67), (700, 300), (5,)])
def test_double_quantization_equals_bitsandbytes(shape):
    """compress_statistics=True: qabsmax, nested absmax, nested code and offset equal bitsandbytes'; the
    absmax rebuilt from them dequantizes to bitsandbytes' dequantize_4bit of the compressed state, bit for bit
    (700 x 300: 3282 blocks, 13 nested blocks, the last one partial)."""
    for w in weights(shape, torch.float32, seed=1):
        packed, absmax = quantize_nf4_reference(w)
        qa, nested, code, offset = double_quantize(absmax)
        q, state = bnb_quantize(w, nested=True)
        assert same_bits(qa, state.absmax) and same_bits(nested, state.state2.absmax)
        assert same_bits(code, state.state2.code) and offset == state.offset.item()
        assert state.state2.blocksize == 256
        rebuilt = double_dequantize(qa, nested, code, offset)
        for out in DTYPES:
            assert same_bits(dequantize_nf4(packed, rebuilt, shape, out), bnb_dequantize(q, state, out))


def test_double_quantization_of_equal_absmax():
    """Every block with the same absmax (a - offset all zero, 0/0 in the nested scale): bitsandbytes' bytes."""
    for w in (torch.ones(64 * 300), torch.zeros(64 * 300), torch.zeros(100)):
        _, absmax = quantize_nf4_reference(w)
        qa, nested, _, offset = double_quantize(absmax)
        _, state = bnb_quantize(w, nested=True)
        assert same_bits(qa, state.absmax) and same_bits(nested, state.state2.absmax)
        assert offset == state.offset.item()
