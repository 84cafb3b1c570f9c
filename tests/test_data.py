"""llama_ft.data: loading, prompt template, tokenization, split and collation against hand-built expectations."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from llama_ft.data import (
    DATASET_FORMATS,
    IGNORE_INDEX,
    collate,
    load_rows,
    pad_token_id,
    tokenize_rows,
    train_eval_split,
)
from llama_ft.errors import UserError
from llama_ft.tiny import BUNDLED_DATASET

# The standard alpaca templates, written out independently of llama_ft.data.
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_error(fn, *args, **kwargs) -> str:
    """Call fn, expect a UserError, return its message (which must be one line)."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- load_rows


def test_dataset_formats():
    assert set(DATASET_FORMATS) == {"alpaca", "input-output", "chip2", "self-instruct", "hh-rlhf", "oasst1", "chat"}


def test_bundled_dataset_loads_as_alpaca():
    rows = load_rows(str(BUNDLED_DATASET), "alpaca")
    assert len(rows) == 170
    raw = [json.loads(line) for line in BUNDLED_DATASET.read_text().splitlines()]
    for row, r in zip(rows, raw, strict=True):
        assert set(row) == {"source", "target"}
        assert row["target"] == r["output"]
        if r["input"]:
            assert row["source"] == WITH_INPUT.replace("{instruction}", r["instruction"]).replace("{input}", r["input"])
        else:
            assert row["source"] == NO_INPUT.replace("{instruction}", r["instruction"])
    assert any(not r["input"] for r in raw) and any(r["input"] for r in raw)


def test_alpaca_template_text(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Add {x}.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say bye.", "output": "bye"},  # input is optional
            {"instruction": "Nod.", "input": None, "output": ""},  # null input = no input; empty output allowed
        ],
    )
    rows = load_rows(str(f), "alpaca")
    assert rows[0] == {
        "source": "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd {x}.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "target": "5",
    }
    no_input = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{}\n\n### Response:\n"
    )
    assert rows[1] == {"source": no_input.format("Say hi."), "target": "hi"}
    assert rows[2] == {"source": no_input.format("Say bye."), "target": "bye"}
    assert rows[3] == {"source": no_input.format("Nod."), "target": ""}


