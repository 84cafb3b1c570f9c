"""Forward passes that score a model: the loss of a micro-batch, eval loss over a set of examples, and greedy
exact match of the trained answers. Training (its eval split, `--eval_steps` / `--eval_every`) and
`llama-ft eval` both call these, so "eval loss" and "exact match" mean one thing everywhere.

The model is a DeepSpeed engine (training, ZeRO-3: every forward is collective, so every rank runs the same
number of them) or a plain transformers / PEFT causal LM (`llama-ft eval`). Either way its `lm_head` must be
HiddenStatesHead for the loss (train/loss.py) and the real head for generation (`real_lm_head`).

Exact match, per answer: an answer is a maximal run of trained labels in an example (an assistant turn with
its end-of-turn token, or an alpaca response with its EOS). Its prompt is every token before it (earlier
turns teacher-forced), its reference those tokens. The model generates greedily from the prompt until an
end-of-sequence token; the answer matches when the completion and the reference, each decoded with special
tokens skipped and stripped of surrounding whitespace, are the same string.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llama_ft.data import IGNORE_INDEX, collate, collate_packed
from llama_ft.data.batches import example_lengths
from llama_ft.data.packing import pack_best_fit
from llama_ft.model.segment_attention import restarts, segment_kwargs
from llama_ft.train.activation_memory import activation_offload
from llama_ft.train.loss import (
    HiddenStatesHead,
    LossMeter,
    batch_targets,
    batch_trained_count,
    lm_head_nll_sum,
    to_device,
)
from llama_ft.train.parallel import varlen_bounds

ANSWER_MARGIN = 16
"""Tokens generated beyond the reference's length when no --max_new_tokens is given: a completion that has not
ended by then is longer than the reference, so it cannot match."""

EOT_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>")
"""End-of-turn tokens of the common chat templates: generation also stops at any of them in the vocabulary."""

def model_inputs(batch: dict[str, torch.Tensor], packed: bool, flash: bool, device) -> dict[str, Any]:
    """What the model gets. Padded rows: input_ids + attention_mask. Packed rows: input_ids + position_ids and NO
    attention_mask (sdpa/eager: transformers builds the block-diagonal mask from position_ids only without one), and
    the rows' sequences as `llama_ft_segments`, which the model's attention uses when it is
    model/segment_attention.segment_sdpa (each sequence's attention computed apart) and ignores otherwise. Packed
    rows under flash_attention_2: the B rows as ONE sequence (1, B*T) with the varlen boundaries given (cu_seq_lens:
    where position_ids restart, the padding blocks included), since transformers takes flash's varlen path from
    position_ids only at batch size 1; built on the host, so flash never has to find them on the device. Flattening
    keeps the row-major token order, which is how loss_targets indexes the hidden states.

    A sequence-parallel shard (train/parallel.py, it carries `next_labels`) gets input_ids + position_ids
    only: Ulysses builds causality from the gathered positions; under flash the varlen boundaries of the
    whole (gathered) row go with it."""
    if "next_labels" in batch:
        inputs = {k: to_device(batch[k], device) for k in ("input_ids", "position_ids")}
        if "cu_seq_lens" in batch:
            cu = to_device(batch["cu_seq_lens"], device)
            inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_length"],
                          max_length_k=batch["max_length"])
        return inputs
    if not packed:
        return {k: to_device(batch[k], device) for k in ("input_ids", "attention_mask")}
    if not flash:  # each packed sequence's attention apart where the model has segment_sdpa (ignored elsewhere)
        return {**{k: to_device(batch[k], device) for k in ("input_ids", "position_ids")},
                **segment_kwargs(restarts(batch["position_ids"]), causal=True)}
    positions = batch["position_ids"].reshape(1, -1)
    bounds, longest = varlen_bounds(positions[0])
    cu = to_device(bounds, device)
    return {"input_ids": to_device(batch["input_ids"].reshape(1, -1), device),
            "position_ids": to_device(positions, device), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}


def micro_batch_nll(engine, head_weight, batch: dict[str, torch.Tensor], packed: bool, chunk: int,
                    flash: bool = False, offload: bool = False) -> torch.Tensor:
    """S: the summed token cross-entropy of one micro-batch (train/loss.py), chunked over its trained tokens.
    `offload`: what the forward saves for backward waits in host memory (train/activation_memory.py)."""
    positions, targets = batch_targets(batch)  # host: no sync to find the trained tokens
    inputs = model_inputs(batch, packed, flash, engine.device)
    with activation_offload(offload, pin_memory=torch.device(engine.device).type == "cuda"):
        hidden = engine(**inputs, use_cache=False).logits  # (B, T, H), or (1, B*T, H) flattened: see loss.py
        return lm_head_nll_sum(hidden, head_weight, to_device(positions, engine.device),
                               to_device(targets, engine.device), chunk)


@torch.no_grad()
def evaluate(engine, head_weight, examples, batch: int, pad_id: int, world: int, rank: int,
             pack_len: int | None, chunk: int, flash: bool = False, prepare=None) -> dict[str, float]:
    """{"loss": nats per trained token over `examples`, "trained_tokens"}, computed on all ranks together
    (train/loss.py): the same loss packed or not. Packed, the examples are best-fit packed in their order (no shuffle).

    `world`/`rank` are the data-parallel ones: a sequence-parallel group shares each micro-batch, which
    `prepare` turns into this rank's shard. Every rank runs the same number of forward passes (ZeRO-3
    gathers are collective); a rank with nothing left repeats a row and does not count it.
    """
    was_training = engine.training
    engine.eval()
    meter = LossMeter(engine.device)
    lengths = example_lengths(examples)
    rows = pack_best_fit(lengths, range(len(lengths)), pack_len) if pack_len else [[i] for i in range(len(lengths))]
    mine = rows[rank::world]
    for b in range(math.ceil(math.ceil(len(rows) / world) / batch)):
        chunk_rows = mine[b * batch:(b + 1) * batch]
        picked = [[examples[i] for i in row] for row in chunk_rows or rows[:1]]
        micro = collate_packed(picked, pad_id) if pack_len else collate([r[0] for r in picked], pad_id)
        if prepare is not None:
            micro = prepare(micro)
        nll = micro_batch_nll(engine, head_weight, micro, pack_len is not None, chunk, flash)
        if chunk_rows:
            meter.add(nll, batch_trained_count(micro), int(micro["attention_mask"].sum()))
    engine.train(was_training)
    return meter.mean()


def answer_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of trained labels (labels != IGNORE_INDEX), in order."""
    spans, start = [], None
    for t, y in enumerate(labels):
        if y != IGNORE_INDEX and start is None:
            start = t
        elif y == IGNORE_INDEX and start is not None:
            spans.append((start, t))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def example_answers(examples: Sequence[dict]) -> list[dict[str, Any]]:
    """{"example", "answer", "prompt" ids, "reference" ids} for every answer of every example (module doc).
    An answer at position 0 has no prompt to generate from (e.g. --train_on_source): it is left out and
    counted by the caller through `unprompted_examples`."""
    out = []
    for i in range(len(examples)):
        ids, labels = list(examples[i]["input_ids"]), list(examples[i]["labels"])
        for k, (s, e) in enumerate(answer_spans(labels)):
            if s > 0:
                out.append({"example": i, "answer": k, "prompt": ids[:s], "reference": ids[s:e]})
    return out


