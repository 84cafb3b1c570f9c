"""A real pretrained checkpoint end to end: SmolLM2-135M-Instruct (benchmarks/real_checkpoint.py).

Its shapes are the ones our fixtures avoid: tied embeddings, hidden 576 (FP8 blocks with tails), 9 query and
3 KV heads, a 49k vocabulary, ChatML. Every check has an independent reference: a ChatML reading of our labels by
character offsets; transformers (float32) for the loss of the first step; PEFT for the trained adapters; a
hand-written greedy loop for generation; lm-evaluation-harness for the exact match.

Two training runs on CPU ranks serve all the assertions. One optimizer step covers the whole training split
(24 examples), so the first step's loss is the base model's loss on exactly those examples, whatever the
batch order or sequence sharding:
    A  2 ranks, padded, fp32, 6 steps, --eval_every, merged afterwards (MERGE_DIR)
    B  3 ranks, --sequence_parallel_size 3 (9 heads and 3 KV heads split 3 ways) and --quantize (FP8 base),
       3 steps
(Packing on this checkpoint: tests/test_real_dpo.py, packed DPO pairs on its 4-bit base.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from real_checkpoint import SYSTEM_PROMPT, TRAIN_FLAGS, write_task
from safetensors import safe_open
from test_e2e import run_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_ft.adapters import load_adapters, read_adapter_tensors
from llama_ft.data import IGNORE_INDEX, DataOptions, prepare_examples
from llama_ft.data.split import split_indices
from llama_ft.lora import LoraSpec
from llama_ft.model.build import build_lora_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.real]
EOT = "<|im_end|>"
N_EVAL, SEED = 8, 42  # the runs' --eval_dataset_size and --seed: 24 of the 32 rows train
COMMON = TRAIN_FLAGS  # fp32, r 8, constant LR 2e-3, no dropout, 8 rows held out as the eval split


# ----------------------------------------------------------------------------------------------------------
# independent references


def chatml_example(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """ids and labels of one conversation read by hand: SmolLM2's ChatML (its default system turn when none is
    given), tokenized with offsets; a token is trained when it overlaps an assistant content + <|im_end|>."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
    text, spans = "", []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"]) + len(EOT)))
        text += f"{m['content']}{EOT}\n"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [i if any(s < e2 and e > s2 for s2, e2 in spans) else IGNORE_INDEX
              for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return {"input_ids": list(enc["input_ids"]), "labels": labels}


@torch.no_grad()
def reference_loss(model, examples: list[dict]) -> float:
    """Nats per trained token, one example at a time, float32 transformers."""
    nll, n = 0.0, 0
    for e in examples:
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].double()
        y = torch.tensor(e["labels"][1:])
        nll += torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").item()
        n += int((y != IGNORE_INDEX).sum())
    return nll / n