def test_json_list_file(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": "A", "input": "b", "output": "c"}, {"instruction": "D", "output": "e"}]))
    rows = load_rows(str(f), "alpaca")
    assert [r["target"] for r in rows] == ["c", "e"]
    assert rows[0]["source"] == WITH_INPUT.format(instruction="A", input="b")


def test_json_lines_saved_as_json(tmp_path):
    f = write_jsonl(tmp_path / "d.json", [{"input": "q1", "output": "a1"}, {"input": "q2", "output": "a2"}])
    assert load_rows(str(f), "input-output") == [{"source": "q1", "target": "a1"}, {"source": "q2", "target": "a2"}]


def test_input_output_verbatim_and_blank_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    text = '{"input": "  raw prompt\\n", "output": "answer"}\r\n\n   \n{"input": "a\u2028b", "output": "x"}\n'
    f.write_text(text, encoding="utf-8")
    assert load_rows(str(f), "input-output") == [
        {"source": "  raw prompt\n", "target": "answer"},
        {"source": "a\u2028b", "target": "x"},
    ]


def test_hf_formats_mapped_like_qlora(tmp_path):
    chip2 = write_jsonl(tmp_path / "c.jsonl", [{"text": "<human>: What is 2+2?\n<bot>: 4", "metadata": {}}])
    assert load_rows(str(chip2), "chip2") == [{"source": "What is 2+2?", "target": "4"}]
    si = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Name a fruit.", "completion": " apple"}])
    assert load_rows(str(si), "self-instruct") == [{"source": "Name a fruit.", "target": " apple"}]
    hh = write_jsonl(tmp_path / "h.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "no"}])
    assert load_rows(str(hh), "hh-rlhf") == [{"source": "", "target": "\n\nHuman: hi\n\nAssistant: hello"}]
    oa = write_jsonl(tmp_path / "o.jsonl", [{"text": "### Human: hi### Assistant: hey"}])
    assert load_rows(str(oa), "oasst1") == [{"source": "", "target": "### Human: hi### Assistant: hey"}]


def test_max_samples_keeps_first_rows(tmp_path):
    rows = load_rows(str(BUNDLED_DATASET), "alpaca", max_samples=7)
    assert rows == load_rows(str(BUNDLED_DATASET), "alpaca")[:7]
    assert len(load_rows(str(BUNDLED_DATASET), "alpaca", max_samples=10_000)) == 170
    # rows after the first N are not read: a bad line 3 does not matter for max_samples=2
    f = tmp_path / "d.jsonl"
    f.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\nnot json\n')
    assert len(load_rows(str(f), "input-output", max_samples=2)) == 2
    assert "line 3: invalid JSON" in user_error(load_rows, str(f), "input-output")


@pytest.mark.parametrize("bad", [0, -3])
def test_max_samples_must_be_positive(bad):
    assert "--max_train_samples" in user_error(load_rows, str(BUNDLED_DATASET), "alpaca", max_samples=bad)


def test_unknown_format_lists_accepted():
    msg = user_error(load_rows, str(BUNDLED_DATASET), "sharegpt")
    assert "--dataset_format" in msg and "sharegpt" in msg
    for fmt in DATASET_FORMATS:
        assert fmt in msg


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    msg = user_error(load_rows, str(missing), "alpaca")
    assert str(missing) in msg and "does not exist" in msg
    msg = user_error(load_rows, "./not_here.json", "alpaca")
    assert "not_here.json" in msg and "does not exist" in msg


def test_unsupported_file_type_and_directory(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("instruction,output\na,b\n")
    msg = user_error(load_rows, str(f), "alpaca")
    assert str(f) in msg and ".jsonl" in msg
    msg = user_error(load_rows, str(tmp_path), "alpaca")
    assert str(tmp_path) in msg and "directory" in msg


@pytest.mark.parametrize(("name", "text"), [("e.jsonl", ""), ("w.jsonl", "\n  \n"), ("e.json", ""), ("l.json", "[]")])
def test_empty_file(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    msg = user_error(load_rows, str(f), "alpaca")
    assert str(f) in msg and ("empty" in msg or "no rows" in msg)


def test_bad_json_jsonl_names_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    msg = user_error(load_rows, str(f), "alpaca")
    assert str(f) in msg and "line 3" in msg and "invalid JSON" in msg


def test_bad_json_json_names_line(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    msg = user_error(load_rows, str(f), "alpaca")
    assert str(f) in msg and "line 3" in msg and "invalid JSON" in msg


def test_json_top_level_not_a_list(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('{"data": [{"instruction": "a", "output": "b"}]}')
    msg = user_error(load_rows, str(f), "alpaca")
    assert str(f) in msg and "list" in msg


def test_row_not_an_object(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n["instruction", "output"]\n')
    msg = user_error(load_rows, str(f), "alpaca")
    assert str(f) in msg and "line 2" in msg and "object" in msg
    g = tmp_path / "d.json"
    g.write_text(json.dumps([{"instruction": "a", "output": "b"}, "just text"]))
    msg = user_error(load_rows, str(g), "alpaca")
    assert str(g) in msg and "row 1" in msg and "object" in msg


@pytest.mark.parametrize(
    ("fmt", "row", "field"),
    [
        ("alpaca", {"input": "x", "output": "y"}, "instruction"),
        ("alpaca", {"instruction": "x", "input": "y"}, "output"),
        ("alpaca", {"instruction": None, "output": "y"}, "instruction"),
        ("input-output", {"output": "y"}, "input"),
        ("input-output", {"input": "x"}, "output"),
        ("chip2", {"txt": "x"}, "text"),
        ("self-instruct", {"prompt": "x"}, "completion"),
        ("hh-rlhf", {"rejected": "x"}, "chosen"),
        ("oasst1", {"message": "x"}, "text"),
    ],
)
def test_missing_field(tmp_path, fmt, row, field):
    good = {"instruction": "i", "input": "", "output": "o", "text": "<human>: q\n<bot>: a"}
    good |= {"prompt": "p", "completion": "c", "chosen": "c"}
    f = write_jsonl(tmp_path / "d.jsonl", [good, good, row])
    msg = user_error(load_rows, str(f), fmt)
    assert str(f) in msg and "line 3" in msg and f"'{field}'" in msg and "missing" in msg
    g = tmp_path / "d.json"
    g.write_text(json.dumps([good, row]))
    msg = user_error(load_rows, str(g), fmt)
    assert str(g) in msg and "row 1" in msg and f"'{field}'" in msg


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"instruction": 3, "output": "y"}, "instruction"),
        ({"instruction": "x", "output": ["y"]}, "output"),
        ({"instruction": "x", "input": 5, "output": "y"}, "input"),
        ({"instruction": "x", "input": {"a": 1}, "output": "y"}, "input"),
    ],
)
def test_non_string_field(tmp_path, row, field):
    f = write_jsonl(tmp_path / "d.jsonl", [row])
    msg = user_error(load_rows, str(f), "alpaca")
    assert str(f) in msg and "line 1" in msg and f"'{field}'" in msg and "string" in msg


def test_empty_instruction(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "y"}, {"instruction": "  ", "output": "y"}])
    msg = user_error(load_rows, str(f), "alpaca")
    assert str(f) in msg and "line 2" in msg and "'instruction'" in msg and "empty" in msg


def test_chip2_without_bot_turn(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "<human>: hello, nobody answers"}])
    msg = user_error(load_rows, str(f), "chip2")
    assert str(f) in msg and "line 1" in msg and "'text'" in msg


