"""Attention over a packed row's segments one at a time, instead of the whole row under a block-diagonal mask.

A packed row of width T holds segments [s_0, e_0), [s_1, e_1), ... that cover it (each packed sequence, or with
--dpo_shared_prompt each pair's prompt + chosen + rejected; the padding tail is a segment of its own), and no
token attends across a segment boundary. sdpa with the row's (T, T) mask computes all T^2 query-key scores and
throws the cross-segment ones away; this computes only sum_i (e_i - s_i)^2 of them:

    out[b, s:e] = sdpa(q[b, :, s:e], k[b, :, s:e], v[b, :, s:e], mask[b, :, s:e, s:e])     for each segment

with mask the causal one (packing) or the row's own 4-D mask cut to the segment (the shared-prompt layout, where
the rejected response must not see the chosen one). Per token it attends the same keys with the same weights as
the whole-row call, so the result is the same up to the order of floating-point sums. On the development
machine's CPU (8 heads of 64, a 2,214-token row of 4 segments, forward + backward, one thread) it took 87-108 ms
against 305 ms for the masked row.

transformers takes an attention function by name (AttentionInterface), so the model is switched to
"llama_ft_sdpa" (use_segment_attention), and each forward that has segments passes them as the keyword argument
`llama_ft_segments` (a Segments; model inputs built on the host from position_ids or group_ids, so finding them
costs no device sync). Without it the function is transformers' sdpa, unchanged: eval, generate and the SP path
call the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

NAME = "llama_ft_sdpa"


@dataclass(frozen=True)
class Segments:
    """bounds[b]: row b's segments as (start, end) pairs covering [0, T) in order. causal: each segment is one
    causal sequence (the mask is not read); else the row's 4-D mask is cut to each segment."""

    bounds: tuple[tuple[tuple[int, int], ...], ...]
    causal: bool


def _bounds(ids: torch.Tensor, starts_at) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(B, T) host ids -> each row's segments as (start, end) pairs, a segment starting at t > 0 where
    starts_at(row, t)."""
    out = []
    for row in ids.tolist():
        cuts = [0, *(t for t in range(1, len(row)) if starts_at(row, t)), len(row)]
        out.append(tuple(zip(cuts[:-1], cuts[1:], strict=True)))
    return tuple(out)


def runs(ids: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(B, T) host ids -> each row's maximal runs of equal ids as (start, end) pairs (group_ids: one pair of the
    shared-prompt layout, or the padding tail)."""
    return _bounds(ids, lambda row, t: row[t] != row[t - 1])


def restarts(position_ids: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(B, T) host position_ids of packed rows -> each row's sequences as (start, end): a sequence starts where
    the position is 0 (collate restarts positions per sequence, the padding tail included)."""
    return _bounds(position_ids, lambda row, t: row[t] == 0)


def segment_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 llama_ft_segments: Segments | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, T, D), key/value (B, Hkv, T, D) -> ((B, T, H, D),
    None). With segments, one sdpa call per segment (module doc); without, transformers' sdpa as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if llama_ft_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = llama_ft_segments.bounds
    if len(bounds) != query.shape[0] or any(row[-1][1] != query.shape[2] for row in bounds):
        raise ValueError(f"llama_ft_segments cover {[row[-1][1] for row in bounds]} tokens in {len(bounds)} rows; "
                         f"the attention has {query.shape[0]} rows of {query.shape[2]}")
    rows = []
    for b, row in enumerate(bounds):
        parts = []
        for s, e in row:
            mask = None if llama_ft_segments.causal else attention_mask[b:b + 1, :, s:e, s:e]
            out, _ = sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                            value[b:b + 1, :, s:e], mask, dropout=dropout, scaling=scaling, **kwargs)
            parts.append(out)
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return (torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]), None


def register() -> None:
    """Make NAME a transformers attention implementation (idempotent): segment_sdpa, with sdpa's mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, segment_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_segment_attention(model: torch.nn.Module) -> None:
    """Switch an sdpa model to segment_sdpa (same results; packed rows' segments computed apart)."""
    register()
    model.config._attn_implementation = NAME


def segment_kwargs(bounds: Sequence[Sequence[tuple[int, int]]], causal: bool) -> dict[str, Segments]:
    """The forward keyword argument that turns segment attention on for one micro-batch."""
    return {"llama_ft_segments": Segments(tuple(tuple(r) for r in bounds), causal)}
