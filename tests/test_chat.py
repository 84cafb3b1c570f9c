"""Chat data: the Llama 3.1 Instruct template, assistant-only labels, OpenAI vs ShareGPT rows, max_seq_len cuts.

Labels are checked against a computation of our own: the assistant contents are found in the rendered
text by plain string search, and a token is trained when its character range (the tokenizer's offsets)
overlaps one of them (content + "<|eot_id|>"). The implementation finds the spans by rendering prefixes.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from llama_ft.data import IGNORE_INDEX, DataOptions, prepare_examples, use_chat_template
from llama_ft.data.chat import encode_conversation
from llama_ft.data.formats import conversation
from llama_ft.errors import UserError

# Meta's Llama 3.1 Instruct chat template (tokenizer_config.json of meta-llama/Llama-3.1-8B-Instruct), verbatim.
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

SYSTEM_BLOCK = ("<|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    """The tiny tokenizer (Llama 3.1's special tokens) carrying the template above."""
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = LLAMA31_TEMPLATE
    return t


CONVO = [
    {"role": "system", "content": "You answer in one word.  "},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": " Blue. "},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green, mostly.\nSometimes yellow."},
]


def test_llama31_template_renders_headers_eot_and_date_lines(tok):
    text = tok.apply_chat_template(CONVO, tokenize=False)
    assert text == (
        "<|begin_of_text|>" + SYSTEM_BLOCK + "You answer in one word.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nColour of the sky?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd grass?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nGreen, mostly.\nSometimes yellow.<|eot_id|>")
    # without a system message the block with its date lines is still there, empty
    no_sys = tok.apply_chat_template(CONVO[1:3], tokenize=False)
    assert no_sys.startswith("<|begin_of_text|>" + SYSTEM_BLOCK + "<|eot_id|><|start_header_id|>user")
    special = {tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|start_header_id|>",
                                                      "<|end_header_id|>", "<|eot_id|>")}
    ids = tok.apply_chat_template(CONVO, tokenize=True)["input_ids"]
    assert special <= set(ids) and ids[0] == tok.bos_token_id  # the header tokens are single special tokens


