"""QuantLoRALinear: a LoRA layer whose frozen base weight is stored quantized, in one of the formats.

    y = x W^T + (alpha / r) * (dropout(x) A^T) B^T

A format's layer (FP8LoRALinear, NF4LoRALinear) names its storage parameters in STORAGE (`weight` first: the
checkpoint's name of W) and returns its `BaseOps` from `ops()`; all of them are uint8, so ZeRO-3 partitions,
gathers and offloads them like any frozen parameter (zero.Init would upcast a floating one). Adapters are named
exactly as in the bf16 LoRALinear, so they save as PEFT files and load on the plain bf16 base model.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_ft.lora import LoRALinear
from llama_ft.quant.autograd import BaseOps, quant_linear, quant_lora_linear


class QuantLoRALinear(LoRALinear):
    STORAGE: tuple[str, ...] = ("weight",)
    FORMAT: str = ""  # what `llama-ft plan` and the logs call it: "fp8" or "nf4"

    def ops(self) -> BaseOps:
        raise NotImplementedError

    def storage(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.STORAGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_enabled:  # lora.lora_disabled: the base kernel alone
            return quant_linear(x, self.ops(), self.out_features, self.storage())
        x_lora = None if isinstance(self.lora_dropout, nn.Identity) or not self.training else self.lora_dropout(x)
        return quant_lora_linear(x, self.ops(), self.out_features, self.storage(), self.lora_A, self.lora_B,
                                 self.scaling, x_lora=x_lora)


def quant_modules(model: nn.Module) -> dict[str, QuantLoRALinear]:
    """Weight name -> quantized layer, in model order."""
    return {f"{path}.weight": m for path, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