def test_hub_name_offline_is_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the name cannot be a local path
    name = "llama-ft-tests/no-such-dataset"
    msg = user_error(load_rows, name, "alpaca")
    assert name in msg and "neither a local file nor reachable" in msg


# --------------------------------------------------------------------------- Parquet (found by the fuzzer)


def _invalid_utf8_strings(values: list[bytes]):
    """A pyarrow string array holding exactly these bytes (no UTF-8 check: as a writer in another language
    can leave it)."""
    import pyarrow as pa

    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.array(offsets, pa.int32()).buffers()[1],
                                                            pa.py_buffer(b"".join(values))])


def test_parquet_text_that_is_not_utf8_names_its_row(tmp_path):
    """Was a UnicodeDecodeError traceback out of datasets.map."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    out = _invalid_utf8_strings([b"a", b"b", b"c \xff\xfe", b"d"])
    pq.write_table(pa.table({"instruction": ["i"] * 4, "output": out}), f, row_group_size=3)
    msg = user_error(load_rows, str(f), "alpaca")
    assert f"{f}: row 2: column 'output' holds text that is not valid UTF-8" in msg, msg
    # in the second row group: the row counts across chunks
    pq.write_table(pa.table({"instruction": ["i"] * 4, "output": _invalid_utf8_strings([b"a"] * 3 + [b"\xc3\x28"])}),
                   f, row_group_size=2)
    assert f"{f}: row 3: column 'output'" in user_error(load_rows, str(f), "alpaca")


@pytest.mark.parametrize("meta", [b"{", b"null", b'{"info": 3}', b"\xff",
                                  b'{"info": {"features": {"output": {"_type": "Nope"}}}}',
                                  b'{"info": {"features": {"output": {"dtype": "int64", "_type": "Value"}}}}'])
def test_parquet_schema_metadata_is_not_trusted(tmp_path, meta):
    """A `huggingface` key in the schema metadata is read by datasets as features: a wrong one was a JSONDecodeError,
    TypeError or ValueError traceback. The rows read as written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    table = pa.table({"instruction": ["A", "D"], "input": ["b", None], "output": ["c", "e"]})
    pq.write_table(table.replace_schema_metadata({b"huggingface": meta}), f)
    assert load_rows(str(f), "alpaca") == [{"source": WITH_INPUT.format(instruction="A", input="b"), "target": "c"},
                                           {"source": NO_INPUT.format(instruction="D"), "target": "e"}]


def test_parquet_columns_the_format_does_not_read_are_not_read(tmp_path):
    """A map column (no datasets feature: a ValueError traceback) or a corrupt-looking extra column is left alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"meta": pa.array([[("k", "v")]], pa.map_(pa.string(), pa.string())),
                             "when": pa.array([10**13], pa.timestamp("s")), "input": ["q"], "output": ["a"]}), f)
    assert load_rows(str(f), "input-output") == [{"source": "q", "target": "a"}]


@pytest.mark.parametrize("column,needle", [
    ("map", "column 'output' is of type map<string, string"),
    ("timestamp", "column 'output' is of type timestamp[ms]"),
    ("binary", "column 'output' is of type binary"),
    ("int", "column 'output' is of type int64"),
])
def test_parquet_column_of_the_wrong_type_is_named(tmp_path, column, needle):
    """A read column that holds no strings: one line naming the column and what was expected (a map or a timestamp
    beyond Python's datetime was a traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = {"map": pa.array([[("k", "v")]], pa.map_(pa.string(), pa.string())),
              "timestamp": pa.array([10**13], pa.timestamp("s")), "binary": pa.array([b"\xff"]),
              "int": pa.array([3])}[column]
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"input": ["q"], "output": values}), f)
    msg = user_error(load_rows, str(f), "input-output")
    assert str(f) in msg and needle in msg and "expected strings, read by --dataset_format input-output" in msg, msg


