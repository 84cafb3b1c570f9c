"""Instruction data: load rows, apply the prompt template, tokenize, split, collate.

The recipe follows qlora (artidoro/qlora) and Snowflake's lora_script.py:

    file / hub dataset --load_rows--> [{"source": prompt, "target": response}, ...]
        --tokenize_rows--> [{"input_ids": [...], "labels": [...]}, ...]   (BOS + source + target + EOS)
        --train_eval_split--> (train, eval)
        --collate--> {"input_ids", "attention_mask", "labels"}: int64 (batch, max_len), right-padded

Loss is taken on the target tokens only (labels are IGNORE_INDEX on the prompt) unless
`train_on_source`. Every mistake in what the user handed us raises `UserError` with a one-line
message naming the file, line/row, field or flag.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from llama_ft.errors import UserError

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

IGNORE_INDEX = -100
"""Label value that torch.nn.CrossEntropyLoss (ignore_index default) leaves out of the loss."""

LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"
"""Llama 3.1's reserved padding token; used when the tokenizer has no pad token set."""

LOCAL_SUFFIXES = (".json", ".jsonl")

CHIP2_BOT = "\n<bot>: "
CHIP2_HUMAN = "<human>: "

# --dataset_format -> the fields each row must carry (all strings). "alpaca" also reads an
# optional "input". The HF formats map rows as qlora's `format_dataset` does.
_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),  # + optional "input"
    "input-output": ("input", "output"),  # source = input verbatim
    "chip2": ("text",),  # "<human>: Q\n<bot>: A" (laion/OIG unified_chip2)
    "self-instruct": ("prompt", "completion"),  # yizhongw/self_instruct
    "hh-rlhf": ("chosen",),  # Anthropic/hh-rlhf: source "", target = chosen dialogue
    "oasst1": ("text",),  # timdettmers/openassistant-guanaco: source "", target = text
}

DATASET_FORMATS: tuple[str, ...] = tuple(_REQUIRED_FIELDS)
"""Accepted --dataset_format values."""


def _alpaca(row: Mapping[str, Any]) -> tuple[str, str]:
    instruction, inp = row["instruction"], row.get("input") or ""
    if inp:
        return PROMPT_INPUT.format(instruction=instruction, input=inp), row["output"]
    return PROMPT_NO_INPUT.format(instruction=instruction), row["output"]


def _chip2(row: Mapping[str, Any]) -> tuple[str, str]:
    # qlora: input = text.split(BOT)[0] without "<human>: ", output = text.split(BOT)[1]
    parts = row["text"].split(CHIP2_BOT)
    return parts[0].replace(CHIP2_HUMAN, ""), parts[1]


_TO_SOURCE_TARGET: dict[str, Callable[[Mapping[str, Any]], tuple[str, str]]] = {
    "alpaca": _alpaca,
    "input-output": lambda row: (row["input"], row["output"]),
    "chip2": _chip2,
    "self-instruct": lambda row: (row["prompt"], row["completion"]),
    "hh-rlhf": lambda row: ("", row["chosen"]),
    "oasst1": lambda row: ("", row["text"]),
}


