"""The pre-quantized bnb-4bit checkpoint layout: what the Hub's `*-bnb-4bit` repositories hold, what transformers'
save_pretrained writes for BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True), and what `llama-ft quantize --bits 4` writes.

Read off a directory transformers 5.25 + bitsandbytes 0.50.2 wrote (tests/test_quantize_nf4.py makes one). Per
quantized linear `<m>` with a weight of logical shape (N, K), numel = N * K, nb = ceil(numel / 64):
    <m>.weight                                     U8  (ceil(numel / 2), 1)  two NF4 codes a byte (format.py)
    <m>.weight.absmax                              U8  (nb,)   double-quantized absmax codes
                                                   (F32 (nb,), the absmax itself, without double quantization)
    <m>.weight.quant_map                           F32 (16,)   NF4_CODE
    <m>.weight.nested_absmax                       F32 (ceil(nb / 256),)   (double quantization only)
    <m>.weight.nested_quant_map                    F32 (256,)  DYNAMIC_CODE (double quantization only)
    <m>.weight.quant_state.bitsandbytes__nf4       U8  (len,)  UTF-8 JSON: {"quant_type": "nf4", "blocksize": 64,
        "dtype": "bfloat16", "shape": [N, K], "nested_blocksize": 256, "nested_dtype": "float32",
        "nested_offset": <mean absmax>}   (the logical shape lives only here)
Embeddings, norms and lm_head keep their dtype. config.json:
    "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4",
                            "bnb_4bit_use_double_quant": true, ... (QUANTIZATION_CONFIG_KEYS)}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from llama_ft.errors import UserError
from llama_ft.nf4.format import BLOCK, NESTED_BLOCK, NF4_CODE, double_dequantize, double_quantize
from llama_ft.shards import CONFIG_NAME, ST_DTYPES, Checkpoint, ShardReader

QUANT_STATE = ".quant_state.bitsandbytes__nf4"
FP4_QUANT_STATE = ".quant_state.bitsandbytes__fp4"
ABSMAX, QUANT_MAP = ".absmax", ".quant_map"
NESTED_ABSMAX, NESTED_QUANT_MAP = ".nested_absmax", ".nested_quant_map"
COMPANIONS = (ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP, QUANT_STATE)

# the keys (in this order) transformers 5.25 writes for a 4-bit BitsAndBytesConfig
QUANTIZATION_CONFIG_KEYS = (
    "_load_in_4bit", "_load_in_8bit", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant", "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
    "llm_int8_skip_modules", "llm_int8_threshold", "load_in_4bit", "load_in_8bit", "quant_method",
)


def is_bnb_4bit(config: dict) -> bool:
    """config.json says bitsandbytes 4-bit (quant_method "bitsandbytes" and load_in_4bit)."""
    qc = config.get("quantization_config")
    return (isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"
            and bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit")))


def is_bnb(config: dict) -> bool:
    """config.json says bitsandbytes at all (4-bit or 8-bit)."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"


@dataclass(frozen=True)
class NF4Weight:
    """One stored NF4 weight: its tensor name, logical shape and dtype, and how its absmax is stored."""

    name: str  # "<m>.weight"
    shape: tuple[int, ...]
    dtype: str  # the dtype it was quantized from ("bfloat16"), dequantize_4bit's output dtype
    nested: bool  # absmax double-quantized
    offset: float | None  # the nested offset (mean absmax), None unless nested

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // BLOCK)


def _where(ckpt: Checkpoint, name: str) -> str:
    info = ckpt.tensors.get(name)
    return str(ckpt.root / info.shard) if info is not None else str(ckpt.root)


