"""Preference pairs for DPO: rows -> `{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}`.

A row holds one prompt and two responses to it, in one of three forms (TRL's conventions):

    {"prompt": str, "chosen": str, "rejected": str}                         strings
    {"chosen": [messages], "rejected": [messages]}                          chat, implicit prompt
    {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}   chat, explicit prompt

With the implicit prompt, both conversations must agree on every message but their last, which is the
response (an assistant message). Messages are OpenAI's `{"role", "content"}`.

Each side is encoded on its own, the prompt followed by that side's response, and only the response's
tokens carry labels (labels unshifted, IGNORE_INDEX elsewhere, as for SFT):

  chat (`chat=True`): the conversation prompt + response through the tokenizer's chat template, labels on
      the response's assistant messages only (chat.encode_conversation from the first response message:
      assistant turns inside the prompt stay untrained). A string prompt is one user message and a string
      response one assistant message, so the string form is a single-turn chat.
  raw (`chat=False`, strings only): exactly the single-turn SFT encoding (tokenize.encode_source_target):
      tokenizer(prompt) (BOS first) + tokenizer(response + eos_token, no special tokens), the prompt cut to
      `source_max_len` and the response to `target_max_len`. TRL's DPOTrainer builds the same sequence
      for text pairs: prompt tokens, then the completion's tokens and EOS.

Training reads pairs with `--objective dpo --dataset_format chat` from a local .json/.jsonl file
(read_pairs: each row checked as it is read, stored in the chat form), then encode_pair_rows under the
tokenize cache (data/pipeline.py). `--max_seq_len` cuts each side at the end; a pair is dropped (and
counted in the data report) when a side has no trained token left, or both sides are the same after the cut.

Bad rows raise one-line UserErrors naming the file and line (`where`, a readers.RowRef): no chosen or
rejected, an empty response, chosen identical to rejected (as given, or once encoded), and chat pairs whose
prompts differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_ft.data.chat import encode_conversation
from llama_ft.data.formats import CHAT, messages_of
from llama_ft.data.readers import LINE, Locator, RowRef, _json_values, quiet_datasets
from llama_ft.data.tokenize import encode_source_target, trained_tokens
from llama_ft.errors import UserError

Messages = list[dict[str, str]]
SIDES = ("chosen", "rejected")
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


@dataclass(frozen=True)
class PreferencePair:
    """A checked row: the prompt and the two responses, all strings (raw) or all message lists (chat)."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages


def _field(row: Mapping[str, Any], name: str, where: object) -> Any:
    value = row.get(name)
    if value is None:
        raise UserError(f"{where}: missing field '{name}' (a preference pair needs 'chosen' and 'rejected', and "
                        "'prompt' unless both are message lists)")
    if not isinstance(value, str | list):
        raise UserError(f"{where}: field '{name}' must be a string or a list of messages, got {type(value).__name__}")
    return value


def _as_messages(value: str | list, field: str, role: str, where: object) -> Messages:
    return [{"role": role, "content": value}] if isinstance(value, str) else messages_of(value, field, where)


def _check_response(messages: Messages, field: str, where: object) -> None:
    if not messages:
        raise UserError(f"{where}: '{field}' is empty (expected the response: one or more assistant messages)")
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            raise UserError(f"{where}: {field}[{k}] has role {m['role']!r}; a response holds assistant messages only")
    if not any(m["content"].strip() for m in messages):
        raise UserError(f"{where}: the '{field}' response is empty")