def test_parquet_without_any_column_the_format_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"TEXT": ["x"], "id": [1]}), f)
    msg = user_error(load_rows, str(f), "oasst1")
    assert msg == (f"dataset file {f}: none of the columns --dataset_format oasst1 reads (text) is there (it has: "
                   "TEXT, id)")


# --------------------------------------------------------------------------- tokenize_rows


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenize_matches_hand_built_ids(tok):
    source = NO_INPUT.replace("{instruction}", "Name the color of the sky.")
    rows = [{"source": source, "target": "blue"}, {"source": "", "target": ""}]
    ex = tokenize_rows(rows, tok, source_max_len=512, target_max_len=512)
    src = [tok.bos_token_id] + encode(tok, source)
    tgt = encode(tok, "blue") + [tok.eos_token_id]
    assert ex[0] == {"input_ids": src + tgt, "labels": [IGNORE_INDEX] * len(src) + tgt}
    # an empty source is BOS only; an empty target is EOS only
    assert ex[1] == {"input_ids": [tok.bos_token_id, tok.eos_token_id], "labels": [IGNORE_INDEX, tok.eos_token_id]}


def test_tokenize_truncation(tok):
    source = WITH_INPUT.replace("{instruction}", "Spell it.").replace("{input}", "castle")
    target = "c a s t l e, a long answer"
    full_src = [tok.bos_token_id] + encode(tok, source)
    full_tgt = encode(tok, target) + [tok.eos_token_id]
    assert len(full_src) > 5 and len(full_tgt) > 3
    (ex,) = tokenize_rows([{"source": source, "target": target}], tok, source_max_len=5, target_max_len=3)
    assert ex["input_ids"] == full_src[:5] + full_tgt[:3]  # BOS counts; the truncated target loses its EOS
    assert ex["labels"] == [IGNORE_INDEX] * 5 + full_tgt[:3]
    (ex,) = tokenize_rows([{"source": source, "target": target}], tok, source_max_len=1, target_max_len=1)
    assert ex == {"input_ids": [tok.bos_token_id, full_tgt[0]], "labels": [IGNORE_INDEX, full_tgt[0]]}


def test_train_on_source(tok):
    rows = [{"source": "Question: 2+2?", "target": "4"}]
    (ex,) = tokenize_rows(rows, tok, source_max_len=64, target_max_len=64, train_on_source=True)
    expected = [tok.bos_token_id] + encode(tok, "Question: 2+2?") + encode(tok, "4") + [tok.eos_token_id]
    assert ex == {"input_ids": expected, "labels": expected}
    ex["labels"][0] = 7
    assert ex["input_ids"][0] == tok.bos_token_id  # labels are a copy, not the same list


def test_tokenize_bundled_dataset(tok):
    rows = load_rows(str(BUNDLED_DATASET), "alpaca")
    examples = tokenize_rows(rows, tok, source_max_len=256, target_max_len=128)
    assert len(examples) == 170
    for row, ex in zip(rows, examples, strict=True):
        n_src = len(encode(tok, row["source"])) + 1
        assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
        assert ex["labels"][:n_src] == [IGNORE_INDEX] * n_src
        assert ex["labels"][n_src:] == ex["input_ids"][n_src:] == encode(tok, row["target"]) + [tok.eos_token_id]


@pytest.mark.parametrize(
    ("kw", "flag"), [({"source_max_len": 0}, "--source_max_len"), ({"target_max_len": 0}, "--target_max_len")]
)
def test_tokenize_max_len_must_be_positive(tok, kw, flag):
    args = {"source_max_len": 8, "target_max_len": 8} | kw
    assert flag in user_error(tokenize_rows, [{"source": "a", "target": "b"}], tok, **args)


class CharTokenizer:
    """A minimal tokenizer with an empty EOS string: an empty target stays empty after tokenization."""

    eos_token = ""

    def __call__(self, texts, max_length, truncation, add_special_tokens=True):
        bos = [1] if add_special_tokens else []
        return {"input_ids": [(bos + [ord(c) for c in t])[:max_length] for t in texts]}


