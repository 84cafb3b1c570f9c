"""Streaming loader: every rank reads only the checkpoint bytes of its own ZeRO-3 partitions.

ZeRO-3 stores parameter p (numel n) on W ranks as equal flat slices of ps = ceil(n / W)
elements (the last one padded): rank r owns elements [r * ps, min((r + 1) * ps, n)) of the
row-major flattened tensor. Those elements lie in rows [start // row, ceil(end / row)), one
contiguous byte range of the shard, which is all the rank reads (`ShardReader`), straight into
`p.ds_tensor` (host memory when parameters are offloaded). No rank materialises a tensor it
does not keep, and summed over ranks the bytes read are the checkpoint plus at most one
partial row per partition boundary.

Quantized layers (llama_ft/quant: FP8LoRALinear, NF4LoRALinear) are quantized on load:
- FP8: a rank reads the rows of W its FP8 bytes cover, widened to whole 128-row block stripes (a block
  scale needs its whole block), quantizes them, and keeps its slice of the bytes. Each rank thus knows
  the block scales of the stripes it read; one max-all-reduce of the (tiny) scale matrix gives every rank
  all of them, and each keeps its own slice of the scale bytes. Extra reading: under one stripe per
  partition boundary.
- NF4: blocks of 64 run over the flattened W, and both storage tensors are flat, so a rank reads the
  elements its code bytes and its absmax bytes cover, widened to whole blocks, quantizes them chunk by
  chunk and keeps its slices: no collective, extra reading under two blocks per partition boundary.
From a pre-quantized checkpoint (ours for FP8, bitsandbytes' for NF4) the stored bytes are copied into
the partitions, no weight is dequantized.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llama_ft.fp8.checkpoint import SCALE_SUFFIX
from llama_ft.fp8.format import BLOCK, num_blocks, scales_to_bytes
from llama_ft.fp8.module import quantize_device, quantize_fp8
from llama_ft.nf4 import checkpoint as nf4_checkpoint
from llama_ft.nf4.format import BLOCK as NF4_BLOCK
from llama_ft.nf4.format import quantize_nf4_reference
from llama_ft.quant.module import quant_modules
from llama_ft.shards import Checkpoint, ShardReader

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What loading cost this rank (written as load_report_rank{R}.json)."""

    rank: int
    world_size: int
    checkpoint_bytes: int
    bytes_read: int
    seconds: float
    peak_rss_bytes: int
    partition_bytes_gpu: int = 0
    partition_bytes_host: int = 0
    tensors: int = 0
    quantized_layers: int = 0
    extra: dict = field(default_factory=dict)
    # the whole build (model/meter.py): phases with seconds and peak memory, bytes of collectives
    build: dict = field(default_factory=dict)

    def line(self) -> str:
        gpu_peak = self.build.get("max_memory_allocated")
        return (f"load: read {self.bytes_read / 2**20:.1f} MiB of {self.checkpoint_bytes / 2**20:.1f} MiB "
                f"in {self.seconds:.1f} s, build peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
                + (f", GPU peak {gpu_peak / 2**20:.0f} MiB" if gpu_peak is not None else "")
                + f", {self.build.get('comm_bytes', 0) / 2**20:.1f} MiB communicated; partitions "
                f"{self.partition_bytes_gpu / 2**20:.1f} MiB on GPU / {self.partition_bytes_host / 2**20:.1f} MiB host")

    def set_partition_bytes(self, model: nn.Module) -> None:
        """Bytes of this rank's parameter storage on the accelerator and in host memory."""
        self.partition_bytes_gpu = self.partition_bytes_host = 0
        for p in model.parameters():
            part = owned_range(p)[2]
            nbytes = part.numel() * part.element_size()
            if part.device.type == "cpu":
                self.partition_bytes_host += nbytes
            else:
                self.partition_bytes_gpu += nbytes

    def write(self, out_dir: str | os.PathLike) -> Path:
        path = Path(out_dir) / f"load_report_rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def owned_range(p: nn.Parameter) -> tuple[int, int, torch.Tensor]:
    """(start, end, partition tensor) of this rank's slice of the flattened parameter
    (the whole parameter when it is not partitioned)."""
    if not hasattr(p, "ds_tensor"):
        return 0, p.numel(), p.data.view(-1)
    part = p.ds_tensor
    ps = part.ds_numel if hasattr(part, "ds_numel") else part.numel()
    rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
    start = min(rank * ps, p.ds_numel)
    return start, min(start + ps, p.ds_numel), part


