"""DPO on a real checkpoint: SmolLM2-135M-Instruct learns a preference rule, with a 4-bit (NF4, QLoRA's) base,
packed pairs and optimizer offload, then a merge onto the bf16 base; eval and generate on a bnb-4bit directory.

The pairs (benchmarks/real_checkpoint.pair_rows): "Mia has a orange house. Give the owner, object and color.";
chosen "owner=Mia; object=house; color=orange", rejected the same with another color. Only the rule (copy the
prompt's color) tells the sides apart. One run of 2 CPU ranks with run-llama.sh, --bits 4 (the reference is the
NF4 base under lora_disabled; hidden 576 and MLP 1536 are whole blocks of 64), --packing (rows of whole pairs, up to
2 x --max_seq_len tokens: 2 pairs a row here, 6 rows a rank), DS_CONFIG zero3_offload.json, one optimizer step =
the 24 training pairs, 2 steps, merged at the end (MERGE_DIR) onto the bf16 base, as QLoRA practice merges.
(SIGTERM and resume with DPO: tests/test_dpo_train.py; packed pairs against float64: tests/test_dpo_train.py; FP8
on this checkpoint: tests/test_real_checkpoint.py.) Checked:
- the run packed: step 1 trained 24 pairs from 2 x 6 rows (unpacked, 6 rows a rank are 12 pairs);
- step 1's loss is ln 2 and its rewards are exactly 0 (B = 0: the policy is the reference, 4-bit base included);
- on 12 held-out pairs (another draw), the reward accuracy [beta (pi_c - ref_c) > beta (pi_r - ref_r)] is above 0.9,
  measured with transformers + PEFT on the bf16 checkpoint (pi: the saved adapters; ref: disable_adapter()), the
  sides tokenized by hand from ChatML (test_real_checkpoint.chatml_example);
- the merged checkpoint (transformers alone) prefers the chosen side on the same pairs by the margins PEFT gives;
- the QLoRA serving path: transformers loads the checkpoint 4-bit with bitsandbytes (NF4, Linear4bit), PEFT puts the
  same adapters on it, and its logits equal those of llama-ft's own 4-bit model with the adapters (within fp32
  rounding: the same codes and absmax, decoded in fp32; bitsandbytes' AVX512-bf16 CPU matmul, which computes in
  bf16, is switched off for the comparisons);
- that 4-bit model saved by transformers (save_pretrained: a bnb-4bit directory, quantization_config in config.json)
  is a --model_name_or_path for llama-ft generate and llama-ft eval with the adapters: generate's greedy completion
  is transformers' generate on the bitsandbytes + PEFT model, token for token, and eval's loss is that model's
  nats per trained token by hand (float64 log-softmax of its logits); without bitsandbytes, one line.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from real_checkpoint import TRAIN_FLAGS, write_pairs
from test_e2e import run_llama
from test_real_checkpoint import chatml_example
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_ft.data import IGNORE_INDEX

pytestmark = [pytest.mark.slow, pytest.mark.real]
BETA, STEPS, ROWS = 0.1, 2, 6  # ROWS: packed rows per rank and micro-batch


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_checkpoint):
    tmp = tmp_path_factory.mktemp("real-dpo")
    train, heldout = write_pairs(tmp / "task")
    out, merged = tmp / "dpo", tmp / "merged"
    # --packing: rows of 2 x --max_seq_len 128 tokens hold whole pairs; a pair here is 114..120 tokens (both
    # sides), so best-fit packs the 24 training pairs into 12 rows of 2: 6 rows a rank = the 24 pairs a step
    flags = [*TRAIN_FLAGS, "--objective", "dpo", "--dpo_beta", str(BETA), "--bits", "4", "--packing",
             "--per_device_train_batch_size", str(ROWS), "--max_steps", str(STEPS), "--save_steps", str(STEPS),
             "--eval_steps", str(STEPS), "--overwrite_output_dir"]
    run_llama(tmp, out, *flags, merge_dir=merged, model=real_checkpoint, ds_config="ds_configs/zero3_offload.json",
              DATA=str(train))
    first = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][0]
    return {"out": out, "merged": merged, "first": first, "model": real_checkpoint,
            "heldout": [json.loads(ln) for ln in heldout.read_text().splitlines()]}


def test_packed_first_step_is_ln2_with_zero_rewards_on_the_4bit_base(run):
    first = run["first"]
    # 24 pairs in 2 ranks x ROWS rows: 2 pairs a row, so the run packed (unpacked, a row is one pair: 12)
    assert first["step"] == 1 and first["pairs"] == 24 == 2 * 2 * ROWS
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[key] == 0.0, (key, first)
    done = json.loads((run["out"] / "train_results.json").read_text())
    assert done["global_step"] == STEPS


def _logp(model, example: dict) -> float:
    """Summed log-probability of the trained (response) tokens; token t predicts label t + 1."""
    logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].double()
    y = torch.tensor(example["labels"][1:])
    keep = y != IGNORE_INDEX
    return float(F.log_softmax(logits[keep], dim=-1).gather(1, y[keep, None]).sum())


@torch.no_grad()
def test_heldout_reward_accuracy_above_0_9_by_peft_and_the_merged_model_agrees(run):
    tok = AutoTokenizer.from_pretrained(run["model"])
    sides = [[chatml_example(tok, [*p["prompt"], *p[s]]) for s in ("chosen", "rejected")] for p in run["heldout"]]
    base = AutoModelForCausalLM.from_pretrained(run["model"], torch_dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, str(run["out"])).eval()
    with peft.disable_adapter():
        ref = [[_logp(peft, s) for s in pair] for pair in sides]
    pi = [[_logp(peft, s) for s in pair] for pair in sides]
    rewards = [[BETA * (p - r) for p, r in zip(pp, rr, strict=True)] for pp, rr in zip(pi, ref, strict=True)]
    accuracy = sum(c > r for c, r in rewards) / len(rewards)
    margins = [c - r for c, r in rewards]
    assert accuracy > 0.9, (accuracy, rewards)

    merged = AutoModelForCausalLM.from_pretrained(run["merged"], torch_dtype=torch.float32).eval()
    merged_margins = [BETA * ((_logp(merged, c) - rc) - (_logp(merged, r) - rr))
                      for (c, r), (rc, rr) in zip(sides, ref, strict=True)]
    assert sum(m > 0 for m in merged_margins) / len(sides) > 0.9, merged_margins
    # the merge stores W + s B A in bf16, which keeps only the high bits of a small s B A (2 steps here): margins
    # within 10% of PEFT's, not bit for bit (a wrong scale s, or a module left unmerged, is far outside that)
    for m, want in zip(merged_margins, margins, strict=True):
        assert abs(m - want) < 0.1 * abs(want) + 0.02, (merged_margins, margins)


def exact_bnb_cpu(model) -> None:
    """bitsandbytes' AVX512-bf16 CPU matmul computes in bf16 where the CPU has it: its dequantize-then-matmul path
    is the fp32 one (for exact comparisons only; the product keeps bitsandbytes' default)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


@pytest.fixture(scope="module")
def qlora(run, tmp_path_factory):
    """The QLoRA serving path: transformers loads the checkpoint 4-bit with bitsandbytes (NF4, Linear4bit, fp32
    compute), saves that as a bnb-4bit directory (save_pretrained, before any forward), and PEFT puts the trained
    adapters on it."""
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                            bnb_4bit_compute_dtype=torch.float32)
    qbase = AutoModelForCausalLM.from_pretrained(run["model"], dtype=torch.float32, quantization_config=qc,
                                                 device_map="cpu").eval()
    assert type(qbase.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    exact_bnb_cpu(qbase)
    bnb_dir = tmp_path_factory.mktemp("bnb-4bit") / "smollm2-bnb-4bit"
    qbase.save_pretrained(bnb_dir)
    return {"model": PeftModel.from_pretrained(qbase, str(run["out"])).eval(), "dir": bnb_dir}


@torch.no_grad()
def test_qlora_serving_path_equals_llama_fts_4bit_model(run, qlora, monkeypatch):
    """transformers + bitsandbytes (NF4 Linear4bit) + PEFT with the saved adapters == our NF4 model with them."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # our CPU path (the kernels are checked elsewhere)
    from llama_ft.adapters import load_adapters, read_adapter_tensors
    from llama_ft.lora import LoraSpec
    from llama_ft.model.build import build_lora_model

    cfg = json.loads((run["out"] / "adapter_config.json").read_text())
    spec = LoraSpec(cfg["r"], cfg["lora_alpha"], target_modules=tuple(cfg["target_modules"]))
    ours, _ = build_lora_model(run["model"], spec, ds_config=None, dtype=torch.float32, quantize=True, bits=4)
    load_adapters(ours, read_adapter_tensors(run["out"]), str(run["out"]))
    ours.eval()
    tok = AutoTokenizer.from_pretrained(run["model"])
    pair = run["heldout"][0]
    ids = torch.tensor([chatml_example(tok, [*pair["prompt"], *pair["chosen"]])["input_ids"]])
    model = qlora["model"]
    theirs, mine = model(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    with model.disable_adapter():
        assert (theirs - model(input_ids=ids).logits).abs().max() > 1e-3  # the adapters matter: it can fail


@pytest.fixture
def exact_load(monkeypatch):
    """llama-ft's load_model (generate and eval load through it), then bitsandbytes' fp32 CPU path (exact_bnb_cpu)."""
    from llama_ft import generate

    load_model = generate.load_model

    def exact(*args, **kwargs):
        model = load_model(*args, **kwargs)
        exact_bnb_cpu(model)
        return model

    monkeypatch.setattr(generate, "load_model", exact)


@torch.no_grad()
def test_generate_with_a_bnb_4bit_checkpoint_equals_transformers(run, qlora, exact_load, capsys):
    """llama-ft generate --model_name_or_path <bnb-4bit dir> --adapter: the greedy completion transformers'
    generate gives on the bitsandbytes + PEFT model."""
    from llama_ft.generate import main

    messages = run["heldout"][0]["prompt"]
    assert main(["--model_name_or_path", str(qlora["dir"]), "--adapter", str(run["out"]), "--messages",
                 json.dumps(messages), "--max_new_tokens", "12"]) == 0
    got = capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(run["out"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = qlora["model"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, pad_token_id=tok.eos_token_id)
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert want.strip() and got == want + "\n", (got, want)


@torch.no_grad()
def test_eval_with_a_bnb_4bit_checkpoint_equals_float64_loss(run, qlora, exact_load, tmp_path):
    """llama-ft eval --model_name_or_path <bnb-4bit dir> --adapter_dir: nats per trained token of the bitsandbytes
    + PEFT model's logits, by hand (float64 log-softmax; the sides tokenized from ChatML by hand)."""
    from llama_ft.eval.command import main

    convs = [[*p["prompt"], *p["chosen"]] for p in run["heldout"][:3]]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    report = tmp_path / "report.json"
    assert main(["--model_name_or_path", str(qlora["dir"]), "--adapter_dir", str(run["out"]), "--dataset",
                 str(data), "--dataset_format", "chat", "--metric", "loss", "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    tok = AutoTokenizer.from_pretrained(run["out"])
    examples = [chatml_example(tok, c) for c in convs]
    nll = -sum(_logp(qlora["model"], e) for e in examples)
    tokens = sum(sum(y != IGNORE_INDEX for y in e["labels"][1:]) for e in examples)
    assert got["examples"] == 3 and got["trained_tokens"] == tokens
    assert abs(got["loss"] - nll / tokens) < 1e-5 * nll / tokens, (got["loss"], nll / tokens)


def test_a_bnb_4bit_checkpoint_without_bitsandbytes_is_one_line(run, qlora, monkeypatch, capsys):
    """bitsandbytes is not a dependency (the test extra has it): where it cannot be imported, or transformers'
    own check finds it unusable, loading a bnb-4bit directory is one line naming it and the pip command."""
    import sys

    import transformers.quantizers.quantizer_bnb_4bit as bnb_quantizer

    from llama_ft.generate import main

    args = ["--model_name_or_path", str(qlora["dir"]), "--adapter", str(run["out"]), "--prompt", "Hi"]
    for how in ("import", "transformers"):
        with monkeypatch.context() as m:
            if how == "import":
                m.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
            else:
                m.setattr(bnb_quantizer, "is_bitsandbytes_available", lambda: False)
            with pytest.raises(SystemExit) as e:
                main(args)
        assert e.value.code == 2, how
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("llama-ft generate: error: "), (how, lines)
        assert str(qlora["dir"]) in lines[0] and "pip install bitsandbytes" in lines[0], (how, lines)