def reference_labels(tok, messages) -> tuple[list[int], list[int]]:
    """Labels from character offsets: each assistant content (trimmed, as the template does) is searched
    in the rendered text after the previous one; its span runs through the "<|eot_id|>" that follows."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for m in messages:
        if m["role"] != "assistant":
            continue
        head = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        at = text.index(head + m["content"].strip() + "<|eot_id|>", cursor) + len(head)
        end = at + len(m["content"].strip()) + len("<|eot_id|>")
        spans.append((at, end))
        cursor = end
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tid if any(s < e2 and e > s2 for s2, e2 in spans) else IGNORE_INDEX
              for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return enc["input_ids"], labels


@pytest.mark.parametrize("messages", [
    CONVO,
    CONVO[1:3],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "b"}, {"role": "assistant", "content": "x y z"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "<|eot_id|> in the text"},
     {"role": "user", "content": "trailing user turn, not trained"}],
])
def test_assistant_only_labels_match_offsets_reference(tok, messages):
    ids, labels = encode_conversation(tok, messages, train_on_source=False, where="t")
    assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]  # exactly the template's ids
    ref_ids, ref_labels = reference_labels(tok, messages)
    assert (ids, labels) == (ref_ids, ref_labels)
    trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == "".join(m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant")
    assert labels[0] == IGNORE_INDEX  # BOS


def test_train_on_source_trains_everything(tok):
    ids, labels = encode_conversation(tok, CONVO, train_on_source=True, where="t")
    assert labels == ids == tok.apply_chat_template(CONVO, tokenize=True)["input_ids"]


def test_sharegpt_and_openai_rows_tokenize_identically(tok):
    share = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                "value": m["content"]} for m in CONVO]}
    assert conversation(share, "w") == conversation({"messages": CONVO}, "w") == CONVO
    a = encode_conversation(tok, conversation(share, "w"), False, "w")
    b = encode_conversation(tok, conversation({"messages": CONVO}, "w"), False, "w")
    assert a == b


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_chat_file_with_max_seq_len_cuts(tok, tmp_path):
    rows = [{"messages": CONVO}, {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    f = write_rows(tmp_path / "c.jsonl", rows)
    full, stats = prepare_examples(DataOptions(dataset=str(f), dataset_format="chat"), tok, cache_dir=tmp_path / "c")
    assert stats.examples == 2 and stats.cut == 0
    assert full[0] == dict(zip(("input_ids", "labels"), encode_conversation(tok, CONVO, False, "w"), strict=True))
    n = len(full[0]["input_ids"]) - 3
    cut, stats = prepare_examples(DataOptions(dataset=str(f), dataset_format="chat", max_seq_len=n), tok,
                                  cache_dir=tmp_path / "c")
    assert stats.cut == 1 and cut[0] == {k: v[:n] for k, v in full[0].items()} and cut[1] == full[1]


def test_alpaca_max_seq_len_applies_after_source_target_limits(tok, tmp_path):
    f = write_rows(tmp_path / "a.jsonl", [{"instruction": "Spell the word castle slowly.", "output": "c a s t l e"}])
    opts = dict(dataset=str(f), source_max_len=12, target_max_len=6)
    (ex,), _ = prepare_examples(DataOptions(**opts), tok, cache_dir=tmp_path / "c")
    assert len(ex["input_ids"]) == 18  # 12 + 6
    (cut,), stats = prepare_examples(DataOptions(**opts, max_seq_len=15), tok, cache_dir=tmp_path / "c")
    assert stats.cut == 1 and cut == {k: v[:15] for k, v in ex.items()}
    with pytest.raises(UserError, match="none of its 1 rows has a token to train on"):
        prepare_examples(DataOptions(**opts, max_seq_len=12), tok, cache_dir=tmp_path / "c")  # the cut leaves no target


def test_tokenized_once_then_read_from_cache(tok, tmp_path, monkeypatch):
    f = write_rows(tmp_path / "c.jsonl", [{"messages": CONVO}] * 3)
    opts = DataOptions(dataset=str(f), dataset_format="chat")
    first, stats = prepare_examples(opts, tok, cache_dir=tmp_path / "c")
    assert not stats.from_cache

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(type(tok), "__call__", no_tokenizing)
    again, stats = prepare_examples(opts, tok, cache_dir=tmp_path / "c")
    assert stats.from_cache and list(again) == list(first)
    monkeypatch.undo()
    # a different option, tokenizer state or file content is a different key
    _, stats = prepare_examples(DataOptions(dataset=str(f), dataset_format="chat", train_on_source=True), tok,
                                cache_dir=tmp_path / "c")
    assert not stats.from_cache
    write_rows(f, [{"messages": CONVO}] * 2)
    changed, stats = prepare_examples(opts, tok, cache_dir=tmp_path / "c")
    assert not stats.from_cache and len(changed) == 2


# --------------------------------------------------------------------------- bad chat rows

@pytest.mark.parametrize("row,needle", [
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "messages[0]: unknown role 'robot' (expected one of: system, user, assistant)"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "conversations[0]: unknown from 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "anyone?"}]},
     "the conversation has no assistant message"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
     "messages[0]: 'content' must be a string, got list"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "messages[0]: 'content' must be a string, got int"),
    ({"text": "hello"}, "neither 'messages' (OpenAI form) nor 'conversations' (ShareGPT form)"),
    ({"messages": [{"role": "assistant", "content": "I speak first"}]}, "opens with an assistant message"),
])
def test_bad_chat_rows_name_file_and_line(tok, tmp_path, row, needle):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n")  # the bad row is on line 3
    with pytest.raises(UserError) as e:
        prepare_examples(DataOptions(dataset=str(f), dataset_format="chat"), tok, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert f"{f}: line 3" in msg and needle in msg and "\n" not in msg, msg


def test_tokenizer_without_template_needs_chat_template(tiny_model_dir, tmp_path):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = None
    with pytest.raises(UserError, match="has no chat template; pass --chat_template FILE"):
        use_chat_template(t, None, "MODEL")
    f = tmp_path / "t.jinja"
    f.write_text(LLAMA31_TEMPLATE)
    use_chat_template(t, str(f), "MODEL")
    assert t.chat_template == LLAMA31_TEMPLATE


@pytest.mark.parametrize("text,needle", [
    (None, "--chat_template {f}: file not found"),
    ("{% for m in messages %}{{ m.content }}\n{% endfor", "{f}:2: not a valid Jinja chat template"),
    ("", "the file is empty"),
])
def test_bad_chat_template_file(tiny_model_dir, tmp_path, text, needle):
    f = tmp_path / "t.jinja"
    if text is not None:
        f.write_text(text)
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError) as e:
        use_chat_template(t, str(f), "MODEL")
    assert needle.format(f=f) in str(e.value), str(e.value)


def test_parquet_rows_read_like_json_lines(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": CONVO}, {"messages": CONVO[1:3]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    write_rows(tmp_path / "c.jsonl", rows)
    from_parquet, _ = prepare_examples(DataOptions(dataset=str(tmp_path / "c.parquet"), dataset_format="chat"), tok,
                                       cache_dir=tmp_path / "c")
    from_jsonl, _ = prepare_examples(DataOptions(dataset=str(tmp_path / "c.jsonl"), dataset_format="chat"), tok,
                                     cache_dir=tmp_path / "c")
    assert list(from_parquet) == list(from_jsonl) and len(from_jsonl) == 2
    bad = [{"messages": CONVO}, {"messages": [{"role": "user", "content": "no reply"}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad\.parquet: row 1: the conversation has no assistant message"):
        prepare_examples(DataOptions(dataset=str(tmp_path / "bad.parquet"), dataset_format="chat"), tok,
                         cache_dir=tmp_path / "c")


def test_parquet_chat_text_that_is_not_utf8_names_its_row(tok, tmp_path):
    """Invalid UTF-8 inside a message (a list of structs) was a UnicodeDecodeError traceback (fuzzer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    contents = [b"hi", b"hello", b"q", b"bad \xff", b"a"]
    offsets = [0]
    for c in contents:
        offsets.append(offsets[-1] + len(c))
    text = pa.Array.from_buffers(pa.string(), len(contents), [None, pa.array(offsets, pa.int32()).buffers()[1],
                                                               pa.py_buffer(b"".join(contents))])
    roles = pa.array(["user", "assistant", "user", "assistant", "user"])
    messages = pa.ListArray.from_arrays(pa.array([0, 2, 4, 5], pa.int32()),
                                        pa.StructArray.from_arrays([roles, text], names=["role", "content"]))
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": messages}), f)
    with pytest.raises(UserError, match=rf"{f}: row 1: column 'messages' holds text that is not valid UTF-8"):
        prepare_examples(DataOptions(dataset=str(f), dataset_format="chat"), tok, cache_dir=tmp_path / "c")


def test_parquet_messages_of_the_wrong_type_name_the_column(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": pa.array([[{"role": "user", "content": 3}]])}), f)
    with pytest.raises(UserError, match=r"column 'messages' is of type list<element: struct<role: string, content: "
                                        r"int64>> \(expected a list of \{role, content\} messages with string fields"):
        prepare_examples(DataOptions(dataset=str(f), dataset_format="chat"), tok, cache_dir=tmp_path / "c")


def _prepare_in_child(model_dir: str, data: str, cache: str) -> bool:
    tok = AutoTokenizer.from_pretrained(model_dir)
    return prepare_examples(DataOptions(dataset=data, dataset_format="chat"), tok, cache_dir=cache)[1].from_cache


def test_two_processes_tokenize_once(tiny_model_dir, tmp_path):
    """Two ranks of a node start together: one tokenizes, the other waits on the lock and reads its file."""
    import multiprocessing

    data = write_rows(tmp_path / "c.jsonl", [{"messages": CONVO}] * 200)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_prepare_in_child, [(str(tiny_model_dir), str(data), str(tmp_path / "c"))] * 2)
    assert sorted(results) == [False, True]


# --------------------------------------------------------------------------- review findings, pinned down

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def test_labels_with_a_llama3_style_pre_tokenizer(tiny_model_dir):
    """Llama 3's own split regex + byte-level, as in its tokenizer.json: ids are the template's, labels the
    offsets reference's."""
    from tokenizers import Regex, pre_tokenizers

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.chat_template = LLAMA31_TEMPLATE
    for messages in (CONVO, [{"role": "user", "content": "2+2?\n\n"}, {"role": "assistant", "content": "\n 4 \n"},
                             {"role": "user", "content": "ok"}, {"role": "assistant", "content": "  it's 4!!  "}]):
        ids, labels = encode_conversation(t, messages, False, "w")
        assert ids == t.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert (ids, labels) == reference_labels(t, messages)


CHATML_NO_PROMPT = ("{% for m in messages %}<|start_header_id|>{{ m.role }}\n{{ m.content }}<|eot_id|>\n"
                    "{% endfor %}")


@pytest.mark.parametrize("with_prompt", [True, False])
def test_header_and_trailing_newline_are_not_trained(tiny_model_dir, with_prompt):
    """A ChatML-like template: the newline after the end token is not trained; and when the template ignores
    add_generation_prompt, the assistant header inside the turn is not trained either."""
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = CHATML_NO_PROMPT.replace(
        "{% endfor %}", "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant\n{% endif %}"
    ) if with_prompt else CHATML_NO_PROMPT
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello friend"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye now"}]
    ids, labels = encode_conversation(t, messages, False, "w")
    assert t.decode([x for x in labels if x != IGNORE_INDEX]) == "hello friend<|eot_id|>bye now<|eot_id|>"


