"""NF4LoRALinear: a LoRA layer whose frozen base weight is stored in NF4 (QLoRA's 4-bit format), codes + absmax.

    y = x W^T + (alpha / r) * (dropout(x) A^T) B^T,    W = NF4_CODE[code] * absmax[block] (format.py)

Parameters (all ZeRO-3 partitionable uint8; the all-gather moves 0.5625 bytes per base weight):
    weight         uint8 (ceil(out * in / 2),)       two codes a byte over the flattened W, bitsandbytes' order
    weight_absmax  uint8 (ceil(out * in / 64) * 4,)  the fp32 absmax of each block of 64 as raw bytes
    lora_A         (r, in), lora_B (out, r)          trainable, in the compute dtype

absmax stays fp32 here (not double-quantized as in files): see format.py. Adapters are named as in the bf16
LoRALinear, so they save as PEFT files and load on the bf16 base or on transformers' bnb-4bit base.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_ft.lora import LoraSpec
from llama_ft.nf4.format import num_blocks, quantize_nf4_reference
from llama_ft.nf4.ops import NF4Ops
from llama_ft.quant.module import QuantLoRALinear


class NF4LoRALinear(QuantLoRALinear):
    STORAGE = ("weight", "weight_absmax")
    FORMAT = "nf4"

    def __init__(self, packed: torch.Tensor, absmax_bytes: torch.Tensor, in_features: int, out_features: int,
                 spec: LoraSpec, lora_dtype: torch.dtype) -> None:
        super().__init__(nn.Parameter(packed, requires_grad=False), in_features, out_features, spec, lora_dtype)
        self.weight_absmax = nn.Parameter(absmax_bytes, requires_grad=False)

    @staticmethod
    def storage_numel(out_features: int, in_features: int) -> tuple[int, int]:
        """Elements (bytes) of `weight` and `weight_absmax` for a W (out, in)."""
        n = out_features * in_features
        return -(-n // 2), num_blocks(n) * 4

    @classmethod
    def empty(cls, in_features: int, out_features: int, spec: LoraSpec, lora_dtype: torch.dtype) -> NF4LoRALinear:
        """Zero storage of the right sizes, for a loader to fill (on the meta device it is only shapes until
        model/partition.py gives each rank its partitions)."""
        nw, na = cls.storage_numel(out_features, in_features)
        return cls(torch.zeros(nw, dtype=torch.uint8), torch.zeros(na, dtype=torch.uint8), in_features,
                   out_features, spec, lora_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LoraSpec) -> NF4LoRALinear:
        """Quantize an ordinary (unpartitioned) nn.Linear's weight. The training build never goes through a
        bf16 nn.Linear: it creates NF4 storage directly (`empty`) and the loader quantizes stripes."""
        w = linear.weight.detach()
        packed, absmax = quantize_nf4_reference(w)
        return cls(packed, absmax.view(torch.uint8), linear.in_features, linear.out_features, spec, w.dtype)

    def ops(self) -> NF4Ops:
        return NF4Ops(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4 blocks of 64 (fp32 absmax)"