def fp8_rounded(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """W through FP8 e4m3 with one scale per 128x128 block (absmax / 448), the tail blocks of a dimension that is
    not a multiple of 128 included: block by block, with torch's own float8 cast."""
    out = torch.empty_like(w, dtype=torch.float32)
    for i in range(0, w.shape[0], block):
        for j in range(0, w.shape[1], block):
            b = w[i:i + block, j:j + block].float()
            s = b.abs().max() / 448 if b.abs().max() > 0 else torch.tensor(1.0)
            out[i:i + block, j:j + block] = (b / s).to(torch.float8_e4m3fn).float() * s
    return out


@torch.no_grad()
def greedy_by_hand(model, ids: list[int], stop: int, max_new: int) -> list[int]:
    """Argmax decoding with the whole sequence re-run at every step (no cache): transformers' generate checked."""
    out = list(ids)
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == stop:
            break
    return out[len(ids):]


# ----------------------------------------------------------------------------------------------------------
# fixtures: the task data, the base model in float32, the three runs


@pytest.fixture(scope="module")
def task(tmp_path_factory, real_checkpoint):
    tmp = tmp_path_factory.mktemp("real")
    train, heldout = write_task(tmp / "task")
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(real_checkpoint)
    train_idx, eval_idx = split_indices(len(rows), N_EVAL, SEED)
    return {"tmp": tmp, "train": train, "heldout": heldout, "rows": rows, "tok": tok,
            "train_examples": [chatml_example(tok, rows[i]["messages"]) for i in train_idx],
            "eval_examples": [chatml_example(tok, rows[i]["messages"]) for i in eval_idx]}


@pytest.fixture(scope="module")
def base32(real_checkpoint):
    return AutoModelForCausalLM.from_pretrained(real_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def first_step_reference(base32, task) -> float:
    return reference_loss(base32, task["train_examples"])


def _train(task, real_checkpoint, name: str, *flags: str, **env) -> dict:
    out = task["tmp"] / name
    proc = run_llama(task["tmp"], out, *COMMON, *flags, model=real_checkpoint, DATA=str(task["train"]), **env)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "log": proc.stderr, "loss": [r["loss"] for r in metrics if "loss" in r], "metrics": metrics}


@pytest.fixture(scope="module")
def run_a(task, real_checkpoint):
    """2 ranks, padded, 12 rows per rank: one step = the 24 training examples."""
    return _train(task, real_checkpoint, "a", "--per_device_train_batch_size", "12", "--max_steps", "6",
                  "--save_steps", "6", "--eval_every", "6", merge_dir=task["tmp"] / "a-merged")


@pytest.fixture(scope="module")
def run_b(task, real_checkpoint):
    """3 ranks sharing each sequence (SP=3, one data-parallel group of 24 rows) on an FP8 base."""
    return _train(task, real_checkpoint, "b", "--sequence_parallel_size", "3", "--quantize",
                  "--per_device_train_batch_size", "24", "--max_steps", "3", "--save_steps", "3", nproc=3)


# ----------------------------------------------------------------------------------------------------------
# data


def test_chat_labels_match_a_chatml_reading(task, tmp_path):
    """Our labels (the chat template rendered by transformers, spans found by re-rendering prefixes) equal a
    character-offset reading of the ChatML text: assistant content + <|im_end|> trained, the rest not."""
    tok = task["tok"]
    examples, stats = prepare_examples(DataOptions(str(task["train"]), "chat"), tok, tmp_path)
    assert stats.examples == len(task["rows"]) == 32
    for i, row in enumerate(task["rows"]):
        ref = chatml_example(tok, row["messages"])
        assert examples[i]["input_ids"] == ref["input_ids"], i
        assert examples[i]["labels"] == ref["labels"], i
    first = examples[0]
    trained = tok.decode([t for t in first["labels"] if t != IGNORE_INDEX])
    assert trained == task["rows"][0]["messages"][1]["content"] + EOT


# ----------------------------------------------------------------------------------------------------------
# training runs


def test_padded_run_first_step_is_the_base_loss_and_loss_falls(run_a, first_step_reference):
    loss = run_a["loss"]
    assert len(loss) == 6
    assert loss[0] == pytest.approx(first_step_reference, rel=1e-4)  # the 24 examples through transformers
    assert loss[-1] < 0.2 * loss[0], loss


def test_fp8_sp3_run_trains_hidden_576_with_block_tails(run_b, first_step_reference, real_checkpoint, task):
    """--quantize on hidden 576 and MLP 1536 (128-blocks with 64-wide tails) with SP=3 on 3 ranks (9 heads and
    3 KV heads, 3 and 1 per rank): the first step's loss, over the same 24 examples as every run here, is the
    base's with every adapted weight rounded through e4m3 block by block (transformers, float32, unsharded), within
    a few percent of the unrounded base's (e4m3 keeps 3 mantissa bits: about 2.6% RMS error per weight), and the
    run learns."""
    loss = run_b["loss"]
    assert "(FP8)" in run_b["log"] and "sequence parallel: 3 ranks per sequence" in run_b["log"]
    model = AutoModelForCausalLM.from_pretrained(real_checkpoint, dtype=torch.float32).eval()
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            mod.weight.data = fp8_rounded(mod.weight.data)
    assert loss[0] == pytest.approx(reference_loss(model, task["train_examples"]), rel=1e-4)
    assert loss[0] == pytest.approx(first_step_reference, rel=0.05), (loss[0], first_step_reference)
    assert loss[-1] < 0.5 * loss[0], loss


def test_sequence_parallel_2_is_refused_before_launch(task, real_checkpoint):
    proc = run_llama(task["tmp"], task["tmp"] / "sp2", *COMMON, "--sequence_parallel_size", "2",
                     model=real_checkpoint, DATA=str(task["train"]), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "9" in lines[0] and "3" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "launch.py" not in proc.stderr  # nothing was launched


def test_eval_every_scores_the_eval_split(run_a):
    scored = [r for r in run_a["metrics"] if "eval_exact_match" in r]
    assert [r["step"] for r in scored] == [6] and scored[0]["eval_answers"] == N_EVAL
    assert scored[0]["eval_exact_match"] >= 0.75, scored


# ----------------------------------------------------------------------------------------------------------
# adapters, tied embeddings, merge, generate


@pytest.fixture(scope="module")
def peft_a(run_a, real_checkpoint):
    base = AutoModelForCausalLM.from_pretrained(real_checkpoint, dtype=torch.float32)
    return PeftModel.from_pretrained(base, run_a["out"]).eval()


def test_adapters_in_peft_give_llama_fts_own_eval_loss(run_a, peft_a, task):
    """The run's final eval loss (llama-ft's ZeRO-3 forward, FP32, after the last update) equals PEFT's loss
    on the same eval examples with the saved adapters; the adapters change the model."""
    final = [r["eval_loss"] for r in run_a["metrics"] if "eval_loss" in r][-1]
    assert reference_loss(peft_a, task["eval_examples"]) == pytest.approx(final, rel=1e-4)
    with peft_a.disable_adapter():
        assert reference_loss(peft_a, task["eval_examples"]) > 2 * final


def test_llama_fts_own_model_with_the_adapters_gives_peft_logits(run_a, peft_a, task, real_checkpoint):
    """llama-ft's LoRA model (its build, its LoRA layers; one process) with the saved adapters loaded: PEFT's
    logits on the transformers model; its LM head is the embedding matrix itself (tied)."""
    model, _ = build_lora_model(real_checkpoint, LoraSpec(8, 16), ds_config=None, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    load_adapters(model, read_adapter_tensors(run_a["out"]), str(run_a["out"]))
    ids = torch.tensor([task["eval_examples"][1]["input_ids"]])
    with torch.no_grad():
        ours, theirs = model.eval()(input_ids=ids).logits, peft_a(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with peft_a.disable_adapter(), torch.no_grad():
        assert (ours - peft_a(input_ids=ids).logits).abs().max() > 1.0  # the adapters matter


def test_tied_embeddings_survive_training_and_merge(run_a, peft_a, task, real_checkpoint):
    out, merged = run_a["out"], task["tmp"] / "a-merged"
    with safe_open(out / "adapter_model.safetensors", "pt") as f:  # LoRA only: no head, no embeddings
        assert all(".lora_A." in k or ".lora_B." in k for k in f.keys())
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # stored once
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # every tensor is PEFT's merge_and_unload computed in float32 and rounded to the checkpoint's bf16
    base = AutoModelForCausalLM.from_pretrained(real_checkpoint, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t.to(torch.bfloat16), reference[name].to(torch.bfloat16)), name
    # against unmerged PEFT, both computed in float32: what storing W + s B A in bf16 costs (about 1.2% here,
    # where the tuned answers are confident; computing in bf16 too would add about 4%)
    for e in task["eval_examples"][:2]:
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            theirs = peft_a(input_ids=ids).logits
            ours = model(input_ids=ids).logits
        assert (ours - theirs).norm() / theirs.norm() <= 2e-2


def test_generate_on_the_adapters_is_greedy(run_a, peft_a, task, real_checkpoint):
    messages = task["rows"][0]["messages"][:1]
    proc = subprocess.run([sys.executable, "-m", "llama_ft.cli", "generate", "--model_name_or_path",
                           str(real_checkpoint), "--adapter", str(run_a["out"]), "--messages", json.dumps(messages),
                           "--max_new_tokens", "24"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompt = chatml_example(task["tok"], messages)["input_ids"] + task["tok"]("<|im_start|>assistant\n",
                                                                             add_special_tokens=False)["input_ids"]
    by_hand = greedy_by_hand(peft_a, prompt, task["tok"].convert_tokens_to_ids(EOT), 24)
    assert proc.stdout.strip() == task["tok"].decode(by_hand, skip_special_tokens=True).strip()
    assert proc.stdout.strip() == task["rows"][0]["messages"][1]["content"]


# ----------------------------------------------------------------------------------------------------------
# llama-ft eval


def _eval(tmp: Path, name: str, *args: str) -> dict:
    """`llama-ft eval` in this process (its own process would pay the imports again: the suite's time)."""
    from llama_ft.eval.command import main as eval_main

    report, shown = tmp / f"{name}.json", io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert eval_main([*args, "--json", str(report)]) == 0
    assert "exact_match" in shown.getvalue()
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def evals(run_a, task, real_checkpoint):
    """llama-ft eval on the held-out rows: the base and base + adapters. (The merged directory is a plain
    transformers checkpoint, equal to PEFT's merge_and_unload tensor for tensor: test_tied_embeddings_...)"""
    # 32 new tokens at most, as lm_eval's task (tests/lm_eval_task.py) gives it
    common = ("--dataset", str(task["heldout"]), "--dataset_format", "chat", "--max_new_tokens", "32")
    return {"base": _eval(task["tmp"], "base", "--model_name_or_path", str(real_checkpoint), *common),
            "tuned": _eval(task["tmp"], "tuned", "--model_name_or_path", str(real_checkpoint), "--adapter_dir",
                           str(run_a["out"]), *common)}


def test_eval_shows_the_fine_tune_worked(evals):
    base, tuned = evals["base"], evals["tuned"]
    assert base["answers"] == tuned["answers"] == 12
    assert base["exact_match"] <= 1 / 12 and tuned["exact_match"] >= 10 / 12, (base, tuned)
    assert tuned["loss"] < 0.25 * base["loss"]
    assert set(tuned) >= {"loss", "exact_match", "examples", "trained_tokens"}


def test_eval_numbers_match_independent_references(evals, peft_a, base32, task, real_checkpoint):
    """loss: transformers/PEFT float32 on a ChatML reading of the held-out rows; exact_match: the generations
    file's completions re-derived by a hand-written greedy loop (first 3 answers)."""
    rows = [json.loads(line) for line in task["heldout"].read_text().splitlines()]
    examples = [chatml_example(task["tok"], r["messages"]) for r in rows]
    # float32 either way, batched there and one by one here: agreement to rounding (abs for the tuned ~0.002)
    assert evals["tuned"]["loss"] == pytest.approx(reference_loss(peft_a, examples), rel=1e-4, abs=1e-6)
    assert evals["base"]["loss"] == pytest.approx(reference_loss(base32, examples), rel=1e-4, abs=1e-6)
    assert evals["tuned"]["trained_tokens"] == sum(sum(y != IGNORE_INDEX for y in e["labels"][1:]) for e in examples)
    gens = [json.loads(line) for line in Path(evals["tuned"]["generations_file"]).read_text().splitlines()]
    assert len(gens) == 12 and sum(g["match"] for g in gens) == evals["tuned"]["matches"]
    stop = task["tok"].convert_tokens_to_ids(EOT)
    for g, r, e in list(zip(gens, rows, examples, strict=True))[:3]:
        prompt = e["input_ids"][:e["labels"].index(next(y for y in e["labels"] if y != IGNORE_INDEX))]
        by_hand = task["tok"].decode(greedy_by_hand(peft_a, prompt, stop, 40), skip_special_tokens=True)
        assert g["completion"] == by_hand and g["reference"] == r["messages"][1]["content"]
        assert g["match"] == (by_hand.strip() == g["reference"].strip())


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness not installed")
def test_lm_eval_harness_agrees_with_llama_ft_eval(evals, run_a, task, real_checkpoint):
    """lm_eval --model hf on base + adapters (peft=): the same exact match as llama-ft eval, and document by
    document the same stripped generation and verdict (tests/lm_eval_task.py)."""
    from lm_eval_task import run_lm_eval

    got = run_lm_eval(task["tmp"] / "lm_eval-tuned", task["heldout"],
                      f"pretrained={real_checkpoint},peft={run_a['out']}")
    ours = [json.loads(line) for line in Path(evals["tuned"]["generations_file"]).read_text().splitlines()]
    assert got["predictions"] == [g["completion"].strip() for g in ours]
    assert got["matches"] == [g["match"] for g in ours]
    assert got["exact_match"] == pytest.approx(evals["tuned"]["exact_match"])