def _check_row(row: Any, dataset_format: str, where: str) -> None:
    """Raise UserError unless `row` carries the fields `dataset_format` needs, as strings."""
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in _REQUIRED_FIELDS[dataset_format]:
        if field not in row or row[field] is None:
            raise UserError(f"{where}: missing field '{field}' (required by --dataset_format {dataset_format})")
        if not isinstance(row[field], str):
            raise UserError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
    if dataset_format == "alpaca":
        if not row["instruction"].strip():
            raise UserError(f"{where}: field 'instruction' is empty")
        # "input" is optional; a missing or null input means no input.
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise UserError(f"{where}: field 'input' must be a string, got {type(row['input']).__name__}")
    if dataset_format == "chip2" and CHIP2_BOT not in row["text"]:
        raise UserError(
            f"{where}: field 'text' has no {CHIP2_BOT.strip()!r} turn (chip2 expects '<human>: ...\\n<bot>: ...')"
        )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, value) for each non-blank line of a JSON-lines file; line numbers from 1."""
    # split on "\n" only: str.splitlines would also break on U+2028 etc., which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield f"{path}: line {lineno}", value


def _iter_local(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) from a local .json (a JSON list) or .jsonl file."""
    if path.is_dir():
        raise UserError(f"dataset {path} is a directory (expected a .json or .jsonl file or a hub dataset name)")
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist (expected a .json or .jsonl file or a hub dataset name)")
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"dataset file {path}: unsupported file type '{path.suffix}' (expected .json or .jsonl)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"dataset file {path}: not UTF-8 text ({_one_line(e)})") from None
    if not text.strip():
        raise UserError(f"dataset file {path} is empty (expected at least one row)")
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # JSON lines saved as .json (datasets' json loader reads both): read it as lines.
            yield from _iter_jsonl(path, text)
            return
        raise UserError(f"dataset file {path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if not isinstance(data, list):
        raise UserError(f"dataset file {path}: expected a JSON list of objects, got a JSON {type(data).__name__}")
    for index, value in enumerate(data):
        yield f"{path}: row {index}", value


def _iter_hub(name: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) from the 'train' split of a Hugging Face hub dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except (OSError, datasets.exceptions.DatasetsError) as e:
        # ConnectionError (offline / unreachable) and DatasetNotFoundError are both OSErrors.
        raise UserError(
            f"--dataset {name} is neither a local file nor reachable on the Hugging Face hub ({_one_line(e)})"
        ) from None
    except ValueError as e:  # e.g. Unknown split "train"
        raise UserError(f"--dataset {name}: cannot load its 'train' split ({_one_line(e)})") from None
    for index, value in enumerate(ds):
        yield f"--dataset {name}: row {index}", value


def _looks_like_path(dataset: str) -> bool:
    return dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith(("/", "./", "../", "~"))


def load_rows(dataset: str, dataset_format: str, max_samples: int | None = None) -> list[dict[str, str]]:
    """Read instruction data and return rows `{"source": prompt_text, "target": response_text}`.

    `dataset` is an existing local `.json` file (a JSON list of objects; JSON lines saved as .json are
    read too) or `.jsonl` file (one object per line, blank lines skipped), or else a Hugging Face hub
    dataset name, loaded with `datasets.load_dataset(name, split="train")`. A name that ends in
    .json/.jsonl or starts with / ./ ../ ~ is always a local path and must exist.

    `dataset_format` (one of DATASET_FORMATS) says how a row becomes source/target:
        alpaca        instruction (non-empty), input (optional), output: target = output,
                      source = PROMPT_INPUT.format(instruction, input) if input is non-empty
                               else PROMPT_NO_INPUT.format(instruction)
        input-output  source = input (verbatim), target = output
        chip2         text "<human>: Q\\n<bot>: A": source = Q, target = A (the first bot turn, as qlora)
        self-instruct source = prompt, target = completion
        hh-rlhf       source = "", target = chosen
        oasst1        source = "", target = text
    Every needed field must be a string. `max_samples` keeps the first N rows (rows after them are
    not read). Raises UserError (one line naming the file, line/row, field or flag) on any problem.
    """
    if dataset_format not in DATASET_FORMATS:
        raise UserError(
            f"--dataset_format {dataset_format!r} is not supported (expected one of: {', '.join(DATASET_FORMATS)})"
        )
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0
    ):
        raise UserError(f"--max_samples must be a positive integer, got {max_samples!r}")
    path = Path(dataset).expanduser()
    if path.exists() or _looks_like_path(dataset):
        source, items = str(path), _iter_local(path)
    else:
        source, items = f"--dataset {dataset}", _iter_hub(dataset)
    to_source_target = _TO_SOURCE_TARGET[dataset_format]
    rows: list[dict[str, str]] = []
    for where, row in items:
        _check_row(row, dataset_format, where)
        src, tgt = to_source_target(row)
        rows.append({"source": src, "target": tgt})
        if max_samples is not None and len(rows) >= max_samples:
            break
    if not rows:
        raise UserError(f"{source} holds no rows (expected at least one)")
    return rows


