"""FP8 frozen base weights for LoRA training: format, PyTorch reference, Triton kernels, module.

Public API:
    quantize_fp8(W) -> (q uint8 (N, K), scales fp32 (ceil(N/128), ceil(K/128)))
    dequantize_fp8(q, scales, dtype) -> W (N, K)
    fp8_lora_linear(x, q, scale_bytes, A, B, scaling, x_lora=None, fp8_compute=False) -> y   (autograd)
    fp8_linear(x, q, scale_bytes, fp8_compute=False) -> y = x W^T                            (autograd, no LoRA)
    FP8LoRALinear.from_linear(nn.Linear, LoraSpec, fp8_compute=False)                        (module)
"""

from llama_ft.fp8.autograd import FP8Ops, fp8_linear, fp8_lora_linear
from llama_ft.fp8.format import (
    BLOCK,
    E4M3_MAX,
    dequantize_fp8,
    quantize_activation_reference,
    quantize_fp8_reference,
    scales_from_bytes,
    scales_to_bytes,
)
from llama_ft.fp8.module import FP8LoRALinear, quantize_fp8

__all__ = [
    "BLOCK",
    "E4M3_MAX",
    "FP8LoRALinear",
    "FP8Ops",
    "dequantize_fp8",
    "fp8_linear",
    "fp8_lora_linear",
    "quantize_activation_reference",
    "quantize_fp8",
    "quantize_fp8_reference",
    "scales_from_bytes",
    "scales_to_bytes",
]