def test_empty_targets_are_skipped():
    rows = [{"source": "ab", "target": ""}, {"source": "c", "target": "de"}]
    assert tokenize_rows(rows, CharTokenizer(), source_max_len=8, target_max_len=8) == [
        {"input_ids": [1, ord("c"), ord("d"), ord("e")], "labels": [IGNORE_INDEX, IGNORE_INDEX, ord("d"), ord("e")]}
    ]
    msg = user_error(tokenize_rows, [{"source": "ab", "target": ""}], CharTokenizer(), 8, 4)
    assert "--target_max_len" in msg


# --------------------------------------------------------------------------- train_eval_split


def test_split_zero_means_no_eval():
    examples = list(range(10))
    assert train_eval_split(examples, 0, seed=1) == (examples, [])
    assert train_eval_split(examples, 0.0, seed=1) == (examples, [])


def test_split_count_disjoint_deterministic():
    examples = [f"ex{i}" for i in range(100)]
    train, evals = train_eval_split(examples, 10, seed=42)
    assert len(train) == 90 and len(evals) == 10
    assert set(train).isdisjoint(evals) and set(train) | set(evals) == set(examples)
    assert train == sorted(train, key=examples.index) and evals == sorted(evals, key=examples.index)
    assert train_eval_split(examples, 10, seed=42) == (train, evals)
    order = list(range(100))
    random.Random(42).shuffle(order)
    assert set(evals) == {examples[i] for i in order[:10]}
    assert train_eval_split(examples, 10, seed=43)[1] != evals


def test_split_fraction():
    examples = list(range(25))
    train, evals = train_eval_split(examples, 0.1, seed=0)
    assert len(evals) == math.ceil(2.5) == 3 and len(train) == 22
    train, evals = train_eval_split(list(range(10)), 0.001, seed=0)
    assert len(evals) == 1 and len(train) == 9  # a fraction gives at least one
    train, evals = train_eval_split(list(range(10)), 4.0, seed=0)  # an integral float is a count
    assert len(evals) == 4


@pytest.mark.parametrize(("n", "size"), [(10, 10), (10, 11), (1, 0.5), (3, 0.99)])
def test_split_eval_cannot_take_everything(n, size):
    assert "--eval_dataset_size" in user_error(train_eval_split, list(range(n)), size, 0)


@pytest.mark.parametrize("size", [-1, -0.5, 1.5, float("nan")])
def test_split_bad_size(size):
    assert "--eval_dataset_size" in user_error(train_eval_split, list(range(10)), size, 0)


# --------------------------------------------------------------------------- collate / pad


def test_collate_right_pads_exactly():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
        {"input_ids": [1, 2, 3, 4, 9], "labels": [-100, -100, -100, 4, 9]},
    ]
    batch = collate(features, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for t in batch.values():
        assert t.dtype == torch.int64 and t.shape == (3, 5)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [1, 2, 3, 4, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [8, -100, -100, -100, -100], [-100, -100, -100, 4, 9]]
    assert collate(features[:1], pad_token_id=99)["input_ids"].tolist() == [[5, 6, 7]]


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


def test_collate_tokenized_bundled_batch(tok):
    rows = load_rows(str(BUNDLED_DATASET), "alpaca", max_samples=4)
    examples = tokenize_rows(rows, tok, source_max_len=256, target_max_len=128)
    batch = collate(examples, pad_token_id(tok))
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for i, e in enumerate(examples):
        assert batch["input_ids"][i, : lengths[i]].tolist() == e["input_ids"]
        assert (batch["input_ids"][i, lengths[i] :] == tok.pad_token_id).all()


class VocabOnly:
    def __init__(self, vocab, pad_token_id=None, eos_token_id=None):
        self.vocab, self.pad_token_id, self.eos_token_id = vocab, pad_token_id, eos_token_id

    def get_vocab(self):
        return self.vocab


def test_pad_token_id_fallbacks(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pad = tok.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert tok.pad_token_id == pad and pad_token_id(tok) == pad
    tok.pad_token = None
    assert tok.pad_token_id is None
    assert pad_token_id(tok) == pad  # Llama 3.1's reserved pad token from the vocabulary
    assert pad_token_id(VocabOnly({"a": 0}, pad_token_id=7, eos_token_id=1)) == 7
    assert pad_token_id(VocabOnly({"a": 0, "<|end_of_text|>": 1}, eos_token_id=1)) == 1
    assert "pad" in user_error(pad_token_id, VocabOnly({"a": 0}))