def tokenize_rows(
    rows: Iterable[Mapping[str, str]],
    tokenizer: Any,
    source_max_len: int,
    target_max_len: int,
    train_on_source: bool = False,
) -> list[dict[str, list[int]]]:
    """Tokenize source/target rows into training examples (qlora's DataCollatorForCausalLM semantics).

    For each row:
        source_ids = tokenizer(source), with the tokenizer's special tokens (Llama 3: BOS first),
                     truncated to `source_max_len` tokens (BOS included in the count)
        target_ids = tokenizer(target + tokenizer.eos_token, add_special_tokens=False), truncated to
                     `target_max_len` tokens (a truncated target loses its EOS, as in qlora)
        input_ids  = source_ids + target_ids                        length S + T
        labels     = [IGNORE_INDEX] * S + target_ids                (input_ids copy if train_on_source)
    Labels are not shifted: the model shifts them. Rows whose target is empty after tokenization
    are dropped; UserError if none is left, or if a max length is < 1, or the tokenizer has no EOS.
    """
    for flag, value in (("--source_max_len", source_max_len), ("--target_max_len", target_max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} must be an integer >= 1, got {value!r}")
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no eos_token; the model could not learn where a response ends")
    rows = list(rows)
    if not rows:
        raise UserError("no rows to tokenize (the dataset is empty)")
    sources = [row["source"] for row in rows]
    targets = [f"{row['target']}{tokenizer.eos_token}" for row in rows]
    source_ids = tokenizer(sources, max_length=source_max_len, truncation=True)["input_ids"]
    target_ids = tokenizer(targets, max_length=target_max_len, truncation=True, add_special_tokens=False)["input_ids"]
    examples: list[dict[str, list[int]]] = []
    for src, tgt in zip(source_ids, target_ids, strict=True):
        if not tgt:
            continue
        input_ids = list(src) + list(tgt)
        labels = list(input_ids) if train_on_source else [IGNORE_INDEX] * len(src) + list(tgt)
        examples.append({"input_ids": input_ids, "labels": labels})
    if not examples:
        raise UserError(f"every row has an empty target after truncation (--target_max_len {target_max_len})")
    return examples


def train_eval_split(examples: list, eval_dataset_size: int | float, seed: int) -> tuple[list, list]:
    """Split `examples` into (train, eval), disjoint, together all of them.

    eval_dataset_size: 0 -> no eval set; an int N >= 1 (or an integral float such as 200.0) -> N
    examples; a float in (0, 1) -> ceil(fraction * len(examples)) examples (so at least 1).
    The eval examples are the first ones of `random.Random(seed).shuffle` over the indices, so the
    same seed gives the same split; both lists keep the original order of `examples`.
    UserError (naming --eval_dataset_size) if the size is negative or eval would take every example.
    """
    n = len(examples)
    size = eval_dataset_size
    if isinstance(size, bool) or not isinstance(size, int | float) or not math.isfinite(size) or size < 0:
        raise UserError(f"--eval_dataset_size must be 0, an integer >= 1 or a fraction in (0, 1), got {size!r}")
    if size == 0:
        return list(examples), []
    if isinstance(size, int) or float(size).is_integer():
        n_eval = int(size)
    else:
        if size > 1:
            raise UserError(f"--eval_dataset_size {size!r}: a fraction must be in (0, 1), a count an integer")
        n_eval = math.ceil(size * n)
    if n_eval >= n:
        raise UserError(
            f"--eval_dataset_size {size!r} asks for {n_eval} eval examples but there are only {n}; "
            "training needs at least one"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    evals = [ex for i, ex in enumerate(examples) if i in eval_idx]
    return train, evals


def collate(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
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
        input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.int64)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(f["labels"], dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
