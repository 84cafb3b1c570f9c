"""llama-ft's DPO loss and rewards equal TRL's DPOTrainer on the same pairs (issue 21), where TRL is installed.

At step 1 every DPO loss is ln 2 (B = 0: the policy is the reference), so the comparison is made on trained
adapters. llama-ft trains the tiny Llama for 4 DPO steps (1 rank, ZeRO-3, fp32, beta 0.5) on 7 of
test_dpo_train's 11 pairs (TRL's three row forms) and, after the last step, scores the 4 held-out pairs
(--eval_dataset_size 4) with the saved adapters: eval_loss and eval_rewards/* in metrics.jsonl. Then TRL's
DPOTrainer gets the same base checkpoint in fp32, a LoRA of the run's own adapter_config.json with the saved
adapter_model.safetensors loaded into it (peft's load_peft_weights / set_peft_model_state_dict), the same 4
pairs and beta, loss_type sigmoid and ref_model=None: with a fresh PEFT adapter TRL's reference is the model
under `disable_adapter()`, the frozen base, which is llama-ft's reference too (lora.lora_disabled).
`trainer.evaluate()` scores the 4 pairs in one batch, so its eval_loss and eval_rewards/* are means over the
pairs, as llama-ft's are (over several batches TRL would average per-batch means).

Checked, against TRL itself:
- tokens: for every held-out pair and side, TRL's `prompt_ids + chosen_ids` (`rejected_ids`) are exactly the
  input_ids llama-ft evaluates, and TRL's completion (the tokens its log-probabilities are summed over) is
  exactly the tokens llama-ft labels (label != -100);
- eval_loss, eval_rewards/chosen, /rejected, /margins agree to 1e-4 relative (fp32 both; the sums run in another
  order), eval_rewards/accuracies exactly, and the adapters moved the policy (margins well away from 0).

Rows as TRL reads them: llama-ft renders a string pair ({"prompt", "chosen", "rejected"} as strings) as a
single-turn chat (one user message, one assistant message: data/pairs.py), where TRL would tokenize the raw
strings with EOS appended and no template; such rows go to TRL as that conversation. Implicit-prompt rows
(chosen/rejected conversations sharing their prefix) go through TRL's own `extract_prompt`.

Where TRL's tokens differ, and why: TRL's completion is prompt + completion rendered by the template minus the
prompt rendered with add_generation_prompt=True, so it includes whatever the template writes after the response's
end-of-turn token. llama-ft's assistant span ends at that token (data/chat.py: the render, right-stripped).
Llama 3.1's template (the tiny model's) writes nothing after `<|eot_id|>`, so the tokens above are identical;
ChatML writes `<|im_end|>` and then "\n", and TRL also sums the log-probability of that "\n" (a token the model
never generates: generation ends at <|im_end|>). test_chatml_trl_also_scores_the_newline_after_im_end checks
exactly this difference, and nothing else, on SmolLM2's tokenizer (marked real).

Not compared: TRL 1.16's sigmoid loss has no label smoothing (its `label_smoothing` belongs to the "robust" and
"exo_pair" losses), so llama-ft's --dpo_label_smoothing (conservative DPO) has no TRL counterpart there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_dpo_train import _pairs, _train_one_rank
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_ft.config import parse_train_args
from llama_ft.data import IGNORE_INDEX, DataOptions, load_tokenizer, prepare_examples
from llama_ft.train.recipe import load_training_data

pytest.importorskip("trl")
pytestmark = pytest.mark.slow
BETA, EVAL_PAIRS, SEED = 0.5, 4, 42
METRICS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins")


def trl_row(row: dict) -> dict:
    """A test_dpo_train row in TRL's conversational form, meaning what llama-ft reads it as (module doc)."""
    from trl.data_utils import extract_prompt

    if "prompt" not in row:
        return extract_prompt(row)  # TRL's own split of an implicit prompt
    if isinstance(row["prompt"], str):
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                **{side: [{"role": "assistant", "content": row[side]}] for side in ("chosen", "rejected")}}
    return row


def trl_trainer(model_dir: Path, rows: list[dict], out: Path, lora):
    """TRL's DPOTrainer over `rows` (train and eval set alike; only evaluated), fp32 on CPU, one eval batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([trl_row(r) for r in rows])
    args = DPOConfig(output_dir=str(out), beta=BETA, loss_type=["sigmoid"], bf16=False, use_cpu=True,
                     gradient_checkpointing=False, max_length=None, per_device_eval_batch_size=len(rows),
                     report_to="none", seed=SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return DPOTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=lora)


def trl_sides(trainer, split: str) -> list[dict[str, tuple[list[int], list[int]]]]:
    """Per pair, per side: (input ids, completion mask) as TRL's collator builds them from its tokenized rows."""
    data = trainer.eval_dataset if split == "eval" else trainer.train_dataset
    return [{side: (row["prompt_ids"] + row[f"{side}_ids"],
                    [0] * len(row["prompt_ids"]) + [1] * len(row[f"{side}_ids"])) for side in ("chosen", "rejected")}
            for row in data]