def check_pair(row: Any, chat: bool, where: object) -> PreferencePair:
    """The row as a PreferencePair (module doc); UserError for a row that is not one."""
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    chosen, rejected = _field(row, "chosen", where), _field(row, "rejected", where)
    prompt = row.get("prompt")
    lists = isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list)
    if lists and not chat:
        raise UserError(f"{where}: message lists in a preference pair need --dataset_format chat")
    if not chat:
        prompt = _field(row, "prompt", where)
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise UserError(f"{where}: the '{side}' response is empty")
        if chosen == rejected:
            raise UserError(f"{where}: 'chosen' and 'rejected' are identical (nothing to prefer)")
        return PreferencePair(prompt, chosen, rejected)
    if prompt is None:  # implicit prompt: everything but the last message, shared by both sides
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            _field(row, "prompt", where)  # raises: strings need an explicit prompt
        c, r = messages_of(chosen, "chosen", where), messages_of(rejected, "rejected", where)
        if not c or not r:
            raise UserError(f"{where}: '{'chosen' if not c else 'rejected'}' is empty (expected a conversation "
                            "ending with the response)")
        if c[:-1] != r[:-1]:
            k = next((i for i, (a, b) in enumerate(zip(c[:-1], r[:-1], strict=False)) if a != b),
                     min(len(c), len(r)) - 1)
            raise UserError(f"{where}: 'chosen' and 'rejected' differ before their last message (at message {k}); "
                            "both must share the prompt and differ only in the final assistant reply")
        prompt_msgs, c, r = c[:-1], c[-1:], r[-1:]
        if not prompt_msgs:
            raise UserError(f"{where}: 'chosen' holds only the response; a prompt message must come before it")
    else:
        prompt_msgs = _as_messages(_field(row, "prompt", where), "prompt", "user", where)
        c = _as_messages(chosen, "chosen", "assistant", where)
        r = _as_messages(rejected, "rejected", "assistant", where)
        if not prompt_msgs:
            raise UserError(f"{where}: 'prompt' is empty (expected at least one message)")
    _check_response(c, "chosen", where)
    _check_response(r, "rejected", where)
    if prompt_msgs[0]["role"] == "assistant":
        raise UserError(f"{where}: the prompt opens with an assistant message; it needs a system or user message "
                        "first")
    if c == r:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical (nothing to prefer)")
    return PreferencePair(prompt_msgs, c, r)


def encode_pair(pair: PreferencePair, tokenizer: Any, source_max_len: int, target_max_len: int,
                where: object) -> dict[str, list[int]]:
    """The four token lists of a checked pair (module doc): per side input_ids and labels of equal length."""
    out: dict[str, list[int]] = {}
    if isinstance(pair.prompt, str):
        encoded = encode_source_target([pair.prompt, pair.prompt], [pair.chosen, pair.rejected], tokenizer,
                                       source_max_len, target_max_len, train_on_source=False)
    else:
        first = len(pair.prompt)
        encoded = [encode_conversation(tokenizer, pair.prompt + response, False, where, first)
                   for response in (pair.chosen, pair.rejected)]
    if encoded[0] == encoded[1]:  # e.g. texts that differ only in whitespace the template trims, or past a cut
        raise UserError(f"{where}: 'chosen' and 'rejected' encode to the same tokens (nothing to prefer)")
    for side, (ids, labels) in zip(SIDES, encoded, strict=True):
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    return out


