"""Collation: right-pad a micro-batch of examples into int64 tensors, and the id to pad with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from llama_ft.data.formats import IGNORE_INDEX
from llama_ft.errors import UserError

LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"
"""Llama 3.1's reserved padding token; used when the tokenizer has no pad token set."""


def collate(features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of examples to its longest one.

    Returns int64 tensors of shape (batch, max_len):
        input_ids       the ids, then `pad_token_id`
        attention_mask  1 on real tokens, 0 on padding
        labels          the labels, then IGNORE_INDEX
    """
    if not features:
        raise ValueError("collate needs at least one example")
    max_len = max(len(f["input_ids"]) for f in features)
    batch = len(features)
    input_ids = torch.full((batch, max_len), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((batch, max_len), dtype=torch.int64)
    labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=torch.int64)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise ValueError(f"example {i}: {len(f['labels'])} labels for {n} input_ids")
        input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.int64)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(pairs: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B preference pairs (data/pairs.py columns) as one right-padded batch of 2B rows, the chosen sides
    first: rows [c_1 .. c_B, r_1 .. r_B], so row p and row B + p are the two sides of pair p (one forward
    pass scores both). Returns collate's tensors, shape (2B, max_len), plus "pairs": B.
    """
    rows = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
            for side in ("chosen", "rejected") for p in pairs]
    return {**collate(rows, pad_token_id), "pairs": len(pairs)}


def collate_packed_pairs(rows: Sequence[Sequence[Mapping[str, Sequence[int]]]],
                         pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows of preference pairs (each row a list of whole pairs) -> collate_packed's tensors of the
    sequences c_1, r_1, c_2, r_2, ... laid out row by row (position_ids restart at each side: no side sees
    another), plus

        sequence_ids    (rows, width) int64: k on the tokens of pair k's chosen side, P + k on its rejected
                        side, -1 on padding; pairs numbered 0..P-1 in row order, then within a row
        pairs           P

    so sequence s of loss.sequence_logprobs is the same as row s of collate_pairs on the same pairs in the
    same order (chosen sides first). Labels of a side's first token are IGNORE_INDEX (collate_packed), which
    a response never starts at: the prompt comes first.
    """
    sides = ("chosen", "rejected")
    seq_rows = [[{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]} for p in row for side in sides]
                for row in rows]
    out = collate_packed(seq_rows, pad_token_id)
    total = sum(len(row) for row in rows)
    sequence_ids = torch.full_like(out["input_ids"], -1)
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for p in row:
            for s, side in enumerate(sides):
                n = len(p[f"{side}_input_ids"])
                sequence_ids[r, at:at + n] = k + s * total
                at += n
            k += 1
    return {**out, "sequence_ids": sequence_ids, "pairs": total}


def is_pairs(examples: Any) -> bool:
    """Whether `examples` (a datasets.Dataset or a list of dicts) holds preference pairs, not SFT examples."""
    names = examples.column_names if hasattr(examples, "column_names") else (examples[0] if len(examples) else {})
    return "chosen_input_ids" in names


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: tokenizer.pad_token_id if set; else Llama 3.1's "<|finetune_right_pad_id|>"
    if the vocabulary has it; else eos_token_id. (Padding never reaches the loss: labels are
    IGNORE_INDEX and attention_mask 0 there.)"""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    vocab = tokenizer.get_vocab()
    if LLAMA3_PAD_TOKEN in vocab:
        return int(vocab[LLAMA3_PAD_TOKEN])
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise UserError("the tokenizer has no pad_token, no <|finetune_right_pad_id|> and no eos_token to pad with")


def collate_packed(rows: Sequence[Sequence[Mapping[str, Sequence[int]]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows (each a list of whole examples) -> int64 tensors of shape (rows, longest row):

        input_ids       the examples' ids one after the other, then `pad_token_id`
        position_ids    0, 1, ... restarting at each example; the padding counts 0, 1, ... as its own block
        labels          the examples' labels with each example's first label IGNORE_INDEX (no label
                        crosses an example boundary, data/packing.py), then IGNORE_INDEX
        attention_mask  1 on real tokens, 0 on padding: for counting only. The model must NOT get it:
                        transformers builds the block-diagonal mask from position_ids only without one.
    """
    if not rows or not all(rows):
        raise ValueError("collate_packed needs rows of at least one example each")
    lengths = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((len(rows), width), dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            if len(e["labels"]) != n:
                raise ValueError(f"row {r}: an example has {len(e['labels'])} labels for {n} input_ids")
            input_ids[r, at:at + n] = torch.as_tensor(e["input_ids"], dtype=torch.int64)
            labels[r, at + 1:at + n] = torch.as_tensor(e["labels"][1:], dtype=torch.int64)
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        attention_mask[r, :at] = 1
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "attention_mask": attention_mask}