def test_cache_key_follows_content_and_tokenizer_settings(tok, tmp_path):
    import os

    f = write_rows(tmp_path / "a.jsonl", [{"instruction": "Say it.", "output": "castle silver quiet"}])
    opts = DataOptions(dataset=str(f), source_max_len=4, target_max_len=3)
    first, stats = prepare_examples(opts, tok, cache_dir=tmp_path / "c")
    # the same size and mtime, other bytes: still a different dataset
    st = f.stat()
    f.write_text(f.read_text().replace("castle", "meadow"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    second, stats = prepare_examples(opts, tok, cache_dir=tmp_path / "c")
    assert not stats.from_cache and list(second) != list(first)
    # a Python-side tokenizer setting that changes the ids changes the key
    tok.truncation_side = "left"
    try:
        left, stats = prepare_examples(opts, tok, cache_dir=tmp_path / "c")
    finally:
        tok.truncation_side = "right"
    assert not stats.from_cache and left[0]["input_ids"] != second[0]["input_ids"]


def test_row_locations_are_built_only_for_errors(tok, tmp_path, monkeypatch):
    """Naming a row's line costs nothing unless a row is bad (it used to re-read the file for every row)."""
    from llama_ft.data.readers import Locator

    f = write_rows(tmp_path / "c.jsonl", [{"messages": CONVO}] * 300)

    def never(*a, **k):
        raise AssertionError("a location was built without an error")

    monkeypatch.setattr(Locator, "describe", never)
    examples, _ = prepare_examples(DataOptions(dataset=str(f), dataset_format="chat"), tok, cache_dir=tmp_path / "c")
    assert len(examples) == 300


def test_text_that_looks_like_a_date_stays_text(tok, tmp_path):
    f = write_rows(tmp_path / "a.jsonl", [{"instruction": "When?", "input": "2024-01-02", "output": "2024-01-01"}] * 3)
    examples, _ = prepare_examples(DataOptions(dataset=str(f)), tok, cache_dir=tmp_path / "c")
    assert tok.decode([x for x in examples[0]["labels"] if x != IGNORE_INDEX]) == "2024-01-01<|end_of_text|>"


@pytest.mark.parametrize("name,raw,needle", [
    ("latin.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n', "not UTF-8 text"),
    ("pretty.jsonl", b'{"instruction": "a", "output": "b"}\n{\n  "instruction": "c",\n  "output": "d"\n}\n',
     "pretty.jsonl: line 2: invalid JSON"),
])
def test_bad_bytes_one_line(tok, tmp_path, name, raw, needle):
    f = tmp_path / name
    f.write_bytes(raw)
    with pytest.raises(UserError, match=needle):
        prepare_examples(DataOptions(dataset=str(f)), tok, cache_dir=tmp_path / "c")


def test_unusable_cache_dir_is_one_line(tok, tmp_path):
    f = write_rows(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(UserError, match="tokenize cache .*cannot use it.*LLAMA_FT_CACHE"):
        prepare_examples(DataOptions(dataset=str(f)), tok, cache_dir=tmp_path / "file" / "sub")
