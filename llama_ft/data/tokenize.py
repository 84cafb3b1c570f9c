"""Rows -> training examples `{"input_ids": [...], "labels": [...]}` (labels unshifted, IGNORE_INDEX = untrained).

Single-turn formats follow qlora's DataCollatorForCausalLM:
    source_ids = tokenizer(source), with the tokenizer's special tokens (Llama 3: BOS first),
                 truncated to `source_max_len` tokens (BOS included in the count)
    target_ids = tokenizer(target + eos_token, add_special_tokens=False), truncated to `target_max_len`
                 (a truncated target loses its EOS, as in qlora)
    input_ids  = source_ids + target_ids;  labels = [IGNORE_INDEX] * S + target_ids
Chat rows go through the chat template (chat.py). Then `max_seq_len` cuts every example at the end.

An example is dropped when no token enters the loss: the loss predicts token t from tokens < t, so
label 0 never counts, and `trained_tokens(labels) = #{t >= 1 : labels[t] != IGNORE_INDEX}`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from llama_ft.data.chat import encode_conversation
from llama_ft.data.formats import CHAT, IGNORE_INDEX, conversation, source_target
from llama_ft.data.readers import LINE, Locator, RowRef
from llama_ft.errors import UserError


def trained_tokens(labels: list[int]) -> int:
    """How many of an example's tokens enter the loss (its labels after the one-token shift)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


# The tokenizers library keeps max_length in 32 bits: a larger one was an OverflowError traceback (fuzzer).
MAX_TOKENS = 2**31 - 1


def check_lengths(source_max_len: int, target_max_len: int, max_seq_len: int | None) -> None:
    for flag, value in (("--source_max_len", source_max_len), ("--target_max_len", target_max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS:
            raise UserError(f"{flag} must be an integer >= 1 and <= {MAX_TOKENS}, got {value!r}")
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or not 2 <= max_seq_len <= MAX_TOKENS):
        raise UserError(f"--max_seq_len must be an integer >= 2 (a token and the one it predicts) and <= {MAX_TOKENS}, "
                        f"got {max_seq_len!r}")


def encode_source_target(sources: list[str], targets: list[str], tokenizer: Any, source_max_len: int,
                         target_max_len: int, train_on_source: bool) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per source/target pair, tokenized in one batch per side (module doc)."""
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no eos_token; the model could not learn where a response ends")
    src_ids = tokenizer(sources, max_length=source_max_len, truncation=True)["input_ids"]
    tgt_ids = tokenizer([f"{t}{tokenizer.eos_token}" for t in targets], max_length=target_max_len, truncation=True,
                        add_special_tokens=False)["input_ids"]
    out = []
    for src, tgt in zip(src_ids, tgt_ids, strict=True):
        ids = list(src) + list(tgt)
        out.append((ids, list(ids) if train_on_source else [IGNORE_INDEX] * len(src) + list(tgt)))
    return out


def tokenize_rows(rows: Iterable[Mapping[str, str]], tokenizer: Any, source_max_len: int, target_max_len: int,
                  train_on_source: bool = False) -> list[dict[str, list[int]]]:
    """Source/target rows -> examples, in memory (module doc). Rows without a trained token (an empty
    target) are dropped; UserError if none is left, if a max length is < 1, or if the tokenizer has no EOS."""
    check_lengths(source_max_len, target_max_len, None)
    rows = list(rows)
    if not rows:
        raise UserError("no rows to tokenize (the dataset is empty)")
    pairs = encode_source_target([r["source"] for r in rows], [r["target"] for r in rows], tokenizer,
                                 source_max_len, target_max_len, train_on_source)
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in pairs if trained_tokens(labels) > 0]
    if not examples:
        raise UserError(f"every row has an empty target after truncation (--target_max_len {target_max_len})")
    return examples


def encode_batch(batch: dict[str, list], indices: list[int], *, dataset_format: str, tokenizer: Any,
                 source_max_len: int, target_max_len: int, max_seq_len: int | None, train_on_source: bool,
                 where: Locator) -> dict[str, list]:
    """The `datasets.map(batched=True, with_indices=True)` function: rows -> examples.

    Returns columns input_ids, labels and `cut` (True where `max_seq_len` shortened the example);
    examples without a trained token are left out (so the output may have fewer rows). A row's
    location (for errors) is its LINE column where the reader recorded one, else its index.
    """
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    refs = [RowRef(where, i, row.get(LINE)) for row, i in zip(rows, indices, strict=True)]
    if dataset_format == CHAT:
        pairs = [encode_conversation(tokenizer, conversation(row, ref), train_on_source, ref)
                 for row, ref in zip(rows, refs, strict=True)]
    else:
        st = [source_target(row, dataset_format, ref) for row, ref in zip(rows, refs, strict=True)]
        pairs = encode_source_target([s for s, _ in st], [t for _, t in st], tokenizer, source_max_len,
                                     target_max_len, train_on_source)
    out: dict[str, list] = {"input_ids": [], "labels": [], "cut": []}
    for ids, labels in pairs:
        cut = max_seq_len is not None and len(ids) > max_seq_len
        if cut:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if trained_tokens(labels) == 0:
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["cut"].append(cut)
    return out
