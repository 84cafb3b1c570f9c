"""FP8LoRALinear: a LoRA layer whose frozen base weight is stored as FP8 e4m3 bytes + block scales.

    y = x W^T + (alpha / r) * (dropout(x) A^T) B^T,    W = q * s (128 x 128 blocks, see format.py)

Parameters (all ZeRO-3 partitionable; the all-gather moves 1 byte per base weight):
    weight        uint8 (out, in)                  the e4m3 bytes, under the checkpoint's name
    weight_scale  uint8 (ceil(out/128), ceil(in/128) * 4)   fp32 scales as raw bytes
    lora_A        (r, in), lora_B (out, r)         trainable, in the compute dtype

Adapters are named exactly as in the bf16 LoRALinear, so they save as PEFT files and load
on the plain bf16 base model.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_ft.fp8 import kernels
from llama_ft.fp8.autograd import FP8Ops
from llama_ft.fp8.format import num_blocks, quantize_fp8_reference, scales_to_bytes
from llama_ft.lora import LoraSpec
from llama_ft.quant.module import QuantLoRALinear


def quantize_device() -> torch.device:
    """Where weights are quantized: this rank's GPU (Triton) when there is one, even for a stripe whose
    partition lives in host memory (copied over and back), else the CPU (PyTorch reference)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> (q uint8 (N, K), scales fp32 (ceil(N/128), ceil(K/128))): Triton on CUDA, else PyTorch."""
    if kernels.use_triton(w):
        return kernels.quantize_fp8_triton(w.contiguous())
    return quantize_fp8_reference(w)


class FP8LoRALinear(QuantLoRALinear):
    STORAGE = ("weight", "weight_scale")
    FORMAT = "fp8"

    def __init__(self, q: torch.Tensor, scale_bytes: torch.Tensor, in_features: int, out_features: int,
                 spec: LoraSpec, lora_dtype: torch.dtype, fp8_compute: bool = False) -> None:
        super().__init__(nn.Parameter(q, requires_grad=False), in_features, out_features, spec, lora_dtype)
        self.weight_scale = nn.Parameter(scale_bytes, requires_grad=False)
        self.fp8_compute = fp8_compute

    @classmethod
    def empty(cls, in_features: int, out_features: int, spec: LoraSpec, lora_dtype: torch.dtype,
              fp8_compute: bool = False) -> FP8LoRALinear:
        """Zero FP8 storage of the right shapes, for a loader to fill (built on the meta device, it is
        only shapes until model/partition.py gives each rank its partitions)."""
        q = torch.zeros(out_features, in_features, dtype=torch.uint8)
        scale_bytes = torch.zeros(num_blocks(out_features), num_blocks(in_features) * 4, dtype=torch.uint8)
        return cls(q, scale_bytes, in_features, out_features, spec, lora_dtype, fp8_compute)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LoraSpec, fp8_compute: bool = False) -> FP8LoRALinear:
        """Quantize an ordinary (unpartitioned) nn.Linear's weight, on its device. The training build
        never goes through a bf16 nn.Linear: it creates FP8 storage directly (`empty`)."""
        w = linear.weight.detach()
        q, scales = quantize_fp8(w)
        dtype = w.dtype
        return cls(q, scales_to_bytes(scales), linear.in_features, linear.out_features, spec, dtype, fp8_compute)

    def ops(self) -> FP8Ops:
        return FP8Ops(self.fp8_compute)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3 128x128, compute={'fp8' if self.fp8_compute else 'weight-only'}"
