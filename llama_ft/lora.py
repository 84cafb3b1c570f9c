"""LoRA linear layer and its injection into a Hugging Face Llama.

    y = x W^T + (alpha / r) * (dropout(x) A^T) B^T

    x: (..., in_features)      W: (out_features, in_features), frozen base weight
    A: (r, in_features)        B: (out_features, r), B = 0 at init so y starts equal to the base

The base weight keeps its Hugging Face name (`...q_proj.weight`), so checkpoint tensors map
onto it unchanged and ZeRO-3 partitions it like any other parameter; A and B are the only
trainable tensors. Adapter files use PEFT's names (`...q_proj.lora_A.weight`), see adapters.py.

Other base-weight formats subclass LoRALinear and override `forward` (FP8 storage with its
own fused kernels: llama_ft/fp8/module.py); names, init and adapter files stay the same.

`lora_disabled(model)` switches every LoRA branch off for a block: y = x W^T exactly, the LoRA GEMMs
skipped (not multiplied by 0, so no inf/NaN in A or B can reach y). DPO's reference model is the frozen
base, i.e. this same model under `lora_disabled` (DESIGN.md point 11): no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_ft.flags import LLAMA_LINEAR_NAMES


@dataclass(frozen=True)
class LoraSpec:
    """What LoRA to inject: rank, alpha, dropout and the module names (last path component) it targets."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LLAMA_LINEAR_NAMES

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (no bias: Llama linears have none).

    Built around an existing weight Parameter (possibly already a ZeRO-3 partitioned one),
    so wrapping never copies or gathers the base weight.
    """

    def __init__(self, weight: nn.Parameter, in_features: int, out_features: int, spec: LoraSpec,
                 lora_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.scaling = spec.r, spec.alpha, spec.scaling
        self.weight = weight
        self.weight.requires_grad_(False)
        dtype = lora_dtype or weight.dtype
        self.lora_A = nn.Parameter(torch.empty(spec.r, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, spec.r, dtype=dtype))
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.lora_enabled = True  # False inside lora_disabled(): forward is the base alone
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) (as nn.Linear does), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def init_lora_parameters(self, device: torch.device | str) -> None:
        """Give A and B storage on `device` and PEFT's init (the layer was built on the meta device)."""
        self.lora_A = nn.Parameter(torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.lora_B.shape, dtype=self.lora_B.dtype, device=device))
        self.reset_lora_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_enabled:
            return F.linear(x, self.weight)
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight) + self.scaling * lora

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.lora_alpha}"


def inject_lora(model: nn.Module, spec: LoraSpec,
                make: Callable[[nn.Linear, LoraSpec], nn.Module] | None = None) -> list[str]:
    """Replace every nn.Linear whose name ends in one of `spec.target_modules` by a LoRA layer.

    `make(linear, spec)` builds the replacement (default: LoRALinear around the same weight;
    the FP8 build passes one that returns FP8LoRALinear.empty). Freezes every other parameter.
    Returns the dotted paths of the wrapped modules. The training build calls it on the meta-device
    skeleton, before any partition exists (model/build.py).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in spec.target_modules
    ]
    for name, lin in targets:
        if lin.bias is not None:
            raise ValueError(f"{name}: LoRA on linear layers with bias is not supported (Llama has none)")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make(lin, spec) if make else LoRALinear(lin.weight, lin.in_features, lin.out_features, spec)
        setattr(parent, child, new)
    return [name for name, _ in targets]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Dotted path -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block every LoRALinear of `model` (FP8 ones included) returns its base output alone,
    y = x W^T, without computing the LoRA branch; each layer's previous state is restored on exit, also
    when the block raises.

    The switch is read when a forward runs. Activation checkpointing recomputes a forward during backward,
    so a pass with gradients that is checkpointed must also run its backward inside the block; the DPO
    reference pass needs no gradient (run it under torch.no_grad) and is not affected.
    """
    layers = list(lora_modules(model).values())
    before = [m.lora_enabled for m in layers]
    for m in layers:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m, was in zip(layers, before, strict=True):
            m.lora_enabled = was
