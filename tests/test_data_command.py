"""`llama-ft data`: summary, preview, dump, bad input; and the dump is what the training loop is fed."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from test_chat import reference_labels
from transformers import AutoTokenizer

from llama_ft.config import parse_train_args
from llama_ft.data import IGNORE_INDEX, MicroBatches, pad_token_id
from llama_ft.data.command import main as data_main
from llama_ft.tiny import BUNDLED_CHAT_DATASET
from llama_ft.train.recipe import load_training_data


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_FT_CACHE", str(tmp_path / "cache"))


def rows_as_messages(path) -> list[list[dict]]:
    """The bundled chat rows as role/content lists, converted here from either form."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "messages" in row:
            out.append(row["messages"])
        else:
            out.append([{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]])
    return out


def run(capsys, *argv) -> str:
    assert data_main(list(argv)) == 0
    return capsys.readouterr().out


def test_summary_dump_and_preview_against_the_template(tiny_model_dir, tmp_path, capsys):
    dump = tmp_path / "out" / "dump.jsonl"
    max_len = 120
    out = run(capsys, "--model_name_or_path", str(tiny_model_dir), "--dataset", str(BUNDLED_CHAT_DATASET),
              "--dataset_format", "chat", "--max_seq_len", str(max_len), "--dump", str(dump), "--preview", "2")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected, cut = [], 0
    for messages in rows_as_messages(BUNDLED_CHAT_DATASET):
        ids, labels = reference_labels(tok, messages)
        if any(x != IGNORE_INDEX for x in labels[1:max_len]):  # else dropped: nothing left to train on
            cut += len(ids) > max_len
            expected.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    got = [json.loads(ln) for ln in dump.read_text().splitlines()]
    assert got == expected  # dataset order, unshifted labels, cut at the end, untrainable rows dropped
    lengths = np.array([len(e["input_ids"]) for e in expected])
    trained = sum(sum(1 for x in e["labels"][1:] if x != IGNORE_INDEX) for e in expected)
    assert f"examples            {len(expected)} ({102 - len(expected)} dropped" in out
    assert f"cut                 {cut} of {len(expected)} at --max_seq_len {max_len}" in out
    assert f"p50 {int(round(np.percentile(lengths, 50)))}, p90 {int(round(np.percentile(lengths, 90)))}" in out
    assert f"{trained:,} ({100 * trained / lengths.sum():.1f}% of all tokens)" in out
    assert "(tokenized now)" in out
    # the preview marks the first example's first trained run, decoded (an answer + <|eot_id|>)
    labels = expected[0]["labels"]
    start = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    answer = tok.decode(labels[start:end])
    assert answer.endswith("<|eot_id|>") and f"[[{answer}]]" in out and "--- example 1:" in out
    assert [p.name for p in dump.parent.iterdir()] == ["dump.jsonl"]  # no temporary left
    # a second run reads the cache
    assert "(reused)" in run(capsys, "--model_name_or_path", str(tiny_model_dir), "--dataset",
                             str(BUNDLED_CHAT_DATASET), "--dataset_format", "chat", "--max_seq_len", str(max_len))


def test_dump_is_what_the_training_loop_is_fed(tiny_model_dir, tmp_path, capsys):
    """The examples training builds (recipe.load_training_data) and the micro-batches it draws from them,
    padding stripped, are the dump's lines."""
    flags = ["--model_name_or_path", str(tiny_model_dir), "--dataset", str(BUNDLED_CHAT_DATASET), "--dataset_format",
             "chat", "--max_seq_len", "150"]
    run(capsys, *flags, "--dump", str(tmp_path / "d.jsonl"))
    dumped = [json.loads(ln) for ln in (tmp_path / "d.jsonl").read_text().splitlines()]
    cfg = parse_train_args([*flags, "--output_dir", str(tmp_path / "o"), "--eval_dataset_size", "0"])
    tokenizer, train_set, eval_set, stats = load_training_data(cfg)
    assert stats.from_cache and len(eval_set) == 0 and list(train_set) == dumped
    world, batch = 2, 3
    fed = []
    for rank in range(world):
        stream = MicroBatches(train_set, world, rank, batch, cfg.seed, pad_token_id(tokenizer))
        for _ in range(stream.per_epoch):
            b = next(stream)
            for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True):
                n = int(mask.sum())
                assert torch.all(labels[n:] == IGNORE_INDEX)
                fed.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
    key = lambda e: json.dumps(e)  # noqa: E731
    drop = len(dumped) % (world * batch)  # the incomplete last global batch of the epoch
    assert len(fed) == len(dumped) - drop
    assert all(any(f == d for d in dumped) for f in fed) and len({key(f) for f in fed}) == len(fed)


