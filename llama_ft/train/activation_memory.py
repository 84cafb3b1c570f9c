"""The activation-memory pieces of DeepSpeed's ALST that fit LoRA: tiled MLP and activation-checkpoint offload.

Tiled MLP (`--tiled_mlp`): a Llama MLP, down(act(gate(x)) * up(x)) with x (B, T, H), holds three
(B, T, I) intermediates (I = 3.5 H for Llama 3.1) while it runs and, under autograd, until its backward.
DeepSpeed's TiledMLP runs it over `tiles` slices of the sequence under no_grad, keeps only x, and in backward
recomputes each slice with grad and backpropagates it at once: at most one slice's intermediates exist at a
time. The MLP's trainable parameters (the LoRA A and B of gate/up/down, FP8 or bf16 base alike) are its
`compute_params`: ZeRO-3 is told (ds_grad_is_ready) to reduce their gradients only after the last slice.
The recompute does not replay dropout masks, so --tiled_mlp needs --lora_dropout 0 (config.py refuses).

Every rank must make the same number of MLP calls (ZeRO-3 gathers the projections per call, a collective),
so `tiles` is fixed for the run from the longest sequence a rank can get, and every micro-batch's width is
padded to a multiple of it (train/parallel.py): torch.chunk then makes exactly `tiles` slices everywhere.

Activation offload (`--activation_offload`, with gradient checkpointing): the tensors autograd saves in the
forward pass are kept in host memory (pinned on GPUs) until the backward needs them, through torch's own
`save_on_cpu`. With checkpointed decoder layers those are, above all, each layer's input (B, T, H): the
checkpoints themselves (torch's non-reentrant checkpoint saves them outside its own hooks), so device
memory holds one layer's recompute instead of every layer's checkpoint.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


def tile_mlp(mlp: nn.Module, tiles: int) -> None:
    """Make one MLP run through DeepSpeed's TiledMLP in `tiles` slices. Its own class forward is the per-slice
    function, so LoRA and FP8 layers inside it run unchanged; its trainable parameters are compute_params."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    compute_params = [p for p in mlp.parameters() if p.requires_grad]
    slice_forward = type(mlp).forward

    def tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        return TiledMLP.apply(slice_forward, self, x, tiles, compute_params)

    mlp.forward = types.MethodType(tiled_forward, mlp)


def use_tiled_mlp(model: nn.Module, tiles: int) -> int:
    """tile_mlp on every decoder layer's MLP; returns how many."""
    for layer in model.model.layers:
        tile_mlp(layer.mlp, tiles)
    return len(model.model.layers)


def activation_offload(enabled: bool, pin_memory: bool):
    """The context for a forward pass whose saved tensors should wait in host memory (module doc)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)
