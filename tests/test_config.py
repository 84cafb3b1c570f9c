"""Option validation, DeepSpeed "auto" filling and the deterministic micro-batch stream."""

from __future__ import annotations

import json

import pytest

from llama_ft.config import TrainConfig, fill_ds_config, load_ds_config, parse_train_args
from llama_ft.data import MicroBatches
from llama_ft.errors import UserError


def _args(tmp_path, *extra):
    return ["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out"), *extra]


def test_flags_parse_like_snowflake(tmp_path):
    cfg = parse_train_args(_args(tmp_path, "--bf16", "--gradient_checkpointing", "True", "--train_on_source", "false",
                                 "--lora_r", "64", "--lora_alpha", "16", "--lora_target_modules", "q_proj,v_proj",
                                 "--eval_dataset_size", "0.1", "--local_rank=1"))
    assert cfg.bf16 and cfg.gradient_checkpointing and not cfg.train_on_source
    assert cfg.lora_spec.r == 64 and cfg.lora_spec.scaling == 0.25
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.eval_dataset_size == 0.1


@pytest.mark.parametrize("flag,value,needle", [
    ("--lora_r", "0", "--lora_r"),
    # found by benchmarks/fuzz_inputs.py: tracebacks from numpy's 32-bit seed and the tokenizer's 32-bit length
    ("--seed", "99999999999999999999", "--seed"),
    ("--seed", "-1", "--seed"),
    ("--source_max_len", "99999999999999999999", "--source_max_len"),
    ("--lora_r", "-4", "--lora_r"),
    ("--max_steps", "0", "--max_steps"),
    ("--dataset_format", "sharegpt", "--dataset_format"),
    ("--lr_scheduler_type", "wobbly", "--lr_scheduler_type"),
    ("--lora_dropout", "1.5", "--lora_dropout"),
    ("--warmup_ratio", "2", "--warmup_ratio"),
    ("--eval_dataset_size", "2.5", "--eval_dataset_size"),
    ("--resume_from_checkpoint", "/nonexistent/checkpoint-3", "--resume_from_checkpoint"),
    ("--bits", "3", "--bits 3: expected 8 .* or 4"),
    ("--bits", "16", "--bits 16: expected 8 .* or 4"),
    ("--offload_ratio", "0.5", "--offload_ratio 0.5: needs --offload"),
    # schedulers that need settings we do not pass, refused when the flags are parsed
    ("--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_type cosine_with_min_lr: needs settings"),
    ("--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_type warmup_stable_decay: needs settings"),
    ("--lr_scheduler_type", "reduce_lr_on_plateau", "--lr_scheduler_type reduce_lr_on_plateau: needs settings"),
    ("--max_seq_len", "1", "--max_seq_len must be an integer >= 2"),
    ("--chat_template", "/nonexistent/t.jinja", "--chat_template applies to --dataset_format chat"),
])
def test_bad_flags_name_the_flag(tmp_path, flag, value, needle):
    with pytest.raises(UserError, match=needle):
        parse_train_args(_args(tmp_path, flag, value))


def test_bits_4_implies_quantize_and_refuses_fp8_compute(tmp_path):
    assert parse_train_args(_args(tmp_path, "--bits", "4")).quantize is True
    assert parse_train_args(_args(tmp_path, "--bits", "8")).quantize is False  # 8 alone is the unused default
    with pytest.raises(UserError, match="--fp8_compute with --bits 4"):
        parse_train_args(_args(tmp_path, "--bits", "4", "--quantize", "--fp8_compute", "true"))


def test_scheduler_checked_with_the_runs_learning_rate(tmp_path):
    """polynomial decays to lr_end=1e-7: a learning rate below it fails in transformers; refused at parse time."""
    with pytest.raises(UserError, match="--lr_scheduler_type polynomial: needs settings"):
        parse_train_args(_args(tmp_path, "--lr_scheduler_type", "polynomial", "--learning_rate", "1e-8"))
    assert parse_train_args(_args(tmp_path, "--lr_scheduler_type", "polynomial")).lr_scheduler_type == "polynomial"


