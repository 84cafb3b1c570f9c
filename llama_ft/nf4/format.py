"""NF4 (QLoRA's 4-bit NormalFloat) storage format of frozen base weights, exactly as bitsandbytes 0.50.2 defines it.

Our own PyTorch implementation: bitsandbytes is the tests' reference, not a runtime dependency.

Format (blocks run over the FLATTENED, row-major weight, so a block can span two rows):
    w (numel,) real,  b = i // 64 the block of element i,  nb = ceil(numel / 64)
    absmax[b] = max |w[64b : 64b + 64]|                                          fp32 (nb,)
    c[i] = argmin_j |NF4_CODE[j] - w[i] * (1 / absmax[b])|   (4 bits; a tie goes to the lower code)
    packed[k] = c[2k] << 4 | c[2k + 1]                                          uint8 (ceil(numel / 2),)
        (the FIRST element in the HIGH nibble; an odd numel pads the last low nibble with code 7, i.e. 0.0)
    W[i] = fp32(NF4_CODE[c[i]] * absmax[b]), then rounded to the output dtype

bitsandbytes' quirks, kept so the bytes are the same:
    - a full block scales by the fp32 reciprocal (x * (1 / absmax), two roundings); the last PARTIAL block of a
      tensor (numel % 64 != 0) divides (x / absmax) instead;
    - absmax is clamped to >= 1e-38 for the scaling only; a full all-zero block stores absmax 0, but a partial
      all-zero last block stores the clamped 1e-38.
    - scaled values are clamped to [-1, 1], then bucketed against the midpoints of NF4_CODE (computed in fp32):
      a value exactly on a midpoint takes the lower code.

Double quantization (bitsandbytes' compress_statistics=True, what transformers writes with
bnb_4bit_use_double_quant=True): the fp32 absmax (nb,) becomes
    offset = mean(absmax)                                                         one fp32 scalar
    a = absmax - offset, in blocks of NESTED_BLOCK = 256:
    nested_absmax[j] = max |a[256j : 256j + 256]|                                 fp32 (ceil(nb / 256),)
    qabsmax[i] = nearest index into DYNAMIC_CODE of a[i] / nested_absmax[i // 256] uint8 (nb,)
        (fp32 division; nearest by fp32 distance, a tie to the lower index; 0/0 = NaN gives index 0)
    absmax'[i] = fp32(DYNAMIC_CODE[qabsmax[i]] * nested_absmax[i // 256]) + offset  (fp32 add)
DYNAMIC_CODE is bitsandbytes' signed 8-bit "dynamic" map (256 sorted values in [-0.993, 1]: per decade
10^-6 .. 10^0, 2^i midpoints of linspace(0.1, 1, 2^i + 1), both signs; plus 0 and 1).

The training path keeps absmax as fp32 (+4/64 bytes a weight, 0.5625 bytes a weight in all): the offset is the
mean over the WHOLE tensor, which a rank holding only its ZeRO-3 partition does not have (and would need a
collective per weight to get). Double quantization (8/64 + 4/(64*256) bytes a weight) is for files.
"""

from __future__ import annotations

import math

import torch

BLOCK = 64  # weights per absmax, along the flattened weight
NESTED_BLOCK = 256  # absmax values per nested scale (double quantization)

# The 16 NormalFloat levels (QLoRA, Dettmers et al. 2023: quantiles of N(0, 1) with an exact 0, scaled to [-1, 1]),
# bitsandbytes' fp32 values bit for bit.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_ZERO = 7  # the code of 0.0 (pads an odd element count)

# midpoints between neighbouring levels, in fp32: the bucket edges of the quantizer
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

# elements quantized per step (a multiple of BLOCK): bounds the fp32 scratch to a few MiB whatever the weight
_CHUNK = BLOCK * 16384


def _dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 256 sorted fp32 values (computed in fp32 as bitsandbytes does)."""
    values: list[float] = [0.0, 1.0]
    for i in range(7):  # exponent 10^(i - 6); 2^i linear levels per sign in that decade
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - 6) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_code()
_LUT_SIZE = 65536


def _dynamic_lut() -> torch.Tensor:
    """uint8 (65536,): the DYNAMIC_CODE index for each of 65536 evenly spaced points of [-1, 1].

    Point i is v_i = -1 + 2i / 65535 (fp32); its entry is the number of midpoints between neighbouring code
    values that are < v_i, i.e. the nearest code value with a tie to the lower one. bitsandbytes' CPU 8-bit
    quantizer rounds each value to the nearest point and reads this table, so the double-quantized absmax is
    the nearest code value up to that 2/65535 grid (its bytes, not the exact nearest, are what we match).
    """
    mids = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mids, points, right=False).to(torch.uint8)


def num_blocks(numel: int, block: int = BLOCK) -> int:
    return math.ceil(numel / block)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (2m,) -> bytes uint8 (m,): element 2k in the high nibble, 2k + 1 in the low one."""
    return (codes[0::2] << 4) | codes[1::2]


