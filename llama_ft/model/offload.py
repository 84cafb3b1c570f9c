"""Partial CPU offload of the frozen base weights (`--offload --offload_ratio R`, Snowflake's flags).

Under ZeRO-3 each rank holds one partition of every parameter. With `--offload`, the partitions
of a fraction R (by bytes) of the frozen base weights of the LoRA-targeted linears (FP8 bytes and
scales included) live in host memory (pinned when there is a GPU), the rest stay on the GPU.
ZeRO-3 all-gathers a host partition by copying it to the GPU as part of the gather, and its
prefetcher (`stage3_prefetch_bucket_size`) issues gathers ahead of use, so offloaded layers are
brought over before the layer runs; nothing is gathered into host memory.

Which weights: chosen by error diffusion over the model order, so the offloaded bytes are spread
evenly through the depth (R = 0.25 offloads about one weight in four in every block), not the
first R of the layers (a first-R split makes the early layers slow and the rest idle on the
link). The choice is made on the meta skeleton, so the chosen partitions are created in host
memory and the loader writes them there: none is ever allocated on the GPU.

R = 0 keeps everything on the GPU, R = 1 offloads every frozen base linear. On CPU ranks every
partition is in host memory anyway: the choice is made and reported, nothing moves. With a
DeepSpeed config that already offloads parameters (`offload_param`), all partitions are on the
host and R has no further effect.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llama_ft.lora import LoRALinear
from llama_ft.plan.planner import spread_evenly  # torch-free: the planner makes the same choice

log = logging.getLogger(__name__)


def frozen_base_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every frozen base-weight tensor of the LoRA layers, in model order."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for n, p in m.named_parameters(recurse=False):
                if not n.startswith("lora_"):
                    out.append((f"{path}.{n}", p))
    return out


def choose_offloaded(model: nn.Module, ratio: float, world_size: int = 1) -> tuple[set[int], dict[str, int]]:
    """Which frozen base tensors keep their partitions in host memory: ids of about `ratio` of the
    frozen base bytes of this rank, spread evenly through the depth. Decided on the meta skeleton,
    before any partition exists, so the chosen partitions are created in host memory
    (model/partition.py) and the loader writes them there.

    Partition bytes: ceil(numel / world_size) x element size (ZeRO-3 pads to a multiple of the ranks).
    Returns (ids, {"offloaded_bytes", "frozen_base_bytes", "offloaded_tensors"}) for this rank.
    """
    params = frozen_base_params(model)
    sizes = [-(-p.numel() // world_size) * p.element_size() for _, p in params]
    chosen = spread_evenly(sizes, ratio)
    ids = {id(p) for (_, p), take in zip(params, chosen, strict=True) if take}
    offloaded = sum(s for s, take in zip(sizes, chosen, strict=True) if take)
    log.info("offload: %d of %d frozen base tensors (%.1f of %.1f MiB on this rank) in host memory%s",
             sum(chosen), len(params), offloaded / 2**20, sum(sizes) / 2**20,
             "" if torch.cuda.is_available() else " (CPU ranks: all partitions are host memory already)")
    return ids, {"offloaded_bytes": offloaded, "frozen_base_bytes": sum(sizes), "offloaded_tensors": sum(chosen)}