def test_non_empty_output_dir_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(UserError, match="--output_dir .*not empty"):
        parse_train_args(_args(tmp_path))
    assert parse_train_args(_args(tmp_path, "--overwrite_output_dir")).overwrite_output_dir


def test_fill_ds_config_fills_every_auto():
    ds = load_ds_config("ds_configs/zero3.json")
    cfg = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=3, learning_rate=1e-3,
                      max_grad_norm=0.5, weight_decay=0.1, bf16=True)
    out = fill_ds_config(ds, cfg, world_size=4, hidden_size=64, on_gpu=False)
    assert "auto" not in json.dumps(out)
    assert out["train_batch_size"] == 24 and out["train_micro_batch_size_per_gpu"] == 2
    assert out["gradient_accumulation_steps"] == 3 and out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is True
    assert out["optimizer"]["params"]["lr"] == 1e-3 and out["optimizer"]["params"]["weight_decay"] == 0.1
    assert out["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 640


def test_fill_ds_config_offload_unpins_without_gpu():
    ds = load_ds_config("ds_configs/zero3_offload.json")
    out = fill_ds_config(ds, TrainConfig(), 2, 64, on_gpu=False)
    assert out["zero_optimization"]["offload_param"]["pin_memory"] is False
    assert fill_ds_config(ds, TrainConfig(), 2, 64, on_gpu=True)["zero_optimization"]["offload_param"]["pin_memory"]


def test_ds_config_errors(tmp_path):
    with pytest.raises(UserError, match="--deepspeed .*not found"):
        load_ds_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(UserError, match="not valid JSON"):
        load_ds_config(str(bad))
    with pytest.raises(UserError, match="zero_optimization.stage"):
        fill_ds_config({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, TrainConfig(), 1, 64,
                       False)
    with pytest.raises(UserError, match="'scheduler.params.warmup_max_lr' is \"auto\""):
        fill_ds_config({"zero_optimization": {"stage": 3}, "scheduler": {"params": {"warmup_max_lr": "auto"}}},
                       TrainConfig(), 1, 64, False)
    with pytest.raises(UserError, match="'optimizer.type' is 'SGD'"):
        fill_ds_config({"zero_optimization": {"stage": 3}, "optimizer": {"type": "SGD"}}, TrainConfig(), 1, 64, False)
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu"):
        fill_ds_config({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"},
                        "train_micro_batch_size_per_gpu": 7}, TrainConfig(), 1, 64, False)


def _stream_ids(examples, world, rank, batch, seed, n, epoch=0, index=0):
    s = MicroBatches(examples, world, rank, batch, seed, pad_id=0, epoch=epoch, index=index)
    return [next(s)["input_ids"][:, 0].tolist() for _ in range(n)], s


def test_micro_batches_partition_ranks_and_resume():
    examples = [{"input_ids": [i, 1], "labels": [i, 1]} for i in range(23)]
    per_epoch = 23 // (2 * 3)  # 3 full global batches; 5 examples dropped
    r0, _ = _stream_ids(examples, 2, 0, 3, seed=7, n=per_epoch)
    r1, _ = _stream_ids(examples, 2, 1, 3, seed=7, n=per_epoch)
    seen = [i for b in r0 + r1 for i in b]
    assert len(seen) == len(set(seen)) == 18  # disjoint across ranks and steps within an epoch
    # a stream restarted from (epoch, index) continues exactly
    full, _ = _stream_ids(examples, 2, 0, 3, seed=7, n=7)
    head, s = _stream_ids(examples, 2, 0, 3, seed=7, n=4)
    tail, _ = _stream_ids(examples, 2, 0, 3, seed=7, n=3, epoch=s.epoch, index=s.index)
    assert head + tail == full
    assert full[per_epoch:] != full[:per_epoch][: len(full) - per_epoch]  # a new epoch reshuffles
    with pytest.raises(UserError, match="per_device_train_batch_size"):
        MicroBatches(examples[:5], 2, 0, 3, 0, 0)


@pytest.mark.parametrize("ratio", ["1.5", "-0.1"])
def test_offload_ratio_outside_unit_interval(tmp_path, ratio):
    with pytest.raises(UserError, match=f"--offload_ratio {float(ratio)}: expected a value in \\[0, 1\\]"):
        parse_train_args(_args(tmp_path, "--offload", "--offload_ratio", ratio))
    cfg = parse_train_args(_args(tmp_path, "--offload", "--offload_ratio", "0.75"))
    assert cfg.offload and cfg.offload_ratio == 0.75


@pytest.mark.parametrize("extra, needle", [
    (("--objective", "ppo"), "--objective 'ppo': expected one of sft, dpo"),
    (("--objective", "dpo", "--dpo_beta", "0"), "--dpo_beta 0.0: expected a number > 0"),
    (("--objective", "dpo", "--dpo_loss", "hinge"), "--dpo_loss 'hinge': expected one of sigmoid, ipo"),
    (("--objective", "dpo", "--dpo_loss", "ipo", "--dpo_label_smoothing", "0.1"),
     "--dpo_label_smoothing applies to --dpo_loss sigmoid only"),
    (("--objective", "dpo", "--dpo_label_smoothing", "0.6"),
     r"--dpo_label_smoothing 0.6: expected a value in \[0, 0.5\]"),
    (("--objective", "dpo", "--tiled_mlp", "--lora_dropout", "0"), "--tiled_mlp with --objective dpo: not supported"),
    (("--objective", "dpo", "--sequence_parallel_size", "2"),
     "--sequence_parallel_size > 1 with --objective dpo: not supported"),
    (("--objective", "dpo", "--dataset_format", "chat", "--train_on_source"),
     "--train_on_source with --objective dpo"),
    (("--objective", "dpo", "--dataset_format", "chat", "--dataset", "pairs.parquet"),
     "pairs are read from a local .json or .jsonl file"),
    (("--objective", "sft", "--dpo_shared_prompt", "--packing", "--max_seq_len", "64"),
     r"--dpo_shared_prompt applies to --objective dpo \(this run: sft\)"),
    (("--objective", "dpo", "--dpo_shared_prompt"), "--dpo_shared_prompt lays pairs out in packed rows: it needs "
                                                    "--packing"),
    (("--objective", "dpo", "--dpo_shared_prompt", "--packing", "--max_seq_len", "64", "--attn_implementation",
      "flash_attention_2"), "--dpo_shared_prompt with --attn_implementation flash_attention_2"),
])
def test_dpo_flags_are_checked_in_one_line(tmp_path, extra, needle):
    flags = list(extra) if "--dataset_format" in extra else [*extra, "--dataset_format", "chat"]
    with pytest.raises(UserError, match=needle) as e:
        parse_train_args(_args(tmp_path, *flags))
    assert "\n" not in str(e.value)


def test_dpo_flags_parse(tmp_path):
    cfg = parse_train_args(_args(tmp_path, "--objective", "dpo", "--dataset_format", "chat", "--dpo_beta", "0.3",
                                 "--dpo_label_smoothing", "0.1"))
    assert (cfg.objective, cfg.dpo_beta, cfg.dpo_loss, cfg.dpo_label_smoothing) == ("dpo", 0.3, "sigmoid", 0.1)
    assert parse_train_args(_args(tmp_path / "b")).objective == "sft"
    shared = parse_train_args(_args(tmp_path / "c", "--objective", "dpo", "--dataset_format", "chat", "--packing",
                                    "--max_seq_len", "64", "--dpo_shared_prompt", "--attn_implementation", "eager"))
    assert shared.dpo_shared_prompt and not cfg.dpo_shared_prompt
