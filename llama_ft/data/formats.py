"""Row formats: what one raw row holds, checked, and turned into a source/target pair or a conversation.

Single-turn formats (qlora's `format_dataset`, Snowflake's lora_script.py) give `(source, target)`:
    alpaca        instruction (non-empty), input (optional), output: target = output,
                  source = PROMPT_INPUT.format(instruction, input) if input is non-empty
                           else PROMPT_NO_INPUT.format(instruction)
    input-output  source = input (verbatim), target = output
    chip2         text "<human>: Q\\n<bot>: A": source = Q, target = A (the first bot turn, as qlora)
    self-instruct source = prompt, target = completion
    hh-rlhf       source = "", target = chosen
    oasst1        source = "", target = text

The chat format gives a conversation `[{"role": "system"|"user"|"assistant", "content": str}, ...]`
from either form of a row:
    {"messages": [{"role": ..., "content": ...}, ...]}       OpenAI
    {"conversations": [{"from": ..., "value": ...}, ...]}    ShareGPT: human -> user, gpt -> assistant

Every check raises `UserError("<where>: ...")`, `where` naming the file and line (anything that
formats as that text: readers.RowRef builds it only when an error needs it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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

ROW_FIELDS: dict[str, tuple[str, ...]] = {**_REQUIRED_FIELDS, "alpaca": ("instruction", "input", "output")}
"""The fields a checked single-turn row keeps (typed_row), all strings."""

CHAT = "chat"
DATASET_FORMATS: tuple[str, ...] = (*_REQUIRED_FIELDS, CHAT)
"""Accepted --dataset_format values."""

CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def check_format(dataset_format: str) -> None:
    if dataset_format not in DATASET_FORMATS:
        raise UserError(
            f"--dataset_format {dataset_format!r} is not supported (expected one of: {', '.join(DATASET_FORMATS)})"
        )


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


def _check_object(row: Any, where: object) -> None:
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")


def source_target(row: Any, dataset_format: str, where: object) -> tuple[str, str]:
    """`(source, target)` of a single-turn row; UserError unless it carries the fields the format needs."""
    _check_object(row, where)
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
    return _TO_SOURCE_TARGET[dataset_format](row)


def conversation(row: Any, where: object) -> list[dict[str, str]]:
    """The messages of a chat row as `[{"role", "content"}]`, roles system/user/assistant.

    OpenAI rows (`messages`: role/content) pass through; ShareGPT rows (`conversations`: from/value)
    are mapped human -> user, gpt -> assistant, system -> system (user/assistant are accepted too).
    Raises UserError for a row with neither field, an empty list, a message that is not an object,
    an unknown role, content that is not a string, or no assistant message.
    """
    _check_object(row, where)
    if row.get("messages") is not None:
        field, role_key, content_key, roles = "messages", "role", "content", {r: r for r in CHAT_ROLES}
    elif row.get("conversations") is not None:
        field, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise UserError(f"{where}: neither 'messages' (OpenAI form) nor 'conversations' (ShareGPT form) is there "
                        "(required by --dataset_format chat)")
    items = row[field]
    if isinstance(items, list) and not items:
        raise UserError(f"{where}: '{field}' is empty (expected at least one message and an assistant reply)")
    out = messages_of(items, field, where, role_key, content_key, roles)
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant message (nothing to train on)")
    if out[0]["role"] == "assistant":
        raise UserError(f"{where}: the conversation opens with an assistant message; it needs a system or user "
                        "message before the first assistant reply")
    return out


def messages_of(items: Any, field: str, where: object, role_key: str = "role", content_key: str = "content",
                roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The list in `field` as `[{"role", "content"}]` (roles mapped through `roles`, default system/user/
    assistant); UserError naming `field[k]` for an item that is not an object, an unknown role, or content
    that is not a string."""
    roles = roles if roles is not None else {r: r for r in CHAT_ROLES}
    if not isinstance(items, list):
        raise UserError(f"{where}: '{field}' must be a list of messages, got {type(items).__name__}")
    out: list[dict[str, str]] = []
    for k, msg in enumerate(items):
        at = f"{{}}: {field}[{k}]"  # formatted with `where` only on an error (its location may cost a lookup)
        if not isinstance(msg, Mapping):
            raise UserError(f"{at.format(where)}: expected an object with '{role_key}' and '{content_key}', "
                            f"got {type(msg).__name__}")
        role = msg.get(role_key)
        if role not in roles:
            shown = "missing" if role is None else repr(role)
            raise UserError(f"{at.format(where)}: unknown {role_key} {shown} (expected one of: {', '.join(roles)})")
        content = msg.get(content_key)
        if not isinstance(content, str):
            got = "missing" if content is None else type(content).__name__
            raise UserError(f"{at.format(where)}: '{content_key}' must be a string, got {got}")
        out.append({"role": roles[role], "content": content})
    return out


def typed_row(row: Any, dataset_format: str, where: object) -> dict[str, Any]:
    """The row checked (source_target / conversation) and cut down to what its format reads, all strings:
    the ROW_FIELDS of a single-turn format (a missing or null alpaca input becomes ""), or `messages`
    as role/content pairs for chat (ShareGPT rows converted)."""
    if dataset_format == CHAT:
        return {"messages": conversation(row, where)}
    source_target(row, dataset_format, where)
    return {name: row.get(name) or "" for name in ROW_FIELDS[dataset_format]}