def _codes(scaled: torch.Tensor) -> torch.Tensor:
    """NF4 code of each value of `scaled` (already in [-1, 1]): bucket by the fp32 midpoints, ties down."""
    return torch.bucketize(scaled, _NF4_BOUNDS.to(scaled.device), out_int32=True).to(torch.uint8)


def quantize_nf4_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize `w` (any shape, fp32/bf16/fp16) over its flattened elements.

    Returns (packed uint8 (ceil(numel / 2),), absmax fp32 (ceil(numel / 64),)), the bytes bitsandbytes'
    quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False) gives.

    Works BLOCK-aligned chunks at a time (fp32 scratch of at most _CHUNK elements, never a whole-weight fp32
    copy). A slice of a weight that starts on a block boundary and holds a multiple of 64 elements (or runs to
    the weight's end) quantizes to exactly the matching slice of the whole weight's bytes and absmax: a loader
    may quantize row ranges. Only the tensor's true tail may be a partial block (it is scaled differently).
    """
    flat = w.reshape(-1)
    n = flat.numel()
    packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(num_blocks(n), dtype=torch.float32, device=w.device)
    full = n - n % BLOCK
    for s in range(0, full, _CHUNK):
        e = min(s + _CHUNK, full)
        blocks = flat[s:e].float().view(-1, BLOCK)
        amax = blocks.abs().amax(dim=1)
        scaled = (blocks * (1.0 / amax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1)
        packed[s // 2: e // 2] = _pack(_codes(scaled).view(-1))
        absmax[s // BLOCK: e // BLOCK] = amax
    if full < n:  # the partial last block: a division, and the clamped absmax is what is stored
        tail = flat[full:].float()
        amax = tail.abs().amax().clamp(min=1e-38)
        codes = _codes((tail / amax).clamp(-1, 1))
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO)])
        packed[full // 2:] = _pack(codes)
        absmax[-1] = amax
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (`shape`, `dtype`) = NF4_CODE[code] * absmax[block] in fp32, then rounded once to `dtype`.

    packed uint8 (ceil(numel / 2),) (any shape with those bytes, e.g. transformers' (numel / 2, 1)), absmax fp32
    (ceil(numel / 64),). Equal bit for bit to bitsandbytes' dequantize_4bit on the same bytes.
    """
    n = math.prod(shape)
    raw = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).view(-1)[:n].long()
    nb = num_blocks(n)
    vals = NF4_CODE.to(raw.device)[codes]
    if n != nb * BLOCK:
        vals = torch.nn.functional.pad(vals, (0, nb * BLOCK - n))
    w = (vals.view(nb, BLOCK) * absmax.reshape(nb, 1).float()).view(-1)[:n]
    return w.to(dtype).reshape(shape)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Compress fp32 absmax (nb,) as bitsandbytes' compress_statistics=True does.

    Returns (qabsmax uint8 (nb,), nested_absmax fp32 (ceil(nb / 256),), nested_code fp32 (256,) = DYNAMIC_CODE,
    offset = mean(absmax) as a Python float holding the fp32 value). Bytes equal bitsandbytes'.
    """
    absmax = absmax.float().reshape(-1)
    offset = absmax.mean()
    a = absmax - offset
    nb = a.numel()
    nn_ = num_blocks(nb, NESTED_BLOCK)
    padded = torch.nn.functional.pad(a, (0, nn_ * NESTED_BLOCK - nb)).view(nn_, NESTED_BLOCK)
    nested_absmax = padded.abs().amax(dim=1)  # padding zeros never exceed a block's real max |a| (>= 0)
    zero = nested_absmax.view(-1, 1) == 0  # a block of equal absmax values: bitsandbytes stores code 0
    inv = 1.0 / nested_absmax
    normed = torch.where(zero, 0.0, padded * inv.view(-1, 1)).clamp(-1, 1).nan_to_num(0.0)  # NaN: non-finite w
    # the 65536-bin table position of each value, in fp32 as bitsandbytes rounds it: ((v + 1) * 0.5) * 65535 + 0.5
    pos = (((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = _dynamic_lut().to(a.device)[pos]
    q = torch.where(zero, torch.zeros_like(q), q).view(-1)[:nb]
    return q, nested_absmax, DYNAMIC_CODE.to(a.device).clone(), float(offset)


def double_dequantize(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                      offset: float) -> torch.Tensor:
    """absmax fp32 (nb,) = fp32(nested_code[qabsmax] * nested_absmax[i // 256]) + fp32(offset).

    Bit-equal to the absmax bitsandbytes computes inside dequantize_4bit for a double-quantized state, so
    dequantize_nf4(packed, double_dequantize(...), shape, dtype) equals its dequantize_4bit on that state.
    """
    q = qabsmax.reshape(-1).long()
    nb = q.numel()
    vals = nested_code.float().to(q.device)[q]
    scale = nested_absmax.float().reshape(-1).repeat_interleave(NESTED_BLOCK)[:nb]
    return vals * scale + torch.tensor(offset, dtype=torch.float32, device=q.device)
