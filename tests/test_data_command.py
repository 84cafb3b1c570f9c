"""`llama-ft data`: summary, preview, dump, bad input; and the dump is what the training loop is fed."""

from __future__ import annotations

import importlib.util
import json
import re

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
    # --objective dpo: data/pairs.py's checks, as training makes them
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "x", "chosen": "y"}\n', ["--objective", "dpo"],
     "data.jsonl: line 2: missing field 'rejected'"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--objective", "dpo", "--dataset_format", "alpaca"],
     "--objective dpo with --dataset_format alpaca: preference pairs are read with --dataset_format chat"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--objective", "dpo", "--train_on_source"],
     "--train_on_source with --objective dpo: DPO compares the responses only"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}\n', ["--objective", "dpo"],
     "data.jsonl: line 1: 'chosen' and 'rejected' are identical"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--objective", "kto"],
     "--objective 'kto': expected one of sft, dpo"),
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


# ---------------------------------------------------------------------------------------------------------------
# --objective dpo: preference pairs (issue 21)

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"},
          {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And at night?"}]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# (row in one of TRL's three forms, its prompt and two responses as messages); with --max_seq_len 150 on the
# tiny model's Llama 3.1 template: 0 and 1 are not cut, 2 is cut inside both responses, 3 has the same tokens on
# both sides after the cut, 4 keeps no response token (its prompt alone is longer than 150)
DPO_MAX_LEN = 150
DPO_ROWS = [
    ({"prompt": PROMPT, "chosen": _assistant("Black, with stars."), "rejected": _assistant(" Purple ")},
     PROMPT, _assistant("Black, with stars."), _assistant("Purple")),
    ({"chosen": _user("Hi?") + _assistant("Hello there."), "rejected": _user("Hi?") + _assistant("Go away.")},
     _user("Hi?"), _assistant("Hello there."), _assistant("Go away.")),
    ({"prompt": "Sky colour?", "chosen": "Blue " * 20, "rejected": "Grey " * 20},
     _user("Sky colour?"), _assistant("Blue " * 20), _assistant("Grey " * 20)),
    ({"prompt": "word " * 20, "chosen": "Yes " + "word " * 60 + "yes", "rejected": "Yes " + "word " * 60 + "no"},
     _user("word " * 20), _assistant("Yes " + "word " * 60 + "yes"), _assistant("Yes " + "word " * 60 + "no")),
    ({"prompt": "word " * 80, "chosen": "A.", "rejected": "B."},
     _user("word " * 80), _assistant("A."), _assistant("B.")),
]


def _dpo_reference(tok, max_len: int) -> tuple[list[dict], int, dict[int, str]]:
    """(the pairs training keeps, in order, as dump lines; how many of them are cut; why the others are dropped, by
    row): each side read by hand from the template's text (test_pairs.reference), cut at max_len; a pair is dropped
    when a side keeps no trained token (labels[1:]), or both sides are the same tokens."""
    from test_pairs import reference

    kept, cut, dropped = [], 0, {}
    for k, (_, prompt, chosen, rejected) in enumerate(DPO_ROWS):
        sides = [reference(tok, prompt, response) for response in (chosen, rejected)]
        short = [(ids[:max_len], labels[:max_len]) for ids, labels in sides]
        if any(all(y == IGNORE_INDEX for y in labels[1:]) for _, labels in short):
            dropped[k] = "no token"  # (the shared prompt alone then: both sides the same too)
        elif short[0] == short[1]:
            dropped[k] = "same"
        if k in dropped:
            continue
        cut += any(len(ids) > max_len for ids, _ in sides)
        kept.append({"chosen_input_ids": short[0][0], "chosen_labels": short[0][1],
                     "rejected_input_ids": short[1][0], "rejected_labels": short[1][1]})
    return kept, cut, dropped


@pytest.fixture
def dpo_data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, *_ in DPO_ROWS))
    return path