def _fill_plain(p: nn.Parameter, reader: ShardReader, name: str) -> None:
    start, end, part = owned_range(p)
    if end > start:
        part.data[: end - start].copy_(reader.read_flat(name, start, end).to(part.dtype))


def _fill_fp8(m: nn.Module, reader: ShardReader, name: str) -> None:
    """Quantize this rank's share of W (N, K) on load into m.weight (q bytes) and m.weight_scale."""
    n, k = m.out_features, m.in_features
    q_start, q_end, q_part = owned_range(m.weight)
    s_start, s_end, s_part = owned_range(m.weight_scale)
    nb_k = num_blocks(k)
    scales = torch.zeros(num_blocks(n), nb_k, dtype=torch.float32, device=q_part.device)
    if q_end > q_start:
        r0, r1 = q_start // k, -(-q_end // k)
        b0, b1 = r0 // BLOCK, num_blocks(r1)
        w = reader.read_rows(name, b0 * BLOCK, min(b1 * BLOCK, n)).to(quantize_device())
        q, s = quantize_fp8(w)
        scales[b0:b1] = s.to(scales.device)
        off = q_start - b0 * BLOCK * k
        q_part.data[: q_end - q_start].copy_(q.reshape(-1)[off: off + q_end - q_start])
    if dist.is_initialized() and dist.get_world_size() > 1:
        # every block row was quantized by at least one rank, identically by any rank that did;
        # reduced on the communication device (an offloaded layer's partition is in host memory)
        from deepspeed.accelerator import get_accelerator

        comm = scales.to(get_accelerator().current_device_name())
        dist.all_reduce(comm, op=dist.ReduceOp.MAX, group=getattr(m.weight_scale, "ds_process_group", None))
        scales = comm.to(scales.device)
    if s_end > s_start:
        s_part.data[: s_end - s_start].copy_(scales_to_bytes(scales).reshape(-1)[s_start:s_end])


def _fill_fp8_prequantized(m: nn.Module, reader: ShardReader, name: str) -> None:
    """Copy this rank's FP8 bytes and scale bytes from a `llama-ft quantize` checkpoint: no math."""
    q_start, q_end, q_part = owned_range(m.weight)
    if q_end > q_start:
        q_part.data[: q_end - q_start].copy_(reader.read_flat(name, q_start, q_end).view(torch.uint8))
    s_start, s_end, s_part = owned_range(m.weight_scale)  # byte offsets into the fp32 scale grid
    if s_end > s_start:
        e0, e1 = s_start // 4, -(-s_end // 4)
        raw = reader.read_flat(name + SCALE_SUFFIX, e0, e1).view(torch.uint8)
        s_part.data[: s_end - s_start].copy_(raw[s_start - 4 * e0: s_end - 4 * e0])


NF4_CHUNK = NF4_BLOCK * 16384
"""Weights read and quantized at a time by the NF4 loader (1M: a few MiB of fp32 scratch)."""


def _copy_overlap(part: torch.Tensor, p0: int, p1: int, src: torch.Tensor, s0: int) -> None:
    """part holds bytes [p0, p1) of a flat tensor, src bytes [s0, s0 + len(src)): copy what they share."""
    lo, hi = max(p0, s0), min(p1, s0 + src.numel())
    if hi > lo:
        part.data[lo - p0: hi - p0].copy_(src[lo - s0: hi - s0])


