"""Chat conversations -> token ids and assistant-only labels, through the tokenizer's chat template.

    input_ids = apply_chat_template(messages, tokenize=True)["input_ids"]          (exactly those ids)
    labels[t] = input_ids[t] if token t lies in an assistant span, else IGNORE_INDEX

An assistant span is the text the template renders for one assistant message: its content and the
end-of-turn token that closes it (Llama 3.1: `content|trim + "<|eot_id|>"`). Its bounds come from the
template itself, so any template works that renders earlier turns the same once later turns follow:

    start = len(render(messages[:i], add_generation_prompt=True))   # ends with the assistant header
    end   = len(render(messages[:i + 1]).rstrip())                  # ends with the end-of-turn token

A token is trained when its character range (the fast tokenizer's offsets into the rendered text)
overlaps a span, the rule transformers uses for `return_assistant_tokens_mask`. System and user
turns, role headers and BOS stay IGNORE_INDEX; `train_on_source` trains every token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_ft.data.formats import IGNORE_INDEX
from llama_ft.data.readers import one_line
from llama_ft.errors import UserError


def check_jinja(text: str, source: str) -> None:
    """UserError naming `source` and the line unless `text` compiles as transformers compiles chat templates."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - older transformers: plain Jinja with the loop extension
        def _compile_jinja_template(t: str):
            return jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string(t)
    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{source}:{e.lineno}: not a valid Jinja chat template ({one_line(e.message)})") from None


def load_chat_template(path: str) -> str:
    """The text of a `--chat_template` Jinja file, checked to compile."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--chat_template {path}: file not found (expected a Jinja chat template file)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chat_template {path}: cannot read it ({one_line(e)})") from None
    if not text.strip():
        raise UserError(f"--chat_template {path}: the file is empty (expected a Jinja chat template)")
    check_jinja(text, str(p))
    return text


def use_chat_template(tokenizer: Any, template_file: str | None, source: str) -> None:
    """Install `--chat_template FILE` on the tokenizer (so it is saved with it), or check it has one.

    `source` names where the tokenizer came from, for the error when it has no template.
    """
    if template_file:
        tokenizer.chat_template = load_chat_template(template_file)
    elif not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--dataset_format chat: the tokenizer of {source} has no chat template; pass "
                        "--chat_template FILE (a Jinja template, e.g. the Llama 3.1 Instruct one)")


def _render(tokenizer: Any, messages: list[dict[str, str]], where: object, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as e:  # jinja2 raise_exception() in a template, undefined variables, ...
        raise UserError(f"{where}: the chat template cannot render this conversation ({one_line(e)})") from None


_PROMPTS_ASSISTANT: dict[str, bool] = {}


def prompts_assistant(tokenizer: Any) -> bool:
    """Whether the chat template honours add_generation_prompt (renders the assistant header for it).
    Checked once per template on a one-message probe."""
    key = repr(tokenizer.chat_template)
    if key not in _PROMPTS_ASSISTANT:
        probe = [{"role": "user", "content": "x"}]
        _PROMPTS_ASSISTANT[key] = _render(tokenizer, probe, "the chat template", add_generation_prompt=True) != \
            _render(tokenizer, probe, "the chat template")
    return _PROMPTS_ASSISTANT[key]


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], rendered: str,
                    where: object, first: int = 0) -> list[tuple[int, int]]:
    """Character ranges [start, end) of each assistant message's rendering in `rendered` (see module doc),
    for the messages from index `first` on (DPO trains the response, not the assistant turns of its prompt).

    Whitespace the template puts after the end-of-turn token (ChatML's newline) is left out. A template
    that ignores add_generation_prompt renders the assistant header inside the turn: the span then
    starts at the (trimmed) content, its last occurrence in the turn.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        head = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], where)
        if not (rendered.startswith(turn) and turn.startswith(head)):
            raise UserError(f"{where}: the chat template renders message {i} differently once later messages follow, "
                            "so its assistant tokens cannot be located (use a template that renders turns in order)")
        start, end = len(head), len(turn.rstrip())
        if not prompts_assistant(tokenizer):
            content = m["content"].strip()
            at = turn.rfind(content, start, end) if content else -1
            if at < 0:
                raise UserError(f"{where}: the chat template ignores add_generation_prompt and message {i}'s content "
                                "is not in its rendering, so its assistant tokens cannot be located")
            start = at
        spans.append((start, max(start, end)))
    return spans


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], train_on_source: bool,
                        where: object, first: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, both of length T (labels unshifted); only the assistant
    messages from index `first` on are trained."""
    rendered = _render(tokenizer, messages, where)
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise UserError(f"--dataset_format chat needs a fast tokenizer (tokenizer.json) for its character offsets; "
                        f"{type(tokenizer).__name__} has none") from None
    ids = list(enc["input_ids"])
    if train_on_source:
        return ids, list(ids)
    spans = assistant_spans(tokenizer, messages, rendered, where, first)
    labels = [IGNORE_INDEX] * len(ids)
    k = 0  # spans and token offsets are both in order: one pass
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if e > spans[k][0] and s < spans[k][1]:
            labels[t] = ids[t]
    return ids, labels
