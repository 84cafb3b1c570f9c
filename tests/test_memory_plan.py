"""`--offload_ratio auto`: the recipe takes the planner's smallest ratio that fits the machine, and refuses
in one line, naming the term, a run that fits at no ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from llama_ft.config import TrainConfig
from llama_ft.errors import UserError
from llama_ft.plan import plan_training
from llama_ft.train.memory_plan import resolve_offload_ratio

REPO = Path(__file__).resolve().parents[1]
LLAMA_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)
DS = json.loads((REPO / "ds_configs" / "zero3.json").read_text())


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model_name_or_path="x", quantize=True, max_seq_len=2048, lora_r=16, **kw)


def _machine(gpu_gib: float) -> dict:
    return {"nodes": 1, "gpus_per_node": 1, "gpu_memory_bytes": int(gpu_gib * 2**30),
            "host_memory_bytes": 512 * 2**30, "device": "cuda"}


def test_fixed_ratios_pass_through_and_no_offload_is_none():
    assert resolve_offload_ratio(_cfg(), DS, LLAMA_8B, 1) is None
    assert resolve_offload_ratio(_cfg(offload=True), DS, LLAMA_8B, 1) == 1.0
    assert resolve_offload_ratio(_cfg(offload=True, offload_ratio=0.25), DS, LLAMA_8B, 1) == 0.25


def test_auto_takes_the_smallest_ratio_that_fits():
    cfg = _cfg(offload=True, offload_ratio=0.0)
    none = plan_training(cfg, DS, LLAMA_8B, **_machine(1000))["per_gpu"]["total_bytes"]
    cfg.offload_ratio = 1.0
    full = plan_training(cfg, DS, LLAMA_8B, **_machine(1000))["per_gpu"]["total_bytes"]
    assert full < none
    gpu_gib = (none + full) / 2 / 2**30  # fits with about half the base on the host, not without offload
    cfg.offload_ratio = "auto"
    ratio = resolve_offload_ratio(cfg, DS, LLAMA_8B, 1, machine=_machine(gpu_gib))
    assert 0 < ratio < 1
    for r, fits in ((ratio, True), (ratio - 0.05, False)):
        cfg.offload_ratio = r
        assert plan_training(cfg, DS, LLAMA_8B, **_machine(gpu_gib))["fits"] is fits


def test_auto_refuses_what_fits_at_no_ratio():
    cfg = _cfg(offload=True, offload_ratio="auto")
    with pytest.raises(UserError, match=r"--offload_ratio auto: this run does not fit at any offload ratio: per gpu "
                                        r"needs .* GiB of 4\.0 GiB .* the largest term is \w+"):
        resolve_offload_ratio(cfg, DS, LLAMA_8B, 1, machine=_machine(4))


def test_the_recipe_plans_bits_4_as_nf4():
    """`--bits 4` as training parses it (it implies --quantize) reaches the plan the recipe makes: the frozen
    base of every target is 0.5625 bytes a weight (codes + fp32 absmax per 64), the rest bf16; by hand for 8B."""
    from llama_ft.config import parse_train_args

    cfg = parse_train_args(["--model_name_or_path", "x", "--output_dir", "o", "--bits", "4", "--max_seq_len", "2048",
                            "--lora_r", "16"])
    assert cfg.quantize and cfg.bits == 4
    h, i, layers, v, kv = 4096, 14336, 32, 128256, 8 * 128
    weights = layers * (2 * h * h + 2 * kv * h + 3 * i * h)
    rest = 2 * (2 * v * h + (2 * layers + 1) * h)  # embeddings, head, norms in bf16
    p = plan_training(cfg, DS, LLAMA_8B, **_machine(1000))
    assert p["inputs"]["training"]["bits"] == 4
    assert p["per_gpu"]["base_partitions_bytes"] == weights * 9 // 16 + rest
