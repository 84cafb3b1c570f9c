"""`llama-ft eval` on the tiny model: its numbers against float64 references, ranks, and bad input.

The real-checkpoint run (tests/test_real_checkpoint.py) shows a fine-tune improving exact match; here the
definitions are pinned down on multi-turn chat and alpaca data with adapters that are random but not zero.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from proc import run_job
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_ft.adapters import lora_named_parameters, save_adapters
from llama_ft.data import IGNORE_INDEX
from llama_ft.eval.command import main as eval_main
from llama_ft.lora import LoraSpec
from llama_ft.model.build import build_lora_model
from llama_ft.tiny import BUNDLED_CHAT_DATASET, BUNDLED_DATASET
from llama_ft.train.evaluate import answer_spans, example_answers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Adapters on the tiny model with A and B drawn at random (as after training), in PEFT format."""
    torch.manual_seed(3)
    spec = LoraSpec(8, 16)
    model, _ = build_lora_model(tiny_model_dir, spec, ds_config=None, dtype=torch.float32)
    for _, p in lora_named_parameters(model):
        torch.nn.init.normal_(p, std=0.2)
    out = tmp_path_factory.mktemp("adapters") / "ad"
    save_adapters(model, out, spec, str(tiny_model_dir))
    return out


def _run(tmp: Path, *args: str, name: str = "r") -> dict:
    report = tmp / f"{name}.json"
    assert eval_main([*args, "--json", str(report)]) == 0
    return json.loads(report.read_text())


def _chat_rows(n: int) -> list[dict]:
    """The first n OpenAI-form rows of the bundled chat set (several are multi-turn)."""
    rows = [json.loads(line) for line in BUNDLED_CHAT_DATASET.read_text().splitlines()]
    return [r for r in rows if "messages" in r][:n]


def test_answer_spans_are_runs_of_trained_labels():
    x = IGNORE_INDEX
    assert answer_spans([x, x, 5, 6, x, 7, x, x, 8]) == [(2, 4), (5, 6), (8, 9)]
    assert answer_spans([x, x]) == [] and answer_spans([1, 2]) == [(0, 2)]
    answers = example_answers([{"input_ids": [1, 2, 5, 6, 3, 7], "labels": [x, x, 5, 6, x, 7]}])
    assert [(a["prompt"], a["reference"]) for a in answers] == [([1, 2], [5, 6]), ([1, 2, 5, 6, 3], [7])]