def _nf4_span(m: nn.Module) -> tuple[int, int, int, int, torch.Tensor, int, int, torch.Tensor]:
    """(e0, e1) the elements of the flattened W this rank's code and absmax bytes cover, widened to whole
    blocks (e1 may be the tensor's end); then (start, end, partition) of `weight` and of `weight_absmax`."""
    numel = m.out_features * m.in_features
    w0, w1, w_part = owned_range(m.weight)
    a0, a1, a_part = owned_range(m.weight_absmax)
    spans = [(2 * w0, min(2 * w1, numel))] if w1 > w0 else []
    if a1 > a0:
        spans.append((a0 // 4 * NF4_BLOCK, min(-(-a1 // 4) * NF4_BLOCK, numel)))
    if not spans:
        return 0, 0, w0, w1, w_part, a0, a1, a_part
    e0 = min(s for s, _ in spans) // NF4_BLOCK * NF4_BLOCK
    e1 = min(-(-max(e for _, e in spans) // NF4_BLOCK) * NF4_BLOCK, numel)
    return e0, e1, w0, w1, w_part, a0, a1, a_part


def _fill_nf4(m: nn.Module, reader: ShardReader, name: str) -> None:
    """Quantize this rank's share of W on load into m.weight (codes) and m.weight_absmax (fp32 bytes), one
    NF4_CHUNK of the flattened W at a time. Chunks start on block boundaries and hold whole blocks (or run to
    the tensor's end), so each gives exactly its slice of the whole tensor's quantization (format.py)."""
    e0, e1, w0, w1, w_part, a0, a1, a_part = _nf4_span(m)
    for c0 in range(e0, e1, NF4_CHUNK):
        c1 = min(c0 + NF4_CHUNK, e1)
        packed, absmax = quantize_nf4_reference(reader.read_flat(name, c0, c1).to(quantize_device()))
        _copy_overlap(w_part, w0, w1, packed.to(w_part.device), c0 // 2)
        _copy_overlap(a_part, a0, a1, absmax.view(torch.uint8).to(a_part.device), c0 // NF4_BLOCK * 4)


def _fill_nf4_prequantized(m: nn.Module, reader: ShardReader, name: str) -> None:
    """Copy this rank's code bytes from a bnb-4bit checkpoint, and its absmax (double-dequantized when the file
    holds it compressed, an exact fp32 computation on 1/64 of the elements): no weight is dequantized."""
    numel = m.out_features * m.in_features
    w0, w1, w_part = owned_range(m.weight)
    if w1 > w0:
        w_part.data[: w1 - w0].copy_(reader.read_flat(name, w0, w1).view(torch.uint8).reshape(-1))
    a0, a1, a_part = owned_range(m.weight_absmax)
    if a1 > a0:
        b0, b1 = a0 // 4, min(-(-a1 // 4), -(-numel // NF4_BLOCK))
        absmax = nf4_checkpoint.read_absmax(reader, nf4_checkpoint.read_quant_state(reader.ckpt, name, reader), b0, b1)
        _copy_overlap(a_part, a0, a1, absmax.view(torch.uint8).to(a_part.device), 4 * b0)


FILLERS = {"fp8": (_fill_fp8, _fill_fp8_prequantized), "nf4": (_fill_nf4, _fill_nf4_prequantized)}
"""A quantized layer's format -> (quantize on load, copy from a pre-quantized checkpoint)."""


def stream_checkpoint_into_partitions(model: nn.Module, ckpt: Checkpoint, prequantized: bool = False) -> LoadReport:
    """Fill every ZeRO-3 partition of `model` from `ckpt`, reading only this rank's bytes. Collective
    for models with FP8 layers (one scale all-reduce per layer, in model order on every rank)."""
    t0 = time.time()
    reader = ShardReader(ckpt)
    quant = quant_modules(model)
    quant_params = {id(p) for m in quant.values() for p in m.storage()}
    tensors = 0
    try:
        for name, p in model.named_parameters(remove_duplicate=True):
            if p.requires_grad or id(p) in quant_params:
                continue
            _fill_plain(p, reader, name)
            tensors += 1
        for name, m in quant.items():
            FILLERS[m.FORMAT][1 if prequantized else 0](m, reader, name)
            tensors += 1
    finally:
        reader.close()
    return LoadReport(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        checkpoint_bytes=ckpt.total_bytes(), bytes_read=reader.bytes_read, seconds=time.time() - t0,
        peak_rss_bytes=0, tensors=tensors, quantized_layers=len(quant),
    )
