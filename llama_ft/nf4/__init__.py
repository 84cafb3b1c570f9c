"""NF4 (QLoRA 4-bit) frozen base weights: the format (format.py) and the bnb-4bit checkpoint layout (checkpoint.py).

Public API of the format:
    NF4_CODE, BLOCK (64), NESTED_BLOCK (256), DYNAMIC_CODE
    quantize_nf4_reference(W) -> (packed uint8 (ceil(numel/2),), absmax fp32 (ceil(numel/64),))
    dequantize_nf4(packed, absmax, shape, dtype) -> W
    double_quantize(absmax) -> (qabsmax uint8, nested_absmax fp32, nested_code fp32 (256,), offset float)
    double_dequantize(qabsmax, nested_absmax, nested_code, offset) -> absmax fp32
"""

from llama_ft.nf4.format import (
    BLOCK,
    DYNAMIC_CODE,
    NESTED_BLOCK,
    NF4_CODE,
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    num_blocks,
    quantize_nf4_reference,
)

__all__ = [
    "BLOCK",
    "DYNAMIC_CODE",
    "NESTED_BLOCK",
    "NF4_CODE",
    "dequantize_nf4",
    "double_dequantize",
    "double_quantize",
    "num_blocks",
    "quantize_nf4_reference",
]
