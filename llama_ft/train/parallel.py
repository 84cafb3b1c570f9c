"""Ulysses sequence parallelism (DeepSpeed's ALST) on the ZeRO-3 LoRA path.

With `--sequence_parallel_size N`, the W ranks form W / N data-parallel groups of N consecutive ranks
(DeepSpeed's parallel_state_sp: ranks g*N .. g*N+N-1 share sequences). Every rank of a group draws the
same micro-batch (the data stream is indexed by the data-parallel rank), and keeps one contiguous 1/N of
its columns:

    micro-batch (B, T), T padded to a multiple of N * tiles  ->  rank s of the group: columns
    [s * T/N, (s+1) * T/N) of input_ids, position_ids and the pre-shifted labels y'[t] = y[t + 1]

Labels are shifted BEFORE the split, so the last token of a shard predicts the first label of the next
shard, which lives on another rank. The attention itself is DeepSpeed's UlyssesSPAttentionHF,
registered in transformers' attention table in place of the core implementation (sdpa or
flash_attention_2): an all-to-all turns (B, T/N, heads) into (B, T, heads/N) around the core attention
and back. It drops every 4D mask and builds causality from the gathered position_ids, so:

- right-padded rows need no mask (a real token never attends to the padding after it);
- packed rows (several examples per row) are only correct with flash_attention_2's varlen path, which
  takes the example boundaries from position_ids; sdpa would let examples attend to each other.

The loss needs no change beyond the shift: a rank's S is the sum over its shard's trained tokens, N (the
step's trained tokens) is all-reduced over every rank, and each rank's gradient holds its own tokens' share
of dL/dtheta (the all-to-all's backward returns the other shards' share of the attention). DeepSpeed's
ZeRO-3 reduce-scatter averages over all W ranks, so backward_scale(N, W) gives exactly dL/dtheta
(train/loss.py). Its other reduce path (contiguous all-reduce, used per bucket when reduce_scatter is off)
divides by W / N instead, so fill_ds_config keeps reduce_scatter on under SP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_ft.data.formats import IGNORE_INDEX
from llama_ft.train.loss import next_token_labels
from llama_ft.train.sp_layout import SequenceParallel


def register_ulysses(model, attn: str, size: int, micro_batch: int):
    """Put DeepSpeed's UlyssesSPAttentionHF in place of `attn` in transformers' attention table and create
    the sequence-parallel groups (collective). Returns the mpu for deepspeed.initialize."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attn, sequence_parallel_size=size,
        micro_batch_size=micro_batch, seq_length_is_variable=True)


def _pad_width(batch: dict[str, torch.Tensor], multiple: int, pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad every (B, T) tensor to a width divisible by `multiple`. Padding never enters the loss or the
    counts (labels IGNORE_INDEX, attention_mask 0). Its positions: packed rows get a block of its own from 0,
    as collate_packed pads; unpacked rows count on (causal attention keeps the real tokens blind to them)."""
    b, t = batch["input_ids"].shape
    extra = -(-t // multiple) * multiple - t
    if extra == 0:
        return batch
    fill = {"input_ids": pad_id, "next_labels": IGNORE_INDEX, "attention_mask": 0}
    out = {k: F.pad(batch[k], (0, extra), value=v) for k, v in fill.items()}
    tail = torch.arange(extra) if packed else torch.arange(t, t + extra)
    out["position_ids"] = torch.cat([batch["position_ids"], tail.expand(b, extra)], dim=1)
    return out


def _pad_rows(batch: dict[str, torch.Tensor], rows: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Add all-padding rows up to `rows` (Ulysses checks the micro-batch size; eval's last batch is short)."""
    b, t = batch["input_ids"].shape
    if b >= rows:
        return batch
    fill = {"input_ids": pad_id, "next_labels": IGNORE_INDEX, "attention_mask": 0}
    out = {k: torch.cat([batch[k], torch.full((rows - b, t), v, dtype=torch.int64)]) for k, v in fill.items()}
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(t).expand(rows - b, t)])
    return out


def shard_micro_batch(batch: dict[str, torch.Tensor], sp: SequenceParallel, rows: int, multiple: int, pad_id: int,
                      packed: bool, flash: bool) -> dict[str, torch.Tensor | int]:
    """This rank's part of a collated micro-batch (host tensors; no communication: every rank of the group
    collated the same one).

    1. labels -> next_labels y'[:, t] = y[:, t + 1] (IGNORE_INDEX last), per row, before anything is split;
       unpacked rows get position_ids 0..T-1;
    2. packed rows under flash_attention_2 become one row (1, B*T) in row-major order (transformers takes the
       varlen path at batch size 1), else short batches get all-padding rows up to `rows`;
    3. the width is padded to a multiple of `multiple` (sp.size x the tiled-MLP tiles);
    4. columns [s * T/N, (s+1) * T/N) of input_ids, position_ids, next_labels and attention_mask (for
       counting) are this rank's; with flash, `cu_seq_lens` (int32) and `max_length` describe the varlen
       segments of the WHOLE row, since the core attention runs on the gathered sequence.
    """
    b, t = batch["input_ids"].shape
    full = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "next_labels": next_token_labels(batch["labels"]),
            "position_ids": batch["position_ids"] if packed else torch.arange(t).expand(b, t)}
    if packed and flash:
        full = {k: v.reshape(1, -1) for k, v in full.items()}
    else:
        full = _pad_rows(full, rows, pad_id)
    full = _pad_width(full, multiple, pad_id, packed)
    width = full["input_ids"].shape[1] // sp.size
    cols = slice(sp.sp_rank * width, (sp.sp_rank + 1) * width)
    local: dict[str, torch.Tensor | int] = {k: v[:, cols].contiguous() for k, v in full.items()}
    if packed and flash:
        local["cu_seq_lens"], local["max_length"] = varlen_bounds(full["position_ids"][0])
    return local


def varlen_bounds(positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash_attention_2's varlen description of one packed row: (cu_seq_lens int32 = where `positions`
    restart at 0, then the row's length; the longest segment)."""
    starts = torch.nonzero(positions == 0).flatten()
    bounds = torch.cat([starts, torch.tensor([positions.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())