def test_dpo_summary_preview_and_dump_against_the_template(tiny_model_dir, dpo_data, tmp_path, capsys):
    """--objective dpo: the dump is one line per kept pair with the four columns, equal to the template rendered
    by hand and cut; the summary counts pairs and each side's tokens; the preview shows both sides of a pair in
    full, labelled, with exactly the final response (content + <|eot_id|>) marked: the prompt's own assistant
    turn ("Blue.") stays unmarked."""
    dump = tmp_path / "out" / "pairs-dump.jsonl"
    out = run(capsys, "--model_name_or_path", str(tiny_model_dir), "--dataset", str(dpo_data), "--dataset_format",
              "chat", "--objective", "dpo", "--max_seq_len", str(DPO_MAX_LEN), "--dump", str(dump), "--preview", "2")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected, cut, dropped = _dpo_reference(tok, DPO_MAX_LEN)
    assert len(expected) == 3 and cut == 1 and dropped == {3: "same", 4: "no token"}  # what DPO_ROWS was written for
    got = [json.loads(ln) for ln in dump.read_text().splitlines()]
    assert got == expected
    assert f"wrote 3 pairs to {dump}" in out
    lines = dict(ln.split("  ", 1) for ln in out.split("\n\n")[0].splitlines())
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["rows read"] == "5"
    assert lines["pairs"] == "3 (2 dropped: a side with no token to train on, or both sides the same after the cut)"
    assert lines["cut"] == f"1 of 3 pairs at --max_seq_len {DPO_MAX_LEN}"
    for side in ("chosen", "rejected"):
        lengths = [len(e[f"{side}_input_ids"]) for e in expected]
        trained = sum(sum(1 for y in e[f"{side}_labels"][1:] if y != IGNORE_INDEX) for e in expected)
        assert lines[f"{side} tokens"] == f"{sum(lengths):,}"
        assert lines[f"{side} trained tokens"] == f"{trained:,} ({100 * trained / sum(lengths):.1f}% of its tokens)"
        assert lines[f"{side} tokens per sequence"].endswith(f"min {min(lengths)}, max {max(lengths)}, "
                                                             f"mean {np.mean(lengths):.1f}")
    # the preview: pairs 0 and 1 (not cut), each side the template's text with its response marked
    blocks = re.split(r"^--- (pair \d+: \w+), (\d+) tokens, (\d+) trained ---\n", out.split("\nwrote ")[0], flags=re.M)
    shown = {name: (int(n), int(t), text.removesuffix("\n")) for name, n, t, text in
             zip(blocks[1::4], blocks[2::4], blocks[3::4], blocks[4::4], strict=True)}
    assert list(shown) == ["pair 0: chosen", "pair 0: rejected", "pair 1: chosen", "pair 1: rejected"]
    for k in (0, 1):
        _, prompt, *responses = DPO_ROWS[k]
        for side, response in zip(("chosen", "rejected"), responses, strict=True):
            text = tok.apply_chat_template(prompt + response, tokenize=False)
            piece = response[0]["content"].strip() + "<|eot_id|>"
            assert text.endswith(piece)
            n_tokens, n_trained, rendered = shown[f"pair {k}: {side}"]
            assert rendered == text[:-len(piece)] + f"[[{piece}]]"
            assert n_tokens == len(expected[k][f"{side}_input_ids"])
            assert n_trained == len(tok(piece, add_special_tokens=False)["input_ids"])  # the response alone
    assert "Blue.<|eot_id|>" in shown["pair 0: chosen"][2] and "[[Blue." not in shown["pair 0: chosen"][2]