def unprompted_examples(examples: Sequence[dict]) -> list[int]:
    """Examples whose every trained token starts at position 0 or that train nothing: no answer to generate."""
    bad = []
    for i in range(len(examples)):
        spans = answer_spans(list(examples[i]["labels"]))
        if not any(s > 0 for s, _ in spans):
            bad.append(i)
    return bad


@contextlib.contextmanager
def real_lm_head(model: nn.Module) -> Iterator[None]:
    """The causal LM's own head in place of HiddenStatesHead (train/loss.py), for generation."""
    owner = causal_lm(model)
    swapped = owner.lm_head
    if not isinstance(swapped, HiddenStatesHead):
        yield
        return
    owner.lm_head = swapped.head
    try:
        yield
    finally:
        owner.lm_head = swapped


def causal_lm(model: nn.Module) -> nn.Module:
    """The module that owns `lm_head`: the model itself, or the one a PEFT wrapper holds."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the generation config's EOS ids, the tokenizer's EOS, and the
    end-of-turn tokens of the usual chat templates that this vocabulary has."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in EOT_NAMES if t in vocab)
    return sorted(ids)


def same_answer(completion: str, reference: str) -> bool:
    return completion.strip() == reference.strip()


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer: Any, answers: list[dict[str, Any]], device: torch.device,
                   world: int = 1, rank: int = 0, max_new_tokens: int | None = None, synced: bool = False,
                   gather: bool = True) -> list[dict[str, Any]]:
    """Greedy completions of `answers` (example_answers), scored (module doc). Rank r generates answers
    r, r + world, ...; with `synced` (ZeRO-3: forwards are collective) every rank makes the same number of
    generate calls (a rank with nothing left repeats one and drops it) and transformers keeps finished ranks
    stepping (`synced_gpus`). Returns every answer's record on every rank when `gather`, in answer order:
    {"example", "answer", "prompt", "completion", "reference", "match"}."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    mine = list(range(rank, len(answers), world))
    calls = math.ceil(len(answers) / world) if synced else len(mine)
    records = []
    with real_lm_head(model):
        for c in range(calls):
            j = mine[c] if c < len(mine) else (mine[0] if mine else 0)
            a = answers[j]
            ids = torch.tensor([a["prompt"]], device=device)
            budget = max_new_tokens or len(a["reference"]) + ANSWER_MARGIN
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                                 eos_token_id=stops, use_cache=True, synced_gpus=synced)
            if c >= len(mine):
                continue  # a repeat that only kept the collective forwards in step
            completion = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            reference = tokenizer.decode(a["reference"], skip_special_tokens=True)
            records.append({"index": j, "example": a["example"], "answer": a["answer"],
                            "prompt": tokenizer.decode(a["prompt"]), "completion": completion,
                            "reference": reference, "match": same_answer(completion, reference)})
    model.train(was_training)
    if gather and world > 1 and dist.is_initialized():
        parts: list = [None] * world
        dist.all_gather_object(parts, records)  # host sync: one object gather per evaluation
        records = [r for part in parts for r in part]
    records.sort(key=lambda r: r["index"])
    for r in records:
        del r["index"]
    return records
