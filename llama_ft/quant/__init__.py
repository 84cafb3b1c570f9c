"""The quantized frozen base: one LoRA layer design, two storage formats.

    y = x W^T + s (x_l A^T) B^T,     W frozen and stored quantized, A and B trainable (s = alpha / r)

A format (llama_ft/fp8: e4m3 bytes + 128x128 block scales; llama_ft/nf4: NF4 codes two a byte + an fp32 absmax per
64 weights) supplies its storage tensors, all uint8 so ZeRO-3 partitions, gathers and offloads them untouched, and
a `BaseOps`: the two big GEMMs with W decoded inside them (y = x W^T + s t B^T and dx = dy W + s u A). Everything
else is shared here: the autograd shape (autograd.py: which GEMM goes where, the LoRA GEMMs, the ZeRO-3 gather in
backward) and the layer (module.py: `QuantLoRALinear`, the LoRA switch for DPO's reference, PEFT names).
"""

from llama_ft.quant.autograd import BaseOps, quant_linear, quant_lora_linear
from llama_ft.quant.module import QuantLoRALinear, quant_modules

__all__ = ["BaseOps", "QuantLoRALinear", "quant_linear", "quant_lora_linear", "quant_modules"]