def test_dpo_dump_is_what_training_reads(tiny_model_dir, dpo_data, tmp_path, capsys):
    """The pairs training builds (recipe.load_training_data with --objective dpo) are the dump's lines, the
    micro-batches it draws are those pairs (rows [c_1 .. c_B, r_1 .. r_B], padding stripped), and its data report
    line counts pairs."""
    flags = ["--model_name_or_path", str(tiny_model_dir), "--dataset", str(dpo_data), "--dataset_format", "chat",
             "--objective", "dpo", "--max_seq_len", str(DPO_MAX_LEN)]
    run(capsys, *flags, "--dump", str(tmp_path / "d.jsonl"))
    dumped = [json.loads(ln) for ln in (tmp_path / "d.jsonl").read_text().splitlines()]
    cfg = parse_train_args([*flags, "--output_dir", str(tmp_path / "o"), "--eval_dataset_size", "0"])
    tokenizer, train_set, eval_set, stats = load_training_data(cfg)
    assert stats.from_cache and len(eval_set) == 0 and list(train_set) == dumped
    assert stats.line(DPO_MAX_LEN) == (
        f"5 rows -> 3 pairs, 1 pairs cut at --max_seq_len {DPO_MAX_LEN}, 2 pairs dropped (a side with no token to "
        f"train on, or both sides the same after the cut); from the cache ({stats.cache_file})")
    stream = MicroBatches(train_set, 1, 0, 3, cfg.seed, pad_token_id(tokenizer))
    b = next(stream)
    rows = [ids[:int(mask.sum())].tolist() for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]
    fed = [{"chosen": rows[p], "rejected": rows[3 + p]} for p in range(3)]
    assert sorted(map(json.dumps, fed)) == sorted(json.dumps({"chosen": d["chosen_input_ids"],
                                                              "rejected": d["rejected_input_ids"]}) for d in dumped)


def test_dpo_packed_dump_holds_whole_pairs_of_the_unpacked_dump(tiny_model_dir, dpo_data, tmp_path, capsys):
    """--objective dpo --packing: every packed row holds whole pairs (<= 2 x --max_seq_len tokens), each side a
    contiguous run of its sequence id with positions from 0, its ids and labels those of the (template-checked)
    unpacked dump, every pair exactly once; padding has sequence id -1."""
    flags = ["--model_name_or_path", str(tiny_model_dir), "--dataset", str(dpo_data), "--dataset_format", "chat",
             "--objective", "dpo", "--max_seq_len", str(DPO_MAX_LEN)]
    run(capsys, *flags, "--dump", str(tmp_path / "unpacked.jsonl"))
    pairs = [json.loads(ln) for ln in (tmp_path / "unpacked.jsonl").read_text().splitlines()]
    out = run(capsys, *flags, "--packing", "--dump", str(tmp_path / "packed.jsonl"))
    rows = [json.loads(ln) for ln in (tmp_path / "packed.jsonl").read_text().splitlines()]
    assert f"rows of {2 * DPO_MAX_LEN} tokens for {len(pairs)} examples" in out
    seen = []
    for row in rows:
        assert len(row["input_ids"]) <= 2 * DPO_MAX_LEN
        ids = row["sequence_ids"]
        sides = sorted({s for s in ids if s >= 0})
        assert len(sides) % 2 == 0
        n_pairs = len(sides) // 2
        for k in range(n_pairs):
            got = {}
            for side, s in (("chosen", k), ("rejected", n_pairs + k)):
                at = [i for i, v in enumerate(ids) if v == s]
                assert at == list(range(at[0], at[0] + len(at)))  # contiguous
                assert [row["position_ids"][i] for i in at] == list(range(len(at)))
                got[f"{side}_input_ids"] = [row["input_ids"][i] for i in at]
                got[f"{side}_labels"] = [IGNORE_INDEX] + [row["labels"][i] for i in at[1:]]
            seen.append(got)
        assert all(row["labels"][i] == IGNORE_INDEX for i, v in enumerate(ids) if v < 0)
    want = [{k: (v if not k.endswith("labels") else [IGNORE_INDEX, *v[1:]]) for k, v in p.items()} for p in pairs]
    assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps, want))


def test_dpo_objective_flag_is_trainings():
    """`llama-ft data --objective` has training's name, default and help (one text, config.py's)."""
    from llama_ft.config import build_parser as train_parser
    from llama_ft.data.command import build_parser

    def flag(parser):
        return next(a for a in parser._actions if "--objective" in a.option_strings)

    ours, theirs = flag(build_parser()), flag(train_parser())
    assert (ours.default, ours.help, ours.type, ours.choices) == (theirs.default, theirs.help, theirs.type,
                                                                 theirs.choices)
    assert "dpo (preference pairs" in ours.help
