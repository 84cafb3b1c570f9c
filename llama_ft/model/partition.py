"""ZeRO-3 partitions created directly at their final size, format and place, from a meta-device skeleton.

`deepspeed.zero.Init` partitions a parameter after its module's `__init__` has allocated it whole:
every rank holds the full tensor (in the training dtype) for a moment, rank 0's copy is broadcast,
and only then is each rank's slice kept. For a model whose weights the loader overwrites anyway, that
is one full model of traffic and, for an FP8 layer built from an nn.Linear, a bf16 partition that
should never exist.

Here the model is built on the meta device (shapes only) with its final module classes (LoRALinear,
FP8LoRALinear with uint8 storage), and each frozen parameter of n elements then gets only its
partition: ceil(n / W) elements of its own dtype, where it will live (the accelerator, pinned host
memory for offloaded ones, or the offload device of the DeepSpeed config). Nothing is broadcast:
the loader writes every byte of every frozen partition. The trainable LoRA tensors are small and
randomly initialised: they are created whole and go through DeepSpeed's own path (broadcast from
rank 0, then partition), so every rank starts from rank 0's values.

The parameters are DeepSpeed's own ZeRO-3 parameters (`Init._convert_to_deepspeed_param`: ds_id,
all_gather, partition, ...), so the engine, GatheredParameters and checkpointing treat them as ones
zero.Init made. Where DeepSpeed allocates partitions itself (the NVMe swapper's buffers, hpZ's
secondary partitions) a parameter is made whole first, one at a time, without a broadcast.
"""

from __future__ import annotations

import logging
import math

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus, ZeroParamStatus, is_zero_param
from torch import nn

log = logging.getLogger(__name__)


def partition_numel(numel: int, world_size: int) -> int:
    """Elements of one rank's ZeRO-3 partition: DeepSpeed pads n to a multiple of W, so ceil(n / W)."""
    return math.ceil(numel / world_size)


class DirectPartitioner(deepspeed.zero.Init):
    """zero.Init's parameter conversion, with meta-device parameters given only their partition.

    `host`: ids of parameters whose partitions go to host memory (pinned on a GPU machine) whatever
    the config says (`--offload_ratio`, model/offload.py).
    """

    def __init__(self, ds_config: dict, host: set[int] = frozenset()) -> None:
        super().__init__(config_dict_or_path=ds_config)
        self.host = host
        self._skeleton: set[int] = set()

    def partition_model(self, model: nn.Module) -> None:
        """Give every parameter of `model` its ZeRO-3 partition, in model order (the LoRA broadcasts
        are collectives: every rank must issue them in the same order)."""
        replaced = _storage_free_placeholders(model, self.local_device)
        self._skeleton = {id(p) for p in replaced.values()}
        self.host = {id(replaced[i]) if i in replaced else i for i in self.host}
        self._convert_to_zero_parameters(list(model.parameters()))  # parameters() yields a tied one once

    def _convert_to_zero_parameters(self, param_list):
        for p in param_list:
            if is_zero_param(p):
                continue
            if id(p) in self._skeleton:
                self._partition_meta(p)
            else:
                p.data = p.data.to(self.local_device)
                self._zero_init_param(p)  # DeepSpeed's: broadcast from rank 0, keep this rank's slice

    def _partition_meta(self, p: nn.Parameter) -> None:
        self._convert_to_deepspeed_param(p)  # shape and numel from the placeholder; ds_tensor None
        if self.remote_device == "nvme" or self.zero_param_process_group is not None:
            # DeepSpeed fills these partitions from a whole tensor: make it, one parameter at a time
            p.data = torch.zeros(p.ds_shape, dtype=p.dtype, device=self.local_device)
            p.partition()
            return
        aligned = self._aligned_size(p)
        size = aligned // self._partition_world_size(p)
        if p.ds_persist:  # small enough to stay whole on every rank after its first gather
            device = self.local_device
        elif id(p) in self.host:
            device = torch.device("cpu")
        else:
            device = torch.device(self.remote_device)
        pin = device.type == "cpu" and torch.cuda.is_available() and (id(p) in self.host or self.pin_memory)
        part = torch.empty(size, dtype=p.dtype, device=device, pin_memory=pin)
        start = size * self._partition_rank(p)
        owned = max(0, min(size, p.ds_numel - start))
        part[owned:].zero_()  # the last rank's padding: never read, but a saved partition is deterministic
        part.requires_grad = False
        part.ds_numel = size
        part.status = PartitionedParamStatus.AVAILABLE
        part.final_location = None
        p.ds_tensor = part
        p.ds_numel_aligned = aligned
        p.data = torch.empty(0, dtype=p.dtype, device=self.local_device)
        p.ds_status = ZeroParamStatus.NOT_AVAILABLE


def _replace_meta_parameters(model: nn.Module, make) -> dict[int, nn.Parameter]:
    """Replace every meta parameter by `make(meta_param)`, one new Parameter per tied group (a meta
    tensor cannot become a real one in place: `.data =` refuses). Returns id(meta) -> new."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(make(p), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
    return done


def _storage_free_placeholders(model: nn.Module, device: torch.device) -> dict[int, nn.Parameter]:
    """Every meta parameter becomes one of the same shape and dtype on `device` that holds a single
    element (a zero-stride expand), so DeepSpeed's conversion sees the shape. Returns id(meta) -> new."""
    return _replace_meta_parameters(model, lambda p: torch.empty((), dtype=p.dtype, device=device).expand(p.shape))


def materialize_unpartitioned(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Without ZeRO-3: give every meta parameter uninitialised storage of its own shape and dtype
    (tied parameters stay one tensor). The loader fills the frozen ones."""
    _replace_meta_parameters(model, lambda p: torch.empty(p.shape, dtype=p.dtype, device=device))