def ours_sides(examples) -> list[dict[str, tuple[list[int], list[int]]]]:
    """Per pair, per side: (input ids, trained mask) of llama-ft's examples."""
    return [{side: (list(ex[f"{side}_input_ids"]), [int(y != IGNORE_INDEX) for y in ex[f"{side}_labels"]])
             for side in ("chosen", "rejected")} for ex in examples]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """A 4-step llama-ft DPO run with 4 pairs held out, and the examples it evaluated them as."""
    tmp = tmp_path_factory.mktemp("dpo-trl")
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    case = {"tmp": tmp, "cache": tmp / "cache", "model": tiny_model_dir}
    out = tmp / "out"
    flags = ["--dataset", str(data), "--dataset_format", "chat", "--objective", "dpo", "--dpo_beta", str(BETA),
             "--max_steps", "4", "--save_steps", "4", "--per_device_train_batch_size", "4", "--bf16", "false",
             "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0", "--learning_rate", "1e-2",
             "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--eval_dataset_size", str(EVAL_PAIRS),
             "--seed", str(SEED), "--overwrite_output_dir"]
    proc = _train_one_rank(case, out, *flags)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the held-out examples exactly as the run made them: its own data path over the same flags and cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMA_FT_CACHE", str(case["cache"]))
        cfg = parse_train_args(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *flags])
        _, train_set, eval_set, stats = load_training_data(cfg)
    assert stats.examples == len(_pairs()) and len(eval_set) == EVAL_PAIRS  # no pair dropped: row i is example i
    eval_rows = [_pairs()[i] for i in sorted(set(range(len(_pairs()))) - set(stats.train_index))]
    return {"tmp": tmp, "out": out, "model": tiny_model_dir, "eval_set": eval_set, "eval_rows": eval_rows}


@pytest.fixture(scope="module")
def trl_eval(run):
    """TRL's DPOTrainer with the run's saved adapters, and its evaluate() of the held-out pairs."""
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    lora = LoraConfig.from_pretrained(str(run["out"]))  # the run's adapter_config.json: r, alpha, targets
    lora.inference_mode = False
    trainer = trl_trainer(run["model"], run["eval_rows"], run["tmp"] / "trl", lora)
    assert trainer.ref_model is None  # TRL's reference: the PEFT model with its adapter disabled
    loaded = set_peft_model_state_dict(trainer.model, load_peft_weights(str(run["out"])))
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    return trainer, trainer.evaluate()


def test_trl_tokenizes_the_held_out_pairs_as_llama_ft(run, trl_eval):
    trainer, _ = trl_eval
    ours, theirs = ours_sides(run["eval_set"]), trl_sides(trainer, "eval")
    assert len(ours) == len(theirs) == EVAL_PAIRS
    for k, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        for side in ("chosen", "rejected"):
            assert o[side][0] == t[side][0], (k, side, "input ids")
            assert o[side][1] == t[side][1], (k, side, "trained tokens")


def test_eval_loss_and_rewards_equal_trl(run, trl_eval):
    _, theirs = trl_eval
    scored = [json.loads(ln) for ln in (run["out"] / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln]
    assert len(scored) == 1 and scored[0]["step"] == 4 and scored[0]["eval_pairs"] == EVAL_PAIRS, scored
    ours = scored[0]
    assert abs(ours["eval_rewards/margins"]) > 0.1 and abs(ours["eval_loss"] - 0.6931) > 0.01  # trained, not ln 2
    for key in METRICS:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, ours[key], theirs[key])
    assert ours["eval_rewards/accuracies"] == theirs["eval_rewards/accuracies"]


@pytest.mark.real
def test_chatml_trl_also_scores_the_newline_after_im_end(real_checkpoint, tmp_path):
    """SmolLM2's ChatML closes an assistant turn with "<|im_end|>\\n". Same input ids; TRL's completion is llama-ft's
    trained tokens plus that last "\\n" (module doc), in every pair of both sides, and no other difference."""
    from peft import LoraConfig

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    tok = load_tokenizer(str(real_checkpoint))
    examples, _ = prepare_examples(DataOptions(dataset=str(data), dataset_format="chat", objective="dpo"), tok,
                                   cache_dir=tmp_path / "cache")
    trainer = trl_trainer(real_checkpoint, _pairs(), tmp_path / "trl", LoraConfig(r=2, target_modules=["q_proj"]))
    im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    for k, (o, t) in enumerate(zip(ours_sides(examples), trl_sides(trainer, "train"), strict=True)):
        for side in ("chosen", "rejected"):
            (ids, ours_mask), (trl_ids, trl_mask) = o[side], t[side]
            assert ids == trl_ids and ids[-2:] == [im_end, newline[0]], (k, side)
            assert ours_mask[:-1] == trl_mask[:-1] and ours_mask[-2:] == [1, 0] and trl_mask[-1] == 1, (k, side)