def encode_pair_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any, chat: bool,
                      source_max_len: int, target_max_len: int, where: Locator) -> dict[str, list]:
    """The `datasets.map(batched=True, with_indices=True)` function for pairs: rows -> PAIR_COLUMNS. A row is
    named by its LINE column where the reader recorded one, else by its index (as tokenize.encode_batch)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    out: dict[str, list] = {name: [] for name in PAIR_COLUMNS}
    for row, index in zip(rows, indices, strict=True):
        ref = RowRef(where, index, row.get(LINE))
        encoded = encode_pair(check_pair(row, chat, ref), tokenizer, source_max_len, target_max_len, ref)
        for name in PAIR_COLUMNS:
            out[name].append(encoded[name])
    return out


PAIR_SUFFIXES = (".json", ".jsonl")


def check_pair_options(dataset: str, dataset_format: str, train_on_source: bool) -> None:
    """The data flags `--objective dpo` can run (module doc); one UserError line for the others."""
    if dataset_format != CHAT:
        raise UserError(f"--objective dpo with --dataset_format {dataset_format}: preference pairs are read with "
                        "--dataset_format chat (rows {prompt, chosen, rejected} as strings or message lists, "
                        f"rendered with the chat template); {dataset_format} is a single-turn SFT format")
    if train_on_source:
        raise UserError("--train_on_source with --objective dpo: DPO compares the responses only")
    if Path(dataset).suffix not in PAIR_SUFFIXES:
        raise UserError(f"--objective dpo --dataset {dataset}: pairs are read from a local .json or .jsonl file "
                        "(Parquet and Hub datasets are not wired for pairs)")


def _checked_pair_rows(path: str, max_samples: int | None, content_key: str) -> Iterator[dict]:
    """The `Dataset.from_generator` generator: each row checked as it is read (errors name its line) and
    stored in the chat form (content_key keys its cache)."""
    n = 0
    for where, line, value in _json_values(Path(path)):
        pair = check_pair(value, True, where)
        yield {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, LINE: line}
        n += 1
        if n == max_samples:
            return
    if n == 0:
        raise UserError(f"dataset file {path} holds no rows (expected at least one)")


def read_pairs(source: Any, max_samples: int | None, cache_root: Path):
    """(rows, Locator) of a local pair file (readers.Source): checked chat pairs, the first `max_samples`."""
    import datasets

    from llama_ft.data.readers import _starts_with_object, one_line

    if source.path is None or source.path.suffix not in PAIR_SUFFIXES:
        raise UserError(f"--objective dpo --dataset {source.dataset}: pairs are read from a local .json or .jsonl "
                        "file")
    string = datasets.Value("string")
    messages = [{"role": string, "content": string}]
    features = datasets.Features({"prompt": messages, "chosen": messages, "rejected": messages,
                                  LINE: datasets.Value("int64")})
    lines = source.path.suffix == ".jsonl" or _starts_with_object(source.path)
    try:
        with quiet_datasets():
            rows = datasets.Dataset.from_generator(
                _checked_pair_rows, features=features, cache_dir=str(cache_root / "rows"),
                gen_kwargs={"path": str(source.path), "max_samples": max_samples, "content_key": source.key})
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise UserError(f"dataset file {source.path}: cannot be read ({one_line(e.__cause__ or e)})") from None
    return rows, Locator(str(source.path), "lines" if lines else "list")


def encode_pair_rows(batch: dict[str, list], indices: list[int], *, tokenizer: Any, source_max_len: int,
                     target_max_len: int, max_seq_len: int | None, where: Locator) -> dict[str, list]:
    """The training map function: read_pairs' rows -> PAIR_COLUMNS + `cut` (True where --max_seq_len shortened
    a side). A pair is left out when a side has no trained token after the cut, or both sides are the same
    tokens after it (nothing left to prefer); the pipeline counts those as dropped."""
    encoded = encode_pair_batch(batch, indices, tokenizer=tokenizer, chat=True, source_max_len=source_max_len,
                                target_max_len=target_max_len, where=where)
    out: dict[str, list] = {name: [] for name in (*PAIR_COLUMNS, "cut")}
    for k in range(len(indices)):
        sides, cut = [], False
        for side in SIDES:
            ids, labels = encoded[f"{side}_input_ids"][k], encoded[f"{side}_labels"][k]
            if max_seq_len is not None and len(ids) > max_seq_len:
                ids, labels, cut = ids[:max_seq_len], labels[:max_seq_len], True
            sides.append((ids, labels))
        if any(trained_tokens(labels) == 0 for _, labels in sides) or sides[0] == sides[1]:
            continue
        for side, (ids, labels) in zip(SIDES, sides, strict=True):
            out[f"{side}_input_ids"].append(ids)
            out[f"{side}_labels"].append(labels)
        out["cut"].append(cut)
    return out