@pytest.mark.parametrize("content,extra,needle", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     '{"messages": [{"role": "wizard", "content": "hi"}]}\n', [], "data.jsonl: line 2: messages[0]: unknown role"),
    ('{"messages": []}\n', [], "data.jsonl: line 1: 'messages' is empty"),
    ('{"prompt": "hi"}\n', [], "data.jsonl: line 1: neither 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', [], "line 1: the conversation has no assistant message"),
    ('{"messages": [{"role": "user", "content": {"text": "hi"}}, {"role": "assistant", "content": "x"}]}\n', [],
     "line 1: messages[0]: 'content' must be a string, got dict"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     ["--max_seq_len", "1"], "--max_seq_len must be an integer >= 2"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     ["--chat_template", "MISSING"], "missing.jinja: file not found"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     ["--chat_template", "BAD"], "bad.jinja:1: not a valid Jinja chat template"),
    ('{"instruction": "a", "output": "b"}\n', ["--dataset_format", "alpaca", "--chat_template", "BAD"],
     "--chat_template"),
])
def test_bad_input_one_line_no_dump(tiny_model_dir, tmp_path, capsys, content, extra, needle):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    (tmp_path / "bad.jinja").write_text("{% if messages %}{{ messages[0].content }")
    extra = [{"MISSING": str(tmp_path / "missing.jinja"), "BAD": str(tmp_path / "bad.jinja")}.get(x, x) for x in extra]
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--dataset_format", "chat", *extra,
            "--dump", str(tmp_path / "out" / "dump.jsonl")]
    with pytest.raises(SystemExit) as e:
        data_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llama-ft: error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_dump_never_overwrites_the_dataset(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(SystemExit):
        data_main(["--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--dump", str(data)])
    assert "is the dataset itself" in capsys.readouterr().err
    assert data.read_text() == '{"instruction": "a", "output": "b"}\n'


def test_tokenizer_without_chat_template(tiny_model_dir, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = None
    t.save_pretrained(tok_dir)
    (tok_dir / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SystemExit):
        data_main(["--tokenizer_name_or_path", str(tok_dir), "--dataset", str(BUNDLED_CHAT_DATASET),
                   "--dataset_format", "chat"])
    assert f"the tokenizer of {tok_dir} has no chat template; pass --chat_template FILE" in capsys.readouterr().err


def test_packed_dump_is_the_first_epoch_of_the_packed_stream(tiny_model_dir, tmp_path, capsys):
    flags = ["--model_name_or_path", str(tiny_model_dir), "--max_seq_len", "400", "--packing", "--seed", "3"]
    run(capsys, *flags, "--dump", str(tmp_path / "rows.jsonl"))
    out = run(capsys, "--model_name_or_path", str(tiny_model_dir), "--max_seq_len", "400", "--dump",
              str(tmp_path / "examples.jsonl"))
    assert "wrote 170 examples" in out
    examples = [json.loads(ln) for ln in (tmp_path / "examples.jsonl").read_text().splitlines()]
    rows = [json.loads(ln) for ln in (tmp_path / "rows.jsonl").read_text().splitlines()]
    used = []
    for row in rows:
        assert len(row["input_ids"]) <= 400 and len(row["labels"]) == len(row["position_ids"]) == len(row["input_ids"])
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        spans = list(zip(starts[:-1], starts[1:], strict=True))
        assert row["position_ids"] == [p for a, b in spans for p in range(b - a)]
        for a, b in spans:  # each piece is a whole example, its first label dropped
            piece = row["input_ids"][a:b]
            k = next(k for k, e in enumerate(examples) if e["input_ids"] == piece and k not in used)
            used.append(k)
            assert row["labels"][a:b] == [IGNORE_INDEX] + examples[k]["labels"][1:]
    assert sorted(used) == list(range(170))  # every example exactly once, none split
    cfg = parse_train_args([*flags, "--output_dir", str(tmp_path / "o"), "--per_device_train_batch_size", "1"])
    tokenizer, train_set, _, _ = load_training_data(cfg)
    stream = MicroBatches(train_set, 1, 0, 1, 3, pad_token_id(tokenizer), pack_len=400)
    fed = [next(stream) for _ in range(stream.per_epoch)]
    assert [{k: b[k][0].tolist() for k in ("input_ids", "labels", "position_ids")} for b in fed] == rows


@pytest.mark.parametrize("argv,needle", [
    (["--packing"], "--packing needs --max_seq_len N"),
    (["--max_seq_len", "5000"], "--max_seq_len 5000: above the model's max_position_embeddings 1024"),
    (["--loss_chunk_size", "0"], "--loss_chunk_size 0: expected an integer >= 1"),
    pytest.param(["--attn_implementation", "flash_attention_2"],
                 "flash_attention_2: the flash-attn package is not installed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                                          reason="flash-attn is installed here")),
    (["--attn_implementation", "flash_attention_2", "--bf16", "false"], "runs in bf16 only"),
    (["--attn_implementation", "flash"], "--attn_implementation 'flash': expected one of sdpa, eager"),
])
def test_training_refuses_bad_packing_and_loss_flags(tiny_model_dir, tmp_path, capsys, argv, needle):
    from llama_ft.train.recipe import main as train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "[rank 0] INFO" not in ln]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()