@torch.no_grad()
def _reference(model, tok, rows: list[dict]) -> tuple[float, int, list[tuple[str, str]]]:
    """float64: loss over the assistant turns, and each assistant turn's greedy completion (no KV cache) and
    reference, prompts built by the chat template alone (add_generation_prompt after each earlier turn)."""
    nll, n, pairs = 0.0, 0, []
    stops = {tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id}  # end of turn, end of text
    for row in rows:
        msgs = row["messages"]
        full = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = tok(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
            turn = tok(tok.apply_chat_template(msgs[:i + 1], tokenize=False).rstrip(),
                       add_special_tokens=False)["input_ids"]
            assert ids[:len(turn)] == turn and turn[:len(prompt)] == prompt
            ref = turn[len(prompt):]  # content + <|eot_id|>
            lp = torch.log_softmax(logits[len(prompt) - 1:len(turn) - 1], -1)
            nll -= lp[torch.arange(len(ref)), torch.tensor(ref)].sum().item()
            n += len(ref)
            out = list(prompt)
            for _ in range(len(ref) + 16):
                out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
                if out[-1] in stops:
                    break
            pairs.append((tok.decode(out[len(prompt):], skip_special_tokens=True),
                          tok.decode(ref, skip_special_tokens=True)))
    return nll / n, n, pairs


def test_chat_eval_matches_float64_reference(tiny_model_dir, adapters, tmp_path):
    rows = _chat_rows(4)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = _run(tmp_path, "--model_name_or_path", str(tiny_model_dir), "--adapter_dir", str(adapters), "--dataset",
               str(data), "--dataset_format", "chat")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    model = PeftModel.from_pretrained(base, adapters).eval()
    loss, n, pairs = _reference(model, AutoTokenizer.from_pretrained(tiny_model_dir), rows)
    assert got["examples"] == 4 and got["trained_tokens"] == n
    assert got["answers"] == len(pairs) > 4  # multi-turn: every assistant turn is an answer
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    gens = [json.loads(line) for line in Path(got["generations_file"]).read_text().splitlines()]
    assert [(g["completion"], g["reference"]) for g in gens] == pairs
    assert got["exact_match"] == pytest.approx(sum(c.strip() == r.strip() for c, r in pairs) / len(pairs))
    assert got["generations_file"] == str(tmp_path / "r.generations.jsonl")
    assert not list(tmp_path.glob(".*tmp*"))  # written through temporary names


def test_input_output_eval_of_a_model_that_knows_the_answers(tiny_model_dir, tmp_path):
    """Targets that are the base model's own greedy outputs (stopping at its end tokens) score exact match 1.0;
    the same rows with one more word score 0."""
    from llama_ft.data import load_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    own, wrong = [], []
    for r in load_rows(str(BUNDLED_DATASET), "alpaca", 3):
        ids = tok(r["source"], return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        own.append({"input": r["source"], "output": text})
        wrong.append({"input": r["source"], "output": text + " zebra"})
    for name, rows in (("own", own), ("wrong", wrong)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    args = ["--model_name_or_path", str(tiny_model_dir), "--dataset_format", "input-output", "--metric",
            "exact_match", "--max_new_tokens", "6"]
    good = _run(tmp_path, *args, "--dataset", str(tmp_path / "own.jsonl"), name="own")
    bad = _run(tmp_path, *args, "--dataset", str(tmp_path / "wrong.jsonl"), name="wrong")
    assert good["answers"] == 3 and good["exact_match"] == 1.0 and bad["exact_match"] == 0.0
    assert "loss" not in good


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one(tiny_model_dir, adapters, tmp_path):
    """torchrun with 2 CPU ranks: examples and answers shared, sums all-reduced: the 1-rank report."""
    rows = _chat_rows(5)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model_name_or_path", str(tiny_model_dir), "--adapter_dir", str(adapters), "--dataset", str(data),
            "--dataset_format", "chat", "--batch_size", "2"]
    one = _run(tmp_path, *args, name="one")
    env = {**os.environ, "LLAMA_FT_CACHE": str(tmp_path / "cache")}
    proc = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "llama_ft.eval", *args, "--json", str(tmp_path / "two.json")], timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["ranks"] == 2 and one["ranks"] == 1
    for k in ("examples", "answers", "matches", "trained_tokens"):
        assert two[k] == one[k], k
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    gens = [Path(r["generations_file"]).read_text() for r in (one, two)]
    assert gens[0] == gens[1]  # every answer once, in order


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        eval_main(list(args))
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llama-ft eval: error: "), lines
    return lines[0]


def test_bad_input_is_one_line(tiny_model_dir, adapters, tmp_path, capsys):
    data = ["--dataset", str(BUNDLED_CHAT_DATASET), "--dataset_format", "chat"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _error(capsys, "--model_name_or_path", str(empty), *data)
    line = _error(capsys, "--model_name_or_path", str(adapters), *data)
    assert "holds PEFT adapters" in line and "--adapter_dir" in line
    line = _error(capsys, "--model_name_or_path", str(tiny_model_dir), "--adapter_dir", str(empty), *data)
    assert "no adapter_config.json" in line
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    line = _error(capsys, "--model_name_or_path", str(tmp_path / "m.gguf"), *data)
    assert "GGUF" in line and "llama-ft convert-gguf" in line
    assert "--metric" in _error(capsys, "--model_name_or_path", str(tiny_model_dir), *data, "--metric", "bleu")

    # adapters trained for another shape of base: both shapes named
    other = tmp_path / "other"
    other.mkdir()
    for f in adapters.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tensors = load_file(adapters / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(8, 96)
    save_file(tensors, other / "adapter_model.safetensors")
    line = _error(capsys, "--model_name_or_path", str(tiny_model_dir), "--adapter_dir", str(other), *data)
    assert "shape mismatch" in line and "[8, 96]" in line and "[64, 64]" in line
    # the same on a bnb-4bit base (llama-ft quantize --bits 4): the shape its quant state gives, not the packed bytes
    from llama_ft.quantize import main as quantize_main

    nf4 = tmp_path / "nf4"
    assert quantize_main(["--model", str(tiny_model_dir), "--output", str(nf4), "--bits", "4", "--no-progress"]) == 0
    line = _error(capsys, "--model_name_or_path", str(nf4), "--adapter_dir", str(other), *data)
    assert "shape mismatch" in line and "[8, 96]" in line and "[64, 64]" in line

    # exact match needs a prompt before each answer: with --train_on_source every token is trained
    line = _error(capsys, "--model_name_or_path", str(tiny_model_dir), *data, "--train_on_source")
    assert "example 0 (line 1 of llama-ft data --dump)" in line and "--metric loss" in line