def read_quant_state(ckpt: Checkpoint, name: str, reader: ShardReader | None = None) -> NF4Weight:
    """Parse `<name>.quant_state.bitsandbytes__nf4` (a few hundred bytes) into an NF4Weight."""
    key = name + QUANT_STATE
    if key not in ckpt.tensors:
        raise UserError(f"{_where(ckpt, name)}: tensor {key!r} missing (the bnb-4bit quant state of {name!r})")
    raw = (reader.read_flat(key, 0, math.prod(ckpt.tensors[key].shape)) if reader is not None else ckpt.read(key))
    try:
        state = json.loads(bytes(raw.reshape(-1).view(torch.uint8).tolist()).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError
        shape = tuple(state["shape"])
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{_where(ckpt, key)}: tensor {key!r} is not a bnb-4bit quant state (expected UTF-8 JSON "
                        "with quant_type, blocksize, dtype, shape)") from None
    where = f"{_where(ckpt, key)}: tensor {key!r}"
    if state.get("quant_type") != "nf4":
        raise UserError(f"{where}: quant_type {state.get('quant_type')!r}, expected 'nf4'")
    if state.get("blocksize") != BLOCK:
        raise UserError(f"{where}: blocksize {state.get('blocksize')!r}, expected {BLOCK}")
    nested = name + NESTED_ABSMAX in ckpt.tensors
    offset = None
    if nested:
        if state.get("nested_blocksize") != NESTED_BLOCK:
            raise UserError(f"{where}: nested_blocksize {state.get('nested_blocksize')!r}, expected {NESTED_BLOCK}")
        if not isinstance(state.get("nested_offset"), (int, float)) or isinstance(state.get("nested_offset"), bool):
            raise UserError(f"{where}: nested_offset {state.get('nested_offset')!r}, expected a number")
        offset = float(state["nested_offset"])
    return NF4Weight(name=name, shape=shape, dtype=str(state.get("dtype", "bfloat16")), nested=nested, offset=offset)


def _check_config(ckpt: Checkpoint) -> None:
    qc = ckpt.config.get("quantization_config")
    where = f"{ckpt.root / CONFIG_NAME}: quantization_config"
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        raise UserError(f"{where}: expected quant_method 'bitsandbytes'")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise UserError(f"{where}: load_in_8bit (bitsandbytes LLM.int8) is not supported; a bnb-4bit NF4 checkpoint "
                        "(load_in_4bit, bnb_4bit_quant_type nf4) or a bf16 one is")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise UserError(f"{where}: neither load_in_4bit nor load_in_8bit (expected a bnb-4bit NF4 checkpoint)")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":  # transformers' default quant type is fp4
        raise UserError(f"{where}: bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type', 'fp4')!r} is not supported; "
                        "NF4 is (bnb_4bit_quant_type \"nf4\")")


def _check_sizes(ckpt: Checkpoint, w: NF4Weight, reader: ShardReader | None) -> None:
    """Every stored tensor of `w` has the size its logical shape implies, and its quant_map is NF4_CODE."""
    def expect(suffix: str, numel: int, dtypes: tuple[str, ...], what: str) -> None:
        key = w.name + suffix
        info = ckpt.tensors.get(key)
        if info is None:
            raise UserError(f"{_where(ckpt, w.name)}: tensor {key!r} missing ({what})")
        got = math.prod(info.shape)
        if info.dtype not in dtypes or got != numel:
            raise UserError(f"{ckpt.root / info.shard}: tensor {key!r} has {got} {info.dtype} values, expected {numel} "
                            f"{'/'.join(dtypes)} ({what} of weight shape {list(w.shape)})")

    expect("", -(-w.numel // 2), ("U8",), "two NF4 codes a byte")
    expect(ABSMAX, w.num_blocks, ("U8",) if w.nested else ("F32",), f"one absmax per {BLOCK} weights")
    expect(QUANT_MAP, 16, ("F32",), "the NF4 code book")
    if w.nested:
        expect(NESTED_ABSMAX, -(-w.num_blocks // NESTED_BLOCK), ("F32",), f"one scale per {NESTED_BLOCK} absmax")
        expect(NESTED_QUANT_MAP, 256, ("F32",), "the 8-bit dynamic code of the absmax")
    key = w.name + QUANT_MAP
    qmap = reader.read_flat(key, 0, 16) if reader is not None else ckpt.read(key)
    if not torch.equal(qmap.reshape(-1).float(), NF4_CODE):
        raise UserError(f"{ckpt.root / ckpt.tensors[key].shard}: tensor {key!r} is not the NF4 code book "
                        "(a different 4-bit data type; NF4 is supported)")


def check_bnb_checkpoint(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Validate a bnb-4bit checkpoint (config.json and every quantized weight's tensors, headers plus a few
    hundred bytes a weight) and return the names of its NF4 weights ("<m>.weight"), in checkpoint order.

    Raises UserError (one line naming config.json or the tensor) for: 8-bit (load_in_8bit), fp4 (config or a
    fp4 quant state), a blocksize other than 64, a packed / absmax / nested size that does not fit the weight
    shape, a missing quant_state tensor, a quant_map that is not NF4; with `expected` (weight name -> the shape
    the model needs, e.g. from config.json), a quant-state shape that differs from it.
    """
    _check_config(ckpt)
    fp4 = next((n for n in ckpt.tensors if n.endswith(FP4_QUANT_STATE)), None)
    if fp4 is not None:
        raise UserError(f"{_where(ckpt, fp4)}: tensor {fp4!r} is an fp4 quant state; NF4 is supported")
    # a quantized weight is a U8 "<m>.weight" (a plain weight is a float); its companions say so too
    names = [n for n, info in ckpt.tensors.items()
             if n.endswith(".weight") and (info.dtype == "U8" or n + ABSMAX in ckpt.tensors
                                           or n + QUANT_STATE in ckpt.tensors)]
    if not names:
        raise UserError(f"{ckpt.root / CONFIG_NAME}: quantization_config says bitsandbytes 4-bit, but no weight is "
                        "stored as 4-bit (no U8 '<module>.weight' tensors)")
    reader = ShardReader(ckpt)
    try:
        for name in names:
            w = read_quant_state(ckpt, name, reader)
            if expected is not None and name in expected and tuple(expected[name]) != w.shape:
                raise UserError(f"{_where(ckpt, name)}: tensor {name + QUANT_STATE!r} says shape {list(w.shape)}, "
                                f"the model ({CONFIG_NAME}) needs {list(expected[name])}")
            _check_sizes(ckpt, w, reader)
    finally:
        reader.close()
    return names


ST_NAMES = {str(t).removeprefix("torch."): name for name, t in ST_DTYPES.items()}  # "bfloat16" -> "BF16"


def logical_view(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint's headers with each NF4 weight as the matrix it stands for: "<m>.weight" gets the logical
    shape (N, K) and dtype of its quant state instead of the packed U8 (ceil(N K / 2), 1). What shape checks
    written for unquantized checkpoints (merge.load_adapter: do the adapters fit?) read. Headers and the quant
    states only (a few hundred bytes a weight)."""
    names = check_bnb_checkpoint(ckpt)
    tensors = dict(ckpt.tensors)
    reader = ShardReader(ckpt)
    try:
        for name in names:
            w = read_quant_state(ckpt, name, reader)
            tensors[name] = replace(tensors[name], dtype=ST_NAMES.get(w.dtype, "BF16"), shape=w.shape)
    finally:
        reader.close()
    return replace(ckpt, tensors=tensors)


def targets_of(names: list[str]) -> list[str]:
    """The module short names ("q_proj", ...) of quantized weight names, sorted."""
    return sorted({n.split(".")[-2] for n in names})


def read_packed(reader: ShardReader, w: NF4Weight, start: int, end: int) -> torch.Tensor:
    """Bytes [start, end) of w's packed codes, uint8 (end - start,) (byte b holds elements 2b and 2b + 1)."""
    return reader.read_flat(w.name, start, end).reshape(-1).view(torch.uint8)


def read_absmax(reader: ShardReader, w: NF4Weight, start: int, end: int) -> torch.Tensor:
    """absmax[start:end] of w as fp32 (end - start,), reading only those codes and the nested scales that cover
    them (double-dequantized with format.double_dequantize: bit-equal to what bitsandbytes computes)."""
    if not w.nested:
        return reader.read_flat(w.name + ABSMAX, start, end).float()
    if end <= start:
        return torch.empty(0, dtype=torch.float32)
    q = reader.read_flat(w.name + ABSMAX, start, end).view(torch.uint8)
    j0, j1 = start // NESTED_BLOCK, -(-end // NESTED_BLOCK)
    nested = reader.read_flat(w.name + NESTED_ABSMAX, j0, j1).float()
    code = reader.read_flat(w.name + NESTED_QUANT_MAP, 0, 256).float()
    # align to the nested block grid: pad the codes in front so that code i sits in nested block i // 256
    lead = start - j0 * NESTED_BLOCK
    padded = torch.cat([torch.zeros(lead, dtype=torch.uint8), q])
    assert w.offset is not None
    return double_dequantize(padded, nested, code, w.offset)[lead:]


def aligned_rows(w: NF4Weight, r0: int, r1: int) -> tuple[int, int]:
    """The smallest row range holding rows [r0, r1) that starts and ends on a block boundary (or the end).

    Rows per whole number of blocks: 64 / gcd(K, 64) (K = 200: 8 rows hold 25 blocks)."""
    row = math.prod(w.shape[1:])
    step = BLOCK // math.gcd(row, BLOCK)
    return (r0 // step) * step, min(-(-r1 // step) * step, w.shape[0])


def read_nf4_tensor(reader: ShardReader, w: NF4Weight,
                    rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(packed uint8, absmax fp32, shape) of one stored NF4 weight, or of rows [r0, r1) of it only.

    Whole weight: packed (ceil(numel / 2),), absmax (ceil(numel / 64),), shape the logical shape, so that
    format.dequantize_nf4(packed, absmax, shape, dtype) is bitsandbytes' dequantize_4bit of the stored state.
    Rows [r0, r1), elements e0 = r0 * K .. e1 = r1 * K of the flattened weight, read alone: the bytes
    [e0 / 2, ceil(e1 / 2)) and absmax[e0 / 64 : ceil(e1 / 64)], shape (r1 - r0, K). The range must start on a
    block boundary and end on one or at the last row (aligned_rows widens a range to that: a block spans rows
    when K is not a multiple of 64); then dequantize_nf4 of the result is exactly those rows of the weight.
    A ZeRO-3 partition (a range of packed bytes, a range of absmax) reads with read_packed / read_absmax.
    """
    row = math.prod(w.shape[1:])
    r0, r1 = rows if rows is not None else (0, w.shape[0])
    if not 0 <= r0 <= r1 <= w.shape[0] or (r0, r1) != aligned_rows(w, r0, r1):
        raise ValueError(f"rows {rows} of {w.name} (shape {list(w.shape)}) are not a block-aligned range "
                         f"(aligned_rows gives {aligned_rows(w, max(r0, 0), min(r1, w.shape[0]))})")
    e0, e1 = r0 * row, r1 * row
    packed = read_packed(reader, w, e0 // 2, -(-e1 // 2))
    absmax = read_absmax(reader, w, e0 // BLOCK, -(-e1 // BLOCK))
    return packed, absmax, (r1 - r0, *w.shape[1:])


def nf4_state_tensors(name: str, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes / transformers store for one weight quantized with double quantization:
    "<name>" packed (ceil(numel / 2), 1) and its companions, from the NF4 bytes and fp32 absmax of format.py."""
    qabsmax, nested, code, offset = double_quantize(absmax)
    state = {"quant_type": "nf4", "blocksize": BLOCK, "dtype": str(dtype).removeprefix("torch."),
             "shape": list(shape), "nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32",
             "nested_offset": offset}
    blob = json.dumps(state).encode("utf-8")
    return {
        name: packed.reshape(-1, 1),
        name + ABSMAX: qabsmax,
        name + QUANT_MAP: NF4_CODE.clone(),
        name + NESTED_ABSMAX: nested,
        name + NESTED_QUANT_MAP: code,
        name + QUANT_STATE: torch.tensor(list(blob), dtype=torch.uint8),
    }


def quantization_config(compute_dtype: str, skip_modules: list[str] | None,
                        targets: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """config.json "quantization_config" for NF4 with double quantization: transformers' key set and values
    for BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=compute_dtype), plus "llama_ft_target_modules".

    `skip_modules`: None when every linear but lm_head is quantized (transformers then skips lm_head by
    itself); otherwise every module left in its dtype, lm_head included (transformers' llm_int8_skip_modules
    replaces its own default list).
    """
    qc: dict[str, Any] = {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules, "llm_int8_threshold": 6.0, "load_in_4bit": True,
        "load_in_8bit": False, "quant_method": "bitsandbytes",
    }
    assert tuple(qc) == QUANTIZATION_CONFIG_KEYS
    qc["llama_ft_target_modules"] = list(targets)
    return qc
