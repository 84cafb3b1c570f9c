"""Small host-side collectives (flags, verdicts, example indices) that must not touch the GPU.

Under NCCL a CPU tensor cannot be all-reduced, and moving a flag to the GPU to reduce it makes the host
wait for the queued GPU work. So these go through one gloo group made for them (`host_group`, created
once, collectively, the first time any rank asks); where the default group is gloo (CPU ranks) it is used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_GROUP: list = []


def host_group():
    """The gloo group for host tensors (None = the default group, when that is gloo). Collective the
    first time: every rank must call it at the same point."""
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    if not _GROUP:
        _GROUP.append(dist.new_group(backend="gloo"))
    return _GROUP[0]


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value`, on every rank (one small all-reduce)."""
    t = torch.tensor([int(value)], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any."""
    return bool(max_over_ranks(int(flag)))


def from_rank0(values: list[int]) -> list[int]:
    """Rank 0's `values` on every rank (the others pass a list of the same length)."""
    t = torch.tensor(values, dtype=torch.int64)
    if dist.is_initialized():
        dist.broadcast(t, 0, group=host_group())
    return t.tolist()
