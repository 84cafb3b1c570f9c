"""`llama-ft plan`: the arithmetic against hand-computed cases, the search for the smallest offload ratio, the
model the plan assumes against what llama-ft and transformers really build and save, the command line's
errors and exit codes, and run-llama.sh stopping a launch that does not fit. No training runs here (the plan
against measured runs: benchmarks/plan_vs_measured.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_slurm import FINISHED

from llama_ft.plan import command, plan_training
from llama_ft.plan.activations import MicroBatch, layer_saved
from llama_ft.plan.planner import GiB
from llama_ft.plan.shape import ALIASES, LLAMA_LINEAR_NAMES, ModelShape, Param, model_params, shape_from_dir
from llama_ft.plan.zero import (
    ZeroSettings,
    build_trace,
    gathered_at,
    gathers_per_micro_batch,
    modules_in_order,
    pinned,
    simulate_gathered,
)

REPO = Path(__file__).resolve().parents[1]
ALL = list(LLAMA_LINEAR_NAMES)
# hidden 320 (5 heads of 64, 1 kv head), intermediate 832, vocab 1000: no size divides by 3 ranks or by 128
SMALL = ModelShape(hidden_size=320, intermediate_size=832, num_hidden_layers=1, num_attention_heads=5,
                   num_key_value_heads=1, head_dim=64, vocab_size=1000, name="small")


def ceil3(n: int) -> int:
    return -(-n // 3)


def ds(**zero) -> dict:
    """ZeRO-3 config with explicit sizes (no persistence unless asked)."""
    z = {"stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 0,
         "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 10**9,
         "stage3_max_reuse_distance": 10**9}
    z.update(zero)
    return {"zero_optimization": z}


def cfg(**kw) -> SimpleNamespace:
    d = dict(command.TRAINING_DEFAULTS)
    d.update(kw)
    return SimpleNamespace(**d)


def small_plan(world: int = 3, device: str = "cuda", **kw) -> dict:
    zero = kw.pop("zero", {})
    return plan_training(cfg(**kw), ds(**zero), SMALL, 1, world, 80 * GiB, 1000 * GiB, device)


# ---------------------------------------------------------------------------------------------------------------
# partitions, LoRA, optimizer: by hand


def test_bf16_base_partitions_over_3_ranks_with_padding():
    # every frozen tensor in bf16, ceil(n / 3) elements of it on each rank: embed and lm_head (1000 x 320),
    # 3 norms (320), q and o (320 x 320), k and v (64 x 320), gate, up, down (832 x 320)
    expected = 2 * (2 * ceil3(1000 * 320) + 3 * ceil3(320) + 2 * ceil3(320 * 320) + 2 * ceil3(64 * 320)
                    + 3 * ceil3(832 * 320))
    assert expected == 2 * (2 * 106667 + 3 * 107 + 2 * 34134 + 2 * 6827 + 3 * 88747) == 1123636
    p = small_plan(lora_r=8)
    assert p["per_gpu"]["base_partitions_bytes"] == expected
    assert p["per_gpu"]["persistent_bytes"] == 0


def test_fp8_base_partitions_with_block_scales():
    # targets: uint8 weights (1 byte each) + fp32 scales as bytes, ceil(out/128) x ceil(in/128) x 4:
    # q, o (320 x 320): 3 x 3 x 4 = 36;  k, v (64 x 320): 1 x 3 x 4 = 12;  gate, up (832 x 320): 7 x 3 x 4 = 84;
    # down (320 x 832): 3 x 7 x 4 = 84.  Embeddings, head and norms stay bf16.
    weights = 2 * ceil3(320 * 320) + 2 * ceil3(64 * 320) + 3 * ceil3(832 * 320)
    scales = 2 * ceil3(36) + 2 * ceil3(12) + 3 * ceil3(84)
    bf16 = 2 * (2 * ceil3(1000 * 320) + 3 * ceil3(320))
    assert (weights, scales, bf16) == (348163, 116, 427310)
    p = small_plan(lora_r=8, quantize=True)
    assert p["per_gpu"]["base_partitions_bytes"] == weights + scales + bf16 == 775589


def test_nf4_base_partitions_by_hand():
    # --bits 4: per target W (N, K), uint8 weight ceil(N K / 2) (two codes a byte) and uint8 weight_absmax
    # 4 ceil(N K / 64) (an fp32 absmax per 64 weights of the flattened W); each split over 3 ranks.
    # q, o 320 x 320 = 102400 -> 51200 codes, 6400 absmax bytes; k, v 64 x 320 = 20480 -> 10240, 1280;
    # gate, up, down 832 x 320 = 266240 -> 133120, 16640.  Embeddings, head and norms stay bf16.
    linears = [(320, 320)] * 2 + [(64, 320)] * 2 + [(832, 320)] * 3
    codes = sum(ceil3(-(-n * k // 2)) for n, k in linears)
    absmax = sum(ceil3(4 * -(-n * k // 64)) for n, k in linears)
    bf16 = 2 * (2 * ceil3(1000 * 320) + 3 * ceil3(320))
    assert (codes, absmax) == (2 * 17067 + 2 * 3414 + 3 * 44374, 2 * 2134 + 2 * 427 + 3 * 5547)
    for flags in ({"bits": 4}, {"bits": 4, "quantize": True}):  # --bits 4 implies --quantize
        p = small_plan(lora_r=8, **flags)
        assert p["per_gpu"]["base_partitions_bytes"] == codes + absmax + bf16 == 623157
        assert p["inputs"]["training"]["bits"] == 4 and p["inputs"]["training"]["quantize"] is True


def test_nf4_of_a_shape_not_a_multiple_of_64():
    # hidden 99 (3 heads of 33), intermediate 37: N K odd (99 x 99 = 9801) and not a multiple of 64, so the last
    # absmax block is partial and a byte holds the last code alone; over 2 ranks the partitions split blocks
    shape = ModelShape(hidden_size=99, intermediate_size=37, num_hidden_layers=1, num_attention_heads=3,
                       num_key_value_heads=1, head_dim=33, vocab_size=50, name="odd")
    linears = [(99, 99), (33, 99), (33, 99), (99, 99), (37, 99), (37, 99), (99, 37)]
    codes = sum(math.ceil(math.ceil(n * k / 2) / 2) for n, k in linears)
    absmax = sum(math.ceil(4 * math.ceil(n * k / 64) / 2) for n, k in linears)
    bf16 = 2 * (2 * math.ceil(50 * 99 / 2) + 3 * math.ceil(99 / 2))
    p = plan_training(cfg(bits=4, lora_r=4), ds(), shape, 1, 2, 80 * GiB, None)
    assert p["per_gpu"]["base_partitions_bytes"] == codes + absmax + bf16


def test_nf4_storage_is_what_bitsandbytes_makes():
    """bitsandbytes' quantize_4bit (NF4, blocks of 64, plain fp32 absmax: llama-ft's NF4LoRALinear keeps absmax
    in fp32) of each target weight, K a multiple of 64 or not: its packed bytes and absmax bytes are the plan's
    `weight` and `weight_absmax` elements."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    import torch

    shape = ModelShape(hidden_size=99, intermediate_size=37, num_hidden_layers=1, num_attention_heads=3,
                       num_key_value_heads=1, head_dim=33, vocab_size=50)
    planned = {p.name: p for p in model_params(shape, tuple(ALL), 4, True, 2, bits=4)}
    for name, (n, k) in shape.linear_shapes().items():
        block = "self_attn" if name in ALL[:4] else "mlp"
        packed, state = bnb.quantize_4bit(torch.randn(n, k, dtype=torch.bfloat16), blocksize=64, quant_type="nf4",
                                          compress_statistics=False)
        w, a = planned[f"model.layers.0.{block}.{name}.weight"], planned[f"model.layers.0.{block}.{name}.weight_absmax"]
        assert (w.numel, w.itemsize) == (packed.numel(), packed.element_size()), name
        assert (a.numel * a.itemsize) == state.absmax.numel() * state.absmax.element_size(), name
        assert packed.dtype == torch.uint8 and state.absmax.dtype == torch.float32


def test_nf4_frozen_linears_are_0_28125_of_bf16():
    # K and N multiples of 64: (1/2 + 4/64) bytes a weight against 2. World 1, so no padding: the rest of the
    # frozen bytes (bf16 embeddings, head, norms) is the same at both widths and computed here.
    rest = 2 * (2 * 1000 * 320 + 3 * 320)
    bf16 = small_plan(world=1, lora_r=8)["per_gpu"]["base_partitions_bytes"] - rest
    nf4 = small_plan(world=1, lora_r=8, bits=4)["per_gpu"]["base_partitions_bytes"] - rest
    fp8 = small_plan(world=1, lora_r=8, quantize=True)["per_gpu"]["base_partitions_bytes"] - rest
    weights = 2 * 320 * 320 + 2 * 64 * 320 + 3 * 832 * 320
    assert bf16 == 2 * weights and nf4 / bf16 == 0.28125 and nf4 == 0.5625 * weights
    assert fp8 > nf4 / 0.5625  # FP8: a byte a weight and its 128x128 block scales
    for alias in ("8b", "70b", "405b"):
        params = {b: model_params(ALIASES[alias], tuple(ALL), 16, b != 16, 2, bits=b) for b in (4, 16)}
        target = {b: sum(p.nbytes for p in ps if p.kind == "target") for b, ps in params.items()}
        assert target[4] / target[16] == 0.28125, alias


def test_lora_partitions_and_optimizer_states():
    # r = 8: A (8, in) and B (out, 8) per target, ceil(n / 3) each on a rank
    parts = (2 * (ceil3(8 * 320) + ceil3(320 * 8))  # q, o
             + 2 * (ceil3(8 * 320) + ceil3(64 * 8))  # k, v
             + 2 * (ceil3(8 * 320) + ceil3(832 * 8))  # gate, up
             + ceil3(8 * 832) + ceil3(320 * 8))  # down
    assert parts == 14685
    p = small_plan(lora_r=8)
    assert p["per_gpu"]["lora_bytes"] == 2 * parts  # bf16
    # fp32 master 4 + Adam m, v 8 + fp32 gradient 4 (one sub-group) + bf16 gradient partitions 2, per element
    assert p["per_gpu"]["optimizer_bytes"] == 18 * parts
    # fp32 training: the master is the parameter itself; fp32 gradient partitions
    p32 = small_plan(lora_r=8, bf16=False)
    assert p32["per_gpu"]["lora_bytes"] == 4 * parts and p32["per_gpu"]["optimizer_bytes"] == (8 + 4 + 4) * parts
    # offload_optimizer: all of it in host memory, the pinned buffers (gradients) rounded up to powers of two
    off = small_plan(lora_r=8, zero={"offload_optimizer": {"device": "cpu", "pin_memory": True}})
    assert off["per_gpu"]["optimizer_bytes"] == 0
    assert off["per_host"]["optimizer_bytes"] == 3 * (12 * parts + pinned(4 * parts) + pinned(2 * parts))
    assert pinned(4 * parts) == 65536 and pinned(2 * parts) == 32768


def test_persistent_parameters_are_whole_on_every_rank():
    # threshold 400: the norms (320) and the k/v LoRA B (64 x 8 = 512 > 400: no) -> 3 norms whole, in bf16
    p = small_plan(lora_r=8, zero={"stage3_param_persistence_threshold": 400})
    assert p["per_gpu"]["persistent_bytes"] == 3 * 320 * 2


def test_405b_fp8_on_one_8_gpu_node():
    # per layer: q, o 16384 x 16384; k, v 1024 x 16384; gate, up, down 53248 x 16384 (1 byte each, / 8 ranks);
    # scales: q, o 128 x 128 x 4; k, v 8 x 128 x 4; gate, up, down 416 x 128 x 4 (/ 8)
    layer = (2 * 16384 * 16384 + 2 * 1024 * 16384 + 3 * 53248 * 16384) // 8 \
        + (2 * 128 * 128 * 4 + 2 * 8 * 128 * 4 + 3 * 416 * 128 * 4) // 8
    norms = (2 * 126 + 1) * 16384 * 2 // 8
    embed_and_head = 2 * 128256 * 16384 * 2 // 8
    expected = 126 * layer + norms + embed_and_head
    assert expected == 51_269_785_600  # about 405e9 / 8 bytes + 1.05 GB of bf16 embeddings and head
    p = plan_training(cfg(quantize=True, gradient_checkpointing=True), json.loads((REPO / "ds_configs/zero3.json")
                      .read_text()), ALIASES["405b"], 1, 8, int(79.6 * GiB), None)
    assert p["per_gpu"]["base_partitions_bytes"] == expected
    assert p["inputs"]["model"]["parameters"] == 405_853_388_800


# ---------------------------------------------------------------------------------------------------------------
# the gathered working set and the PCIe crossings, on a hand-made trace


def _toy_modules(z: ZeroSettings):
    params = [Param("model.embed_tokens.weight", "model.embed_tokens", 10, 1, "frozen")]
    params += [Param(f"model.layers.{i}.mlp.down_proj.weight", f"model.layers.{i}.mlp.down_proj", 100, 1, "target")
               for i in range(3)]
    params.append(Param("model.norm.weight", "model.norm", 1, 2, "frozen"))
    return modules_in_order(params, z)


def test_trace_keeps_what_is_reused_within_the_reuse_distance():
    z = ZeroSettings(prefetch_bucket_size=0, param_persistence_threshold=0, max_reuse_distance=250)
    mods = _toy_modules(z)
    # forward E L0 L1 L2 N, backward N L2 L1 L0. Between a layer's forward and backward use: L2 -> N, N (2
    # elements: kept); L1 -> L2, N, N, L2 (202: kept); L0 -> 402 elements (released, gathered again)
    trace = build_trace(mods, 3, checkpointing=False)
    short = {"model.embed_tokens": "E", "model.norm": "N", **{f"model.layers.{i}.mlp.down_proj": f"L{i}"
                                                               for i in range(3)}}
    assert [short[mods[i].name] for i in trace.order] == ["E", "L0", "L1", "L2", "N", "N", "L2", "L1", "L0"]
    gathers = {mods[i].name: n for i, n in gathers_per_micro_batch(trace, z).items()}
    assert [gathers[f"model.layers.{i}.mlp.down_proj"] for i in range(3)] == [2, 1, 1]
    # at the loss: the norm (2 bytes) and the kept L1, L2 (100 bytes each)
    assert gathered_at(trace, trace.forward_end, z) == (202, 201)
    # prefetch 100 elements: L0, the next one not gathered in the backward order
    z2 = ZeroSettings(prefetch_bucket_size=100, param_persistence_threshold=0, max_reuse_distance=250)
    assert gathered_at(build_trace(_toy_modules(z2), 3, False), 4, z2) == (302, 301)
    # checkpointing: L2's forward gather lasts into its recompute (2 apart), L1's does not (L2, N, N, L2, L2 = 302);
    # each recompute gather serves its backward (0 apart)
    ckpt = build_trace(mods, 3, checkpointing=True)
    gathers = {mods[i].name: n for i, n in gathers_per_micro_batch(ckpt, z).items()}
    assert [gathers[f"model.layers.{i}.mlp.down_proj"] for i in range(3)] == [2, 2, 1]
    none_kept = ZeroSettings(param_persistence_threshold=0, max_reuse_distance=0)
    gathers = {mods[i].name: n for i, n in gathers_per_micro_batch(ckpt, none_kept).items()}
    assert [gathers[f"model.layers.{i}.mlp.down_proj"] for i in range(3)] == [3, 3, 3]


def test_coordinator_prefetch_runs_ahead_and_keeps_what_it_passed():
    # DeepSpeed's coordinator with a complete trace, by hand. E(10) L0 L1 L2(100 each) N(1 element, 2 bytes),
    # forward E L0 L1 L2 N, backward N L2 L1 L0; calls E - L0 - L1 - L2 - N - N - L2 - L1 - L0 - (one call without
    # parameters after each use, numbered 0..17). No reuse distance, prefetch bucket 1 element (each call
    # prefetches the next parameter not gathered), at most 250 elements live.
    #   c0 E: gather E, prefetch L0 (110 bytes live); release E.   c1: prefetch L1.   c2 L0: prefetch L2 (300);
    #   release L0.   c3: prefetch N (201 elements).   c4 L1: 49 elements of room: the queue's N(10), L2(12),
    #   L1(14) are gathered already, popped for free and marked with those steps; L0(16) is gathered (302 bytes).
    #   Release L1? Its most recent fetch step, 14, lies ahead: kept. c6 L2: kept likewise (12 > 8). c8 N: its
    #   step 10 <= 10: released, gathered again at c10. Then the backward releases L2, L1, L0 after their use.
    z = ZeroSettings(prefetch_bucket_size=1, param_persistence_threshold=0, max_live_parameters=250,
                     max_reuse_distance=0)
    trace = build_trace(_toy_modules(z), 3, checkpointing=False)
    assert simulate_gathered(trace, z) == [110, 300, 302, 302, 302, 302, 300, 200, 100]
    # the static rule kept nothing at the loss with no reuse distance; the coordinator holds L0-L2 there
    assert gathered_at(trace, trace.forward_end, z)[0] == 2 + 100
    # no prefetch (bucket 0): only the reuse distance keeps anything, as in the static rule
    z0 = ZeroSettings(prefetch_bucket_size=0, param_persistence_threshold=0, max_reuse_distance=250)
    t0 = build_trace(_toy_modules(z0), 3, checkpointing=False)
    assert simulate_gathered(t0, z0)[t0.forward_end] == gathered_at(t0, t0.forward_end, z0)[0] == 202


def test_h2d_bytes_and_step_time():
    # one rank, everything offloaded, nothing kept between uses: each target partition crosses in forward and
    # backward, and a third time with checkpointing; FP8 bytes + scales (above), 4 micro-batches per step
    fp8 = (2 * 320 * 320 + 2 * 64 * 320 + 3 * 832 * 320) + (2 * 36 + 2 * 12 + 3 * 84)
    zero = {"stage3_max_reuse_distance": 0}
    for ckpt, crossings in ((False, 2), (True, 3)):
        p = small_plan(world=1, quantize=True, offload_ratio=1.0, gradient_checkpointing=ckpt,
                       gradient_accumulation_steps=4, zero=zero)
        assert p["h2d_bytes_per_micro_batch"] == crossings * fp8
        assert p["h2d_bytes_per_step"] == 4 * crossings * fp8
        assert p["step_time_lower_bound_s"] == pytest.approx(4 * crossings * fp8 / 25e9)
    # the offloaded partitions are pinned host memory: each rounded up to a power of two, per rank
    host = (2 * pinned(320 * 320) + 2 * pinned(64 * 320) + 3 * pinned(832 * 320)
            + 2 * pinned(36) + 2 * pinned(12) + 3 * pinned(84))
    assert host == 2 * 131072 + 2 * 32768 + 3 * 524288 + 2 * 64 + 2 * 16 + 3 * 128
    assert p["per_host"]["base_partitions_bytes"] == host
    assert p["offloaded_bytes_per_gpu"] == fp8
    assert small_plan(world=1, quantize=True, offload_ratio=0.0)["h2d_bytes_per_step"] == 0
    # with a prefetch bucket, the coordinator's prefetch runs ahead (within max_live_parameters: the whole
    # one-layer model) and passes over every backward use while the parameter is held: one crossing each
    p = small_plan(world=1, quantize=True, offload_ratio=1.0, gradient_accumulation_steps=4,
                   zero={"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 10**6})
    assert p["h2d_bytes_per_micro_batch"] == fp8


# ---------------------------------------------------------------------------------------------------------------
# offload: monotone, and the smallest ratio that fits


def _70b_one_gpu(ratio, gpu_gb: float = 79.6) -> dict:
    c = cfg(quantize=True, gradient_checkpointing=True, max_seq_len=2048, offload=True, offload_ratio=ratio)
    return plan_training(c, json.loads((REPO / "ds_configs/zero3.json").read_text()), ALIASES["70b"], 1, 1,
                         int(gpu_gb * GiB), 1000 * GiB)


def test_more_offload_means_less_gpu_and_more_host_memory():
    plans = [_70b_one_gpu(k / 10) for k in range(11)]
    gpu = [p["per_gpu"]["total_bytes"] for p in plans]
    host = [p["per_host"]["total_bytes"] for p in plans]
    h2d = [p["h2d_bytes_per_step"] for p in plans]
    assert all(gpu[k] > gpu[k + 1] and host[k] < host[k + 1] and h2d[k] < h2d[k + 1] for k in range(10))
    assert gpu[0] - gpu[10] == pytest.approx(plans[10]["offloaded_bytes_per_gpu"], rel=1e-9)


def test_min_offload_ratio_is_the_smallest_that_fits():
    auto = _70b_one_gpu("auto")
    best = auto["min_offload_ratio"]
    assert 0 < best < 1 and auto["offload_ratio"] == best and auto["fits"]
    assert _70b_one_gpu(best)["fits"]
    assert not _70b_one_gpu(round(best - 0.01, 2))["fits"]
    assert _70b_one_gpu(0.0)["min_offload_ratio"] == best  # the same answer whatever ratio is evaluated
    # a GPU too small for anything: no ratio, and the term that is too large named
    tiny_gpu = _70b_one_gpu("auto", gpu_gb=10)
    assert tiny_gpu["min_offload_ratio"] is None and not tiny_gpu["fits"]
    assert tiny_gpu["cannot_fit"]["where"] == "per_gpu"
    assert tiny_gpu["cannot_fit"]["term"] == "optimizer_bytes"  # 828M LoRA parameters x 18 bytes on one GPU


# ---------------------------------------------------------------------------------------------------------------
# what the plan assumes against what the code base does


def test_auto_values_and_training_defaults_match_config_py():
    from llama_ft.config import TrainConfig, fill_ds_config, load_ds_config
    from llama_ft.plan.zero import zero3_auto_values

    filled = fill_ds_config(load_ds_config("ds_configs/zero3.json"), TrainConfig(model_name_or_path="m"), 8, 4096,
                            on_gpu=True)["zero_optimization"]
    assert {k: filled[k] for k in zero3_auto_values(4096)} == zero3_auto_values(4096)
    defaults = TrainConfig()
    shared = [k for k in command.TRAINING_DEFAULTS if hasattr(defaults, k)]
    assert len(shared) == len(command.TRAINING_DEFAULTS)
    for k in shared:
        assert command.TRAINING_DEFAULTS[k] == getattr(defaults, k), k


def test_api_as_the_recipe_calls_it_equals_the_command(capsys, tiny_model_dir):
    """plan_training(TrainConfig, the filled DeepSpeed config, transformers' LlamaConfig, ...) gives the object
    `llama-ft plan --json` prints for the same flags."""
    from transformers import AutoConfig

    from llama_ft.config import fill_ds_config, load_ds_config, parse_train_args

    flags = ["--model_name_or_path", str(tiny_model_dir), "--lora_r", "8", "--packing", "--max_seq_len", "128",
             "--per_device_train_batch_size", "3", "--gradient_checkpointing", "--quantize", "--offload",
             "--offload_ratio", "0.5", "--output_dir", str(Path(tiny_model_dir).parent / "unused-out")]
    train_cfg = parse_train_args(flags)
    ds_config = fill_ds_config(load_ds_config(train_cfg.deepspeed), train_cfg, 4, 64, on_gpu=True)
    api = plan_training(train_cfg, ds_config, AutoConfig.from_pretrained(tiny_model_dir), 2, 2, 8 * GiB, 64 * GiB)
    rc, out, _ = _main(capsys, "--nodes", "2", "--gpus_per_node", "2", "--gpu_memory_gb", "8", "--host_memory_gb",
                       "64", "--json", "--", *flags)
    cli = json.loads(out)
    assert rc == 0 and api["offload_ratio"] == 0.5
    for key in ("per_gpu", "per_host", "moments", "fits", "min_offload_ratio", "h2d_bytes_per_step"):
        assert api[key] == cli[key], key


def test_config_json_is_read_as_autoconfig_reads_it(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from llama_ft.plan.shape import shape_from_config

    minimal = tmp_path / "minimal"
    minimal.mkdir()
    (minimal / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256,
                                                     "num_attention_heads": 8, "num_hidden_layers": 3}))
    for d in (Path(tiny_model_dir), minimal):
        ours = shape_from_dir(d)
        theirs = shape_from_config(AutoConfig.from_pretrained(d, trust_remote_code=False))
        fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings")
        assert [getattr(ours, f) for f in fields] == [getattr(theirs, f) for f in fields], d


@pytest.mark.parametrize("bits,hidden,inter,heads", [(16, 320, 832, 5), (8, 320, 832, 5), (4, 320, 832, 5),
                                                     (4, 102, 37, 3)])
def test_parameters_are_those_llama_ft_builds(bits, hidden, inter, heads):
    """The plan's parameter list against a llama-ft build on the meta device: names, elements, element sizes and
    which train; at 4 bits also a shape whose N K are not multiples of 64 (blocks span rows)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_ft.lora import LoraSpec, inject_lora
    from llama_ft.plan.shape import named_parameters

    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=False)
    spec = LoraSpec(8, 16, 0.05, ("q_proj", "v_proj", "down_proj"))
    make = None
    if bits != 16:
        from llama_ft.fp8 import FP8LoRALinear
        from llama_ft.nf4.module import NF4LoRALinear

        layer = NF4LoRALinear if bits == 4 else FP8LoRALinear

        def make(lin, s):
            return layer.empty(lin.in_features, lin.out_features, s, torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        inject_lora(model, spec, make)
    built = {n: (p.numel(), p.element_size(), p.requires_grad) for n, p in model.named_parameters()}
    shape = ModelShape(hidden, inter, 2, heads, 1, hidden // heads, 1000)
    assert named_parameters(model_params(shape, spec.target_modules, 8, bits != 16, 2, bits=bits)) == built


@pytest.mark.parametrize("rows,dropout,mask,attn,dtype,tiles", [
    (2, 0.05, True, "sdpa", "bf16", 1), (2, 0.0, True, "sdpa", "bf16", 1), (1, 0.05, False, "sdpa", "bf16", 1),
    (1, 0.0, False, "sdpa", "bf16", 1), (2, 0.05, True, "eager", "bf16", 1), (2, 0.05, True, "sdpa", "fp32", 1),
    (1, 0.0, False, "sdpa", "bf16", 3)])
def test_activation_formula_is_what_autograd_saves(rows, dropout, mask, attn, dtype, tiles):
    """One Llama decoder layer with LoRA on all seven linears, forward on CPU: the bytes of every tensor
    autograd saves (parameters and the shared RoPE tables and mask aside) equal the plan's per-layer figure;
    also with the MLP tiled (--tiled_mlp: DeepSpeed's TiledMLP keeps only the MLP's input)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from llama_ft.lora import LoraSpec, inject_lora

    tdtype, seq = (torch.bfloat16 if dtype == "bf16" else torch.float32), 96
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=1000)
    config._attn_implementation = attn
    layer = LlamaDecoderLayer(config, 0).to(tdtype)
    inject_lora(layer, LoraSpec(16, 32, dropout))
    if tiles > 1:
        from llama_ft.train.activation_memory import tile_mlp

        tile_mlp(layer.mlp, tiles)
    layer.train()
    x = torch.randn(rows, seq, 256, dtype=tdtype, requires_grad=True)
    positions = torch.arange(seq)[None].expand(rows, seq)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    attn_mask = None
    if mask:
        attn_mask = torch.ones(rows, 1, seq, seq, dtype=torch.bool).tril()
        if attn == "eager":
            attn_mask = torch.zeros(rows, 1, seq, seq, dtype=tdtype).masked_fill(~attn_mask, -1e4)
    skip = {p.data_ptr() for p in layer.parameters()} | {cos.data_ptr(), sin.data_ptr()}
    skip |= {attn_mask.data_ptr()} if attn_mask is not None else set()
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in skip:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=attn_mask, position_embeddings=(cos, sin), position_ids=positions)
    # a mask is what the plan assumes for packed rows (and padded batches of > 1 row)
    mb = MicroBatch(rows, seq, tdtype.itemsize, 16, tuple(ALL), dropout, packing=mask, attn_implementation=attn,
                    device="cpu", mlp_tiles=tiles)
    assert sum(saved.values()) == sum(layer_saved(ModelShape(256, 768, 1, 8, 2, 32, 1000), mb).values())


class LiveBytes:
    """Bytes of tensor storage alive while a block runs, and their peak: every aten op's output storage is counted
    from the op until the last tensor viewing it dies (a TorchDispatchMode sees every op, decomposed ops included;
    views and in-place ops add nothing). Storages that exist before (parameters, inputs) are `skip`ped."""

    def __init__(self, skip: set[int]) -> None:
        self.skip, self.live, self.now, self.peak = skip, {}, 0, 0

    def _dead(self, key: int, group: list) -> None:
        group[1] -= 1
        if group[1] == 0 and self.live.get(key) is group:
            del self.live[key]
            self.now -= group[0]

    def __enter__(self):
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, tuple | list) else (out,):
                    if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in tracker.skip:
                        continue
                    key = t.untyped_storage().data_ptr()
                    if key not in tracker.live:
                        tracker.live[key] = [t.untyped_storage().nbytes(), 0]
                        tracker.now += tracker.live[key][0]
                        tracker.peak = max(tracker.peak, tracker.now)
                    group = tracker.live[key]
                    group[1] += 1
                    weakref.finalize(t, tracker._dead, key, group)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("kv_heads,inter,attn,dtype,layers,vocab,chunk,packed,peak_at", [
    (2, 768, "sdpa", "bf16", 2, 1000, 64, False, "MLP"),  # GQA: k and v repeated (a padded batch has a mask)
    (2, 768, "sdpa", "bf16", 1, 1000, 64, False, "MLP"),  # one layer: its input is the embeddings' output
    (2, 64, "sdpa", "bf16", 2, 1000, 64, False, "attention core"),
    (2, 64, "sdpa", "bf16", 2, 1000, 64, True, "attention core"),  # packed pairs: the mask from position_ids
    (8, 64, "sdpa", "bf16", 2, 1000, 64, False, "k's RoPE"),  # no GQA: nothing repeated
    (8, 64, "sdpa", "fp32", 2, 1000, 64, False, "k's RoPE"),
    (2, 64, "eager", "bf16", 2, 1000, 64, False, "attention core"),
    (2, 64, "sdpa", "bf16", 2, 32000, 64, False, "loss"),  # a large vocabulary: the head's chunk logits
])
def test_dpo_reference_pass_working_set_is_measured(kv_heads, inter, attn, dtype, layers, vocab, chunk, packed,
                                                    peak_at):
    """The DPO reference pass as train/objectives.py runs it (no_grad, lora_disabled, the model's forward to the
    hidden states, then sequence_logprobs), on CPU for 2 pairs = 4 right-padded rows (packed: 4 pairs in 2 rows,
    data/collate.collate_packed_pairs, as DPO._sequences feeds them): the peak of the tensor bytes alive (LiveBytes:
    parameters and inputs aside) is the plan's reference forward + RoPE tables and mask, or at the loss the plan's
    final hidden states + trained rows + chunk logits (the head itself is a parameter here, not a ZeRO-3 gather).
    The plan counts every position trained (N = M); the run trains N < M (the padding and each row's last
    position), and its loss also holds per-token vectors (nll, segments) the plan leaves out: 12 N bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_ft.data.collate import collate_packed_pairs
    from llama_ft.lora import LoraSpec, inject_lora, lora_disabled
    from llama_ft.plan.activations import reference_forward, reference_loss, shared_inputs
    from llama_ft.train.loss import batch_targets, loss_targets, sequence_logprobs, use_chunked_loss

    tdtype, seq, rows, h = (torch.bfloat16 if dtype == "bf16" else torch.float32), 96, 4, 256
    if peak_at == "loss":
        seq = 32
    config = LlamaConfig(hidden_size=h, intermediate_size=inter, num_attention_heads=8, num_key_value_heads=kv_heads,
                         num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=False,
                         attn_implementation=attn)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(tdtype)
    inject_lora(model, LoraSpec(16, 32, 0.05))
    head = use_chunked_loss(model)
    model.train()
    if packed:  # 4 pairs, sides of 48 tokens (prompt 40 + response 8): 2 rows of 192, position_ids restarting
        side = {"input_ids": [1] * 48, "labels": [-100] * 40 + [2] * 8}
        pair = {f"{s}_{k}": v for s in ("chosen", "rejected") for k, v in side.items()}
        batch = collate_packed_pairs([[pair, pair], [pair, pair]], 0)
        rows, seq = batch["input_ids"].shape
        ids, position_ids, mask = batch["input_ids"], batch["position_ids"], None  # no mask: from position_ids
        positions, targets = batch_targets(batch)
        segments, sequences = batch["sequence_ids"].reshape(-1)[positions], 8
    else:
        ids = torch.randint(0, vocab, (rows, seq))
        mask = torch.ones(rows, seq, dtype=torch.int64)
        mask[-1, seq // 2:] = 0  # right padding: transformers builds the 4-D mask
        positions, targets = loss_targets(ids.masked_fill(mask == 0, -100))
        # position_ids per row, as the plan's RoPE tables assume (without them transformers builds one row's, shared)
        position_ids = torch.arange(seq).expand(rows, seq).contiguous()
        segments, sequences = None, None
    given = [t for t in (ids, mask, positions, targets, position_ids, segments) if t is not None]
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *given)}
    with torch.no_grad(), lora_disabled(model), LiveBytes(skip) as live:
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        sequence_logprobs(hidden, head, positions, targets, chunk, segments, sequences)
        del hidden
    shape = ModelShape(h, inter, layers, 8, kv_heads, 32, vocab)
    mb = MicroBatch(rows, seq, tdtype.itemsize, 16, tuple(ALL), 0.05, packing=packed, attn_implementation=attn,
                    device="cpu")
    forward = shared_inputs(shape, mb) + reference_forward(shape, mb)
    loss = reference_loss(shape, mb, chunk)
    b, n = tdtype.itemsize, len(positions)
    at_loss = loss["final hidden states"] + loss["trained rows"] - b * (rows * seq - n) * h + loss["chunk logits"]
    if peak_at == "loss":
        # the per-token vectors the plan leaves out: nll (fp32) and each position's sequence index (int64)
        assert at_loss > forward and 0 <= live.peak - at_loss <= (4 + 8) * n + 64, (live.peak, at_loss, forward)
    else:
        assert forward > at_loss and live.peak == forward, (live.peak, forward, at_loss)


def _reference_by_hand(rows: int, seq: int, chunk: int) -> int:
    """The DPO reference pass's largest transient (activations + loss, gathering aside) on SMALL (hidden 320, 5 heads
    of 64, 1 KV head, intermediate 832, vocab 1000, one layer) for `rows` rows of `seq` tokens in bf16 with a mask
    (padded rows > 1, or packed rows), k and v repeated to the 5 heads: activations.py's "DPO" terms written out."""
    b, h, q, kv, inter, vocab = 2, 320, 320, 64, 832, 1000
    m = rows * seq
    rope_tables_and_mask = 2 * b * m * 64 + rows * seq * seq
    layer_input = b * m * h  # one layer: its input is the embeddings' output, one tensor
    attention = b * m * h + max(b * m * (4 * q + 2 * kv), b * m * (2 * q + 5 * kv),
                                b * m * (2 * q + 2 * kv) + 2 * b * m * q + 4 * rows * 5 * seq + b * rows * seq * seq)
    mlp = 2 * b * m * h + 3 * b * m * inter
    forward = rope_tables_and_mask + layer_input + max(attention, mlp)
    at_loss = b * m * h + b * vocab * h + b * m * h + min(chunk, m) * vocab * (b + 4)
    return max(forward, at_loss)


@pytest.mark.parametrize("packing,precompute", [(False, False), (True, False), (False, True), (True, True)])
def test_dpo_plan_is_sft_on_the_same_rows_plus_the_reference_pass(capsys, packing, precompute):
    """--objective dpo: the same weights; the policy's moments those of SFT on the same rows (P pairs: 2P padded rows
    of --max_seq_len; --packing: P rows of whole pairs, 2 x --max_seq_len); and a reference-pass moment computed here
    by hand: on those rows, or with --precompute_ref_logprobs on the pass before training's padded batches of P pairs
    (2P rows of --max_seq_len), a forward alone. In the step the reference forward gathers every offloaded partition
    once more (PCIe); precomputed, the step is SFT's, gathers and all."""
    pairs, seq, chunk = 3, 200, 512
    dpo_flags = dict(max_seq_len=seq, dataset_format="chat", loss_chunk_size=chunk, packing=packing,
                     per_device_train_batch_size=pairs, objective="dpo", precompute_ref_logprobs=precompute)
    rows, row_len = (pairs, 2 * seq) if packing else (2 * pairs, seq)
    sft_flags = dict(max_seq_len=row_len, dataset_format="chat", loss_chunk_size=chunk, packing=packing,
                     per_device_train_batch_size=rows)
    dpo, sft = small_plan(**dpo_flags), small_plan(**sft_flags)
    for key in ("base_partitions_bytes", "persistent_bytes", "lora_bytes", "optimizer_bytes", "comm_bytes"):
        assert dpo["per_gpu"][key] == sft["per_gpu"][key], key
    same = ("activations", "loss", "gathered") if precompute else ("activations", "loss")
    for moment in ("loss", "backward", "optimizer step"):
        for term in same:
            assert dpo["moments"][moment].get(term) == sft["moments"][moment].get(term), (moment, term)
    assert "reference pass" not in sft["moments"]
    t = dpo["inputs"]["training"]
    assert (t["rows_per_micro_batch"], t["seq_len"], t["objective"]) == (rows, row_len, "dpo")
    ref_rows, ref_len = (2 * pairs, seq) if precompute else (rows, row_len)
    assert t["reference_pass"] == {"before_training": precompute, "rows": ref_rows, "seq_len": ref_len}
    ref = dpo["moments"]["reference pass"]
    assert ref["activations"] + ref.get("loss", 0) == _reference_by_hand(ref_rows, ref_len, chunk)
    total = {k: sum(v.values()) for k, v in dpo["moments"].items()}
    assert dpo["peak_at"] == max(total, key=total.get)  # the peak is the largest moment, the reference pass one
    # PCIe: nothing is kept gathered between uses (reuse distance 0, no prefetch), so each use gathers again
    off = dict(offload=True, offload_ratio=1.0, zero={"stage3_max_reuse_distance": 0})
    dpo_off, sft_off = small_plan(**dpo_flags, **off), small_plan(**sft_flags, **off)
    assert dpo_off["offloaded_bytes_per_gpu"] > 0
    assert sft_off["h2d_bytes_per_micro_batch"] == 2 * sft_off["offloaded_bytes_per_gpu"]  # forward, backward
    uses = 2 if precompute else 3  # + the reference forward
    assert dpo_off["h2d_bytes_per_micro_batch"] == uses * dpo_off["offloaded_bytes_per_gpu"]


def test_dpo_plan_report(capsys):
    rc, out, _ = _main(capsys, "8b", "--gpu_memory_gb", "79.6", "--objective", "dpo", "--max_seq_len", "4096",
                       "--per_device_train_batch_size", "2", "--gradient_checkpointing")
    assert rc == 0 and "micro-batch 2 pairs = 4 rows x 4096 tokens" in out
    assert "DPO reference pass (adapters off, no grad, first in each micro-batch, on the same 4 rows x 4096 tokens): " \
        in out
    rc, out, _ = _main(capsys, "8b", "--gpu_memory_gb", "79.6", "--", "--objective", "dpo", "--max_seq_len", "4096",
                       "--per_device_train_batch_size", "2", "--packing", "--precompute_ref_logprobs", "--dpo_beta",
                       "1", "--gradient_checkpointing")
    assert rc == 0 and "micro-batch 2 x 8192 tokens (packed rows of whole pairs, 2 x --max_seq_len 4096)" in out
    assert ("DPO reference pass (adapters off, no grad, once before training (--precompute_ref_logprobs), on padded "
            "batches of 4 rows x 4096 tokens): ") in out


def test_sequence_parallel_tiles_and_activation_offload_by_hand(capsys):
    """SP over 4 ranks: a rank holds 250 of 1000 tokens, and the attention core runs on all 1000 with 2 of the
    8 query heads and 1 KV head (2 KV heads / 4: replicated). Then 8B at 128k tokens on 8 GPUs."""
    from llama_ft.plan.activations import attention_saved, layer_backward_transient

    shape = ModelShape(256, 768, 1, 8, 2, 32, 1000)
    mb = MicroBatch(1, 1000, 2, 16, tuple(ALL), 0.0, packing=False, sp=4)
    assert mb.tokens == 250 and not mb.has_mask
    assert attention_saved(shape, mb) == 2 * 1000 * (2 * 2 * 32 + 2 * 1 * 32) + 4 * 1 * 2 * 1000
    # backward: dL/dh in and out, the MLP's three gradients, and the all-to-all buffers of the local q, k, v
    assert layer_backward_transient(shape, mb) == 2 * 250 * (2 * 256 + 3 * 768) + 2 * 2 * 250 * (256 + 2 * 64)
    tiled = MicroBatch(1, 1000, 2, 16, tuple(ALL), 0.0, packing=False, sp=4, mlp_tiles=5)
    all_to_all = 2 * 2 * 250 * (256 + 2 * 64)
    assert layer_backward_transient(shape, tiled) == 2 * 250 * (2 * 256) + 6 * 2 * 50 * 768 + all_to_all

    def run(*extra):
        rc, out, _ = _main(capsys, "8b", "--gpu_memory_gb", "79.6", "--json", "--max_seq_len", "131072", "--packing",
                           "--attn_implementation", "flash_attention_2", "--gradient_checkpointing", *extra)
        return rc, json.loads(out)

    rc, one = run()
    assert rc == 1 and one["cannot_fit"]["term"] == "activations_bytes"  # 128k tokens on one 80 GB GPU each
    rc, sp8 = run("--sequence_parallel_size", "8")
    t = sp8["inputs"]["training"]
    assert rc == 0 and t["tokens_per_rank"] == 16384 and t["sequence_parallel_size"] == 8
    assert sp8["per_gpu"]["activations_bytes"] < one["per_gpu"]["activations_bytes"] / 6
    rc, tiled = run("--sequence_parallel_size", "8", "--tiled_mlp", "--lora_dropout", "0")
    assert tiled["inputs"]["training"]["tiled_mlp_slices"] == 4  # 16384 tokens / hidden 4096
    assert tiled["per_gpu"]["activations_bytes"] < sp8["per_gpu"]["activations_bytes"]
    rc, off = run("--sequence_parallel_size", "8", "--tiled_mlp", "--lora_dropout", "0", "--activation_offload")
    # 32 layer inputs of 16384 x 4096 bf16 = 4 GiB per rank, pinned (a power of two already), x 8 ranks
    assert off["per_host"]["activations_bytes"] == 8 * 32 * 16384 * 4096 * 2
    assert off["per_gpu"]["activations_bytes"] < tiled["per_gpu"]["activations_bytes"] - 3.5 * 2**30
    assert off["h2d_bytes_per_micro_batch"] == 32 * 16384 * 4096 * 2  # the checkpoints come back once


# ---------------------------------------------------------------------------------------------------------------
# the command line


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = command.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("llama-ft plan: error: "), lines[0]
    return lines[0]


def test_bad_inputs_are_one_line_and_exit_2(capsys, tmp_path):
    bad_host = tmp_path / "hosts"
    bad_host.write_text("node1 slots=8\nnode2 slots=x\n")
    cases = [
        (["99b", "--gpu_memory_gb", "80"], "MODEL '99b'"),
        (["8b", "--hostfile", str(bad_host), "--gpu_memory_gb", "80"], f"{bad_host}:2: slots=x"),
        (["8b", "--hostfile", str(tmp_path / "nope"), "--gpu_memory_gb", "80"], "file not found"),
        (["8b", "--gpu_memory_gb", "0"], "--gpu_memory_gb 0"),
        (["8b", "--gpu_memory_gb", "-3"], "--gpu_memory_gb -3"),
        (["8b", "--gpu_memory_gb", "80", "--host_memory_gb", "0"], "--host_memory_gb 0"),
        (["8b", "--device", "cpu"], "--host_memory_gb"),
        (["8b"], "--gpu_memory_gb"),
        (["8b", "--gpu_memory_gb", "80", "--lora_target_modules", "q_proj,qkv"], "--lora_target_modules"),
        (["8b", "--gpu_memory_gb", "80", "--offload_ratio", "1.5"], "--offload_ratio"),
        (["8b", "--gpu_memory_gb", "80", "--deepspeed", str(tmp_path / "none.json")], "--deepspeed"),
        (["8b", "--gpu_memory_gb", "80", "--packing"], "--packing needs --max_seq_len"),
        ([str(tmp_path), "--gpu_memory_gb", "80"], "no config.json"),
        (["8b", "--gpu_memory_gb", "80", "--objective", "kto"], "--objective 'kto': expected one of sft, dpo"),
        (["8b", "--gpu_memory_gb", "80", "--objective", "dpo", "--sequence_parallel_size", "2"],
         "--sequence_parallel_size > 1 with --objective dpo: not planned"),
        (["8b", "--gpu_memory_gb", "80", "--precompute_ref_logprobs"],
         "--precompute_ref_logprobs applies to --objective dpo (this run: sft)"),
        (["8b", "--gpu_memory_gb", "80", "--objective", "dpo", "--tiled_mlp", "--lora_dropout", "0"],
         "--tiled_mlp with --objective dpo: not planned"),
    ]
    for argv, needle in cases:
        rc, out, err = _main(capsys, *argv)
        assert rc == 2, (argv, rc, err)
        assert needle in _one_error_line(err), (argv, err)


def test_layouts_training_refuses_too_exit_3(capsys, tmp_path):
    """Long-context flag combinations training refuses as well (llama_ft/train/sp_layout.py LayoutError): exit 3,
    on which run-llama.sh stops before launching (a 2 it only notes: training may read what the plan cannot)."""
    cases = [
        (["8b", "--gpu_memory_gb", "80", "--sequence_parallel_size", "3"],
         "does not divide the 8 ranks (data-parallel size = ranks / sequence-parallel size); sizes that work with 8 "
         "ranks and the model's heads: 2, 4, 8"),
        (["8b", "--gpu_memory_gb", "80", "--nodes", "8", "--sequence_parallel_size", "64"],
         "the model's 32 query heads and 8 KV heads (Llama 3.1 8B/config.json num_attention_heads, "
         "num_key_value_heads) cannot be split over 64 ranks (each rank takes query heads / 64; the KV heads must "
         "divide or be divisible by 64); sizes that work with these heads: 2, 4, 8, 16, 32 (with 64 ranks: 2, 4, 8, "
         "16, 32)"),
        (["8b", "--gpu_memory_gb", "80", "--sequence_parallel_size", "2", "--attn_implementation", "eager"],
         "--attn_implementation eager"),
        (["8b", "--gpu_memory_gb", "80", "--activation_offload"], "--activation_offload needs"),
        (["8b", "--gpu_memory_gb", "80", "--sequence_parallel_size", "0"], "--sequence_parallel_size 0: expected"),
    ]
    for argv, needle in cases:
        rc, out, err = _main(capsys, *argv)
        assert rc == 3, (argv, rc, err)
        assert needle in _one_error_line(err), (argv, err)
    # 8 + 4 ranks: the plan counts 2 nodes x 8 = 16, more than the launch's 12, so a rank-count refusal is not its
    # to make (training counts them); SP 3 divides 12
    hosts = tmp_path / "uneven"
    hosts.write_text("node1 slots=8\nnode2 slots=4\n")
    rc, out, err = _main(capsys, "8b", "--gpu_memory_gb", "80", "--hostfile", str(hosts), "--sequence_parallel_size",
                         "3")
    assert rc == 2 and "does not divide the 16 ranks" in _one_error_line(err), (rc, err)


def test_does_not_fit_exits_1_with_the_numbers(capsys):
    # 70B FP8 on one 80 GB GPU: fits only with part of the base offloaded
    argv = ["70b", "--quantize", "--nodes", "1", "--gpus_per_node", "1", "--gpu_memory_gb", "79.6", "--max_seq_len",
            "2048", "--gradient_checkpointing"]
    rc, out, err = _main(capsys, *argv)
    assert rc == 1 and "DOES NOT FIT" in out and "base weight partitions" in out
    assert err.startswith("llama-ft plan: does not fit: ") and "--offload --offload_ratio 0." in err
    rc, out, _ = _main(capsys, *argv, "--offload_ratio", "auto")
    assert rc == 0 and "verdict: fits" in out
    # at no ratio: one error line naming the term too large
    rc, out, err = _main(capsys, "8b", "--gpu_memory_gb", "3", "--gpus_per_node", "1")
    assert rc == 1 and "total" in out
    line = _one_error_line(err)
    assert "does not fit at any --offload_ratio" in line and "largest term is" in line and "try " in line
    # chat data without --max_seq_len is planned at the model's whole context: the line says to set it
    rc, out, err = _main(capsys, "8b", "--gpu_memory_gb", "80", "--gpus_per_node", "1", "--dataset_format", "chat")
    line = _one_error_line(err)
    assert rc == 1 and "largest term is activations" in line and "try --max_seq_len N" in line, line
    assert "131,072 positions" in line


def test_json_object(capsys):
    rc, out, _ = _main(capsys, "405b", "--quantize", "--gradient_checkpointing", "--gpu_memory_gb", "79.6",
                       "--host_memory_gb", "2000", "--json")
    assert rc == 0
    p = json.loads(out)
    for key in ("base_partitions_bytes", "lora_bytes", "optimizer_bytes", "activations_bytes", "total_bytes"):
        assert isinstance(p["per_gpu"][key], int), key
    assert isinstance(p["per_host"]["base_partitions_bytes"], int) and isinstance(p["per_host"]["total_bytes"], int)
    assert p["fits"] is True and p["min_offload_ratio"] == 0.0
    assert p["per_gpu"]["total_bytes"] == sum(v for k, v in p["per_gpu"].items() if k != "total_bytes")
    for key in ("h2d_bytes_per_step", "step_time_lower_bound_s", "inputs", "constants", "moments", "peak_at"):
        assert key in p
    assert p["inputs"]["machine"]["world_size"] == 8


@pytest.mark.parametrize("gpu,flags,memory,mode", [
    ("a100-80gb", [], "GPU 80.00 GiB", "FP8 (A100 80GB, sm_80): weight-only (e4m3 weights decoded with integer "
                                       "operations to bf16"),
    ("a6000", [], "GPU 48.00 GiB", "FP8 (RTX A6000, sm_86): weight-only (e4m3 weights decoded with integer"),
    ("l40s", [], "GPU 45.00 GiB", "FP8 (L40S, sm_89): weight-only (e4m3 weights converted by the hardware"),
    ("h100", ["--fp8_compute"], "GPU 79.60 GiB", "FP8 (H100 80GB, sm_90): fp8 compute (activations rounded to e4m3"),
    ("8.0", ["--gpu_memory_gb", "39.5"], "GPU 39.50 GiB",
     "FP8 (a GPU of compute capability 8.0, sm_80): weight-only (e4m3 weights decoded with integer"),
    ("b200", ["--gpu_memory_gb", "170"], "GPU 170.00 GiB", "FP8 (B200, sm_100): weight-only"),
])
def test_gpu_kind_gives_memory_and_the_fp8_mode(capsys, gpu, flags, memory, mode):
    rc, out, err = _main(capsys, "70b", "--quantize", "--gpu", gpu, "--nodes", "2", "--gradient_checkpointing",
                         "--max_seq_len", "2048", *flags)
    assert rc in (0, 1), err
    assert memory in out and mode in out, out
    rc, out, _ = _main(capsys, "70b", "--quantize", "--gpu", gpu, "--nodes", "2", "--max_seq_len", "2048", "--json",
                       *flags)
    f = json.loads(out)["fp8"]
    assert f["mode"] in mode or mode.split(": ", 1)[1] in f["mode"]
    rc, out, _ = _main(capsys, "70b", "--gpu", gpu, "--nodes", "2", "--max_seq_len", "2048", *flags)
    assert "FP8" not in out  # no --quantize: no FP8 line


def test_fp8_compute_on_a_gpu_without_fp8_tensor_cores_is_refused(capsys):
    rc, out, err = _main(capsys, "70b", "--quantize", "--fp8_compute", "--gpu", "a100-40gb")
    line = _one_error_line(err)
    assert rc == 2 and "--fp8_compute: A100 40GB (compute capability 8.0) has no FP8 tensor cores" in line, line
    assert "--quantize alone runs weight-only FP8 on it (e4m3 weights decoded with integer operations" in line
    for bad, needle in (("v100", "--gpu v100: unknown GPU; expected one of a100-40gb"),
                        ("7.5", "--gpu 7.5: compute capability 7.5 has no bf16 tensor cores")):
        rc, out, err = _main(capsys, "70b", "--quantize", "--gpu", bad)
        assert rc == 2 and needle in _one_error_line(err), err
    # no --gpu: the rule, decided at launch
    rc, out, _ = _main(capsys, "70b", "--quantize", "--fp8_compute", "--gpu_memory_gb", "79.6", "--nodes", "2",
                       "--max_seq_len", "2048")
    assert "FP8 (GPU not given (--gpu)): fp8 compute (needs compute capability 8.9+, checked at launch)" in out


def test_cpu_ranks_hold_every_term_in_host_memory(capsys):
    gpu = small_plan(world=2, lora_r=8)
    cpu = small_plan(world=2, device="cpu", lora_r=8)
    assert "cuda_context_bytes" not in cpu["per_gpu"] and cpu["per_gpu"]["process_baseline_bytes"] > 0
    assert cpu["per_host"]["total_bytes"] == 2 * cpu["per_gpu"]["total_bytes"]
    assert cpu["h2d_bytes_per_step"] == 0 and cpu["gpu_fits"] is None
    for key in ("base_partitions_bytes", "lora_bytes", "optimizer_bytes", "activations_bytes"):
        assert cpu["per_gpu"][key] == gpu["per_gpu"][key] or key == "activations_bytes"


def test_hostfile_gives_nodes_and_ranks(capsys, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode1 slots=8\nnode2 slots=8\n")
    rc, out, _ = _main(capsys, "8b", "--hostfile", str(hosts), "--gpu_memory_gb", "79.6", "--json")
    assert rc == 0 and json.loads(out)["inputs"]["machine"]["world_size"] == 16
    rc, out, _ = _main(capsys, "8b", "--hostfile", str(hosts), "--exclude", "node2", "--gpu_memory_gb", "79.6",
                       "--json")
    assert json.loads(out)["inputs"]["machine"]["world_size"] == 8


def test_training_command_line_after_double_dash(capsys, tiny_model_dir):
    # run-llama.sh hands over a whole training command line; the flags the plan does not use are skipped
    rc, out, _ = _main(capsys, "--device", "cpu", "--host_memory_gb", "16", "--gpus_per_node", "2", "--json", "--",
                       "--model_name_or_path", str(tiny_model_dir), "--learning_rate", "1e-3", "--lora_r", "16",
                       "--lora_target_modules", "q_proj", "v_proj", "--output_dir", "out", "--gradient_checkpointing",
                       "--overwrite_output_dir", "--max_steps", "5", "--lora_r", "4")
    assert rc == 0
    t = json.loads(out)["inputs"]["training"]
    assert t["lora_r"] == 4 and t["lora_target_modules"] == ["q_proj", "v_proj"] and t["gradient_checkpointing"]


def test_the_command_is_fast_and_imports_no_torch():
    code = ("import sys; from llama_ft.plan.command import make_plan; "
            "make_plan(['405b', '--quantize', '--gpu_memory_gb', '79.6', '--offload_ratio', 'auto']); "
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "llama_ft.cli", "plan", "99b", "--gpu_memory_gb", "80"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "llama-ft plan: error: MODEL '99b': not a model alias (8b, 70b, 405b) nor a model directory"]


# ---------------------------------------------------------------------------------------------------------------
# run-llama.sh: the plan before the launch


def _fake_launch(tmp_path: Path, tiny_model_dir, *args: str, finished: bool = True,
                 **env_extra: str) -> tuple[subprocess.CompletedProcess, str | None]:
    launcher = tmp_path / "deepspeed"
    record = tmp_path / "launched.txt"
    record.unlink(missing_ok=True)
    launcher.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{record}"\n{FINISHED if finished else ""}\n')
    launcher.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_FT_") and k not in (
        "NPROC", "HOSTFILE", "NODE_RANK", "INCLUDE", "EXCLUDE", "DS_CONFIG", "MERGE_DIR")}
    env.update(MODEL=str(tiny_model_dir), OUTPUT_DIR=str(tmp_path / "out"), PYTHON=sys.executable,
               DEEPSPEED=str(launcher), LLAMA_FT_CACHE=str(tmp_path / "cache"), **env_extra)
    proc = subprocess.run(["bash", str(REPO / "run-llama.sh"), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    return proc, record.read_text() if record.exists() else None


def test_launcher_exit_0_without_a_finished_run_is_a_failure(tmp_path, tiny_model_dir):
    """DeepSpeed's runner exits 0 when its per-node process is killed by a signal (tests/soak.py found it): a
    launcher that returns 0 without this run's train_results.json is reported, not taken for success."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train_results.json").write_text("{}")
    os.utime(tmp_path / "out" / "train_results.json", (1, 1))  # an earlier run's
    proc, launched = _fake_launch(tmp_path, tiny_model_dir, "--max_steps", "3", finished=False)
    assert launched is not None and proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "run-llama.sh: error: the launcher exited 0, but training did not finish"), proc.stderr
    proc, _ = _fake_launch(tmp_path, tiny_model_dir, "--help", finished=False)  # the flags printed: not a failure
    assert proc.returncode == 0, proc.stderr
    # the training flags' own --output_dir is the one looked at
    proc, _ = _fake_launch(tmp_path, tiny_model_dir, "--output_dir", str(tmp_path / "elsewhere"))
    assert proc.returncode == 0 and (tmp_path / "elsewhere" / "train_results.json").is_file(), proc.stderr


def test_run_llama_stops_a_launch_that_does_not_fit(tmp_path, tiny_model_dir):
    # CPU ranks here: planned in host memory, which the tiny model fits
    proc, launched = _fake_launch(tmp_path, tiny_model_dir, "--max_steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert launched is not None and "verdict: fits" in proc.stderr
    # a fake 1 GiB GPU: the CUDA context alone does not fit; stopped before the launcher runs, with the numbers
    proc, launched = _fake_launch(tmp_path, tiny_model_dir, "--max_steps", "3", LLAMA_FT_GPU_MEMORY_GB="1")
    assert proc.returncode == 1 and launched is None
    assert "DOES NOT FIT" in proc.stderr and "CUDA context" in proc.stderr and "--force" in proc.stderr
    # --force: launched anyway, and --force is not a training flag
    proc, launched = _fake_launch(tmp_path, tiny_model_dir, "--max_steps", "3", "--force", LLAMA_FT_GPU_MEMORY_GB="1")
    assert proc.returncode == 0, proc.stderr
    args = launched.split("\n")
    assert "--force" not in args and args[args.index("--max_steps", args.index("--max_steps") + 1) + 1] == "3"
    # host memory too small for CPU ranks
    proc, launched = _fake_launch(tmp_path, tiny_model_dir, LLAMA_FT_HOST_MEMORY_GB="0.5")
    assert proc.returncode == 1 and launched is None and "per host" in proc.stderr
    # a flag the plan cannot read is not a verdict: training gets it and names the problem itself
    proc, launched = _fake_launch(tmp_path, tiny_model_dir, "--lora_r", "0")
    assert proc.returncode == 0 and launched is not None
    assert "note: no memory plan before launching (--lora_r 0: expected an integer > 0)" in proc.stderr


def test_the_part_of_the_plan_a_measurement_sees():
    from llama_ft.train.memory_plan import planned_peak_bytes

    per = {"total_bytes": 100, "cuda_context_bytes": 15, "fragmentation_bytes": 7}
    assert planned_peak_bytes(per, "cpu") == 100  # RSS holds every term
    assert planned_peak_bytes(per, "cuda") == 78  # max_memory_allocated: no context, no reserved-only margin


def test_memory_account_of_a_finished_run_survives_a_plan_it_cannot_get():
    from llama_ft.train.memory_plan import used_vs_planned

    account = used_vs_planned(object(), {}, object(), 2, 123)
    assert account["measured_bytes"] == 123 and account["planned_bytes"] is None and account["plan_error"]


# ---------------------------------------------------------------------------------------------------------------
# --bits 4 on the command line


def test_bits_4_report_json_and_gpu(capsys):
    rc, out, _ = _main(capsys, "70b", "--bits", "4", "--gpu", "h100", "--gradient_checkpointing", "--max_seq_len",
                       "2048", "--json")
    p = json.loads(out)
    assert rc == 0 and p["inputs"]["training"]["bits"] == 4 and p["inputs"]["training"]["base_format"] == "nf4"
    assert "fp8" not in p  # the FP8 mode is for FP8 weights only
    rc, out, _ = _main(capsys, "70b", "--bits", "4", "--gpu", "h100", "--gradient_checkpointing", "--max_seq_len",
                       "2048")
    assert rc == 0 and "NF4 base weights" in out and "FP8" not in out, out
    for flags, base, bits in ((["--quantize"], "FP8 base weights", 8), ([], "bf16 base weights", 16),
                              (["--quantize", "--bits", "8"], "FP8 base weights", 8)):
        rc, out, _ = _main(capsys, "70b", *flags, "--gpu", "h100", "--nodes", "2", "--max_seq_len", "2048")
        assert base in out, out
        rc, out, _ = _main(capsys, "70b", *flags, "--gpu", "h100", "--nodes", "2", "--max_seq_len", "2048", "--json")
        assert json.loads(out)["inputs"]["training"]["bits"] == bits


def test_bits_bad_values_are_training_lines(capsys):
    from llama_ft.config import parse_train_args
    from llama_ft.errors import UserError

    for flags, needle in ((["--bits", "3"], "--bits 3: expected 8 (FP8 e4m3 base weights) or 4 (NF4, as QLoRA)"),
                          (["--bits", "4", "--fp8_compute"], "--fp8_compute with --bits 4: FP8 compute multiplies")):
        rc, out, err = _main(capsys, "70b", "--gpu", "h100", *flags)
        line = _one_error_line(err)
        assert rc == 2 and needle in line, line
        with pytest.raises(UserError) as training:  # training's own line, word for word
            parse_train_args(["--model_name_or_path", "m", "--output_dir", "o", *flags])
        assert line == f"llama-ft plan: error: {training.value}"


def test_hints_name_bits_4_where_base_partitions_dominate(capsys):
    # CPU ranks with too little host memory: the base partitions are the largest term at any ratio
    argv = ["70b", "--device", "cpu", "--gpus_per_node", "1", "--host_memory_gb", "24", "--max_seq_len", "512"]
    rc, _, err = _main(capsys, *argv)
    line = _one_error_line(err)
    assert rc == 1 and "largest term is base_partitions" in line
    assert "try --bits 4 (NF4: 0.28x these bytes of the LoRA-targeted weights) or --quantize (FP8: 0.50x)" in line
    rc, _, err = _main(capsys, *argv, "--quantize")
    assert "try --bits 4 (NF4: 0.56x the FP8 bytes of the LoRA-targeted weights)" in _one_error_line(err)
    rc, _, err = _main(capsys, *argv, "--bits", "4")
    line = _one_error_line(err)
    assert "largest term is base_partitions" in line and "--bits" not in line
    # fits with offload: the line says so, and that a smaller format needs less of it
    rc, _, err = _main(capsys, "405b", "--gpu", "h100", "--gpus_per_node", "2", "--max_seq_len", "2048",
                       "--gradient_checkpointing")
    assert rc == 1 and "fits; with less offload or none: --bits 4 (NF4: 0.28x" in err.strip(), err


def _bnb_checkpoint(path: Path, **bnb) -> Path:
    """The config.json transformers' save_pretrained writes for a bitsandbytes-quantized Llama."""
    from transformers import BitsAndBytesConfig, LlamaConfig

    LlamaConfig(hidden_size=320, intermediate_size=832, num_hidden_layers=2, num_attention_heads=5,
                num_key_value_heads=1, vocab_size=1000,
                quantization_config=BitsAndBytesConfig(**bnb)).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    return path


def test_bnb_4bit_checkpoint_implies_bits_4(capsys, tmp_path):
    from transformers import AutoConfig

    nf4 = _bnb_checkpoint(tmp_path / "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                          bnb_4bit_use_double_quant=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    config = json.loads((nf4 / "config.json").read_text())
    del config["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    flags = ["--gpus_per_node", "2", "--gpu_memory_gb", "8", "--max_seq_len", "64", "--json"]
    plans = {}
    for name, argv in (("implied", [str(nf4)]), ("given", [str(nf4), "--bits", "4"]),
                       ("plain", [str(plain), "--bits", "4"]), ("plain 8", [str(plain), "--quantize"])):
        rc, out, err = _main(capsys, *argv, *flags)
        assert rc == 0, err
        plans[name] = json.loads(out)
    assert plans["implied"]["inputs"]["training"]["bits"] == 4
    for name in ("given", "plain"):
        assert plans[name]["per_gpu"] == plans["implied"]["per_gpu"], name
    assert plans["plain 8"]["per_gpu"]["base_partitions_bytes"] > plans["implied"]["per_gpu"]["base_partitions_bytes"]
    # the recipe's path: transformers' config object of the same directory
    api = plan_training(cfg(max_seq_len=64), ds(), AutoConfig.from_pretrained(nf4), 1, 2, 8 * GiB, None)
    assert api["inputs"]["training"]["bits"] == 4
    # what the checkpoint cannot be: one line each, exit 2
    rc, _, err = _main(capsys, str(nf4), "--bits", "8", *flags)
    assert rc == 2 and "--bits 8: nf4 is a pre-quantized NF4 (bitsandbytes bnb-4bit) checkpoint, 4-bit; drop " \
        "--bits (or pass --bits 4)" in _one_error_line(err)
    rc, _, err = _main(capsys, str(nf4), "--fp8_compute", *flags)
    assert rc == 2 and "--fp8_compute: nf4 holds NF4 weights (4-bit)" in _one_error_line(err)
    for name, bnb, needle in (("fp4", {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "bitsandbytes 4-bit fp4"),
                              ("int8", {"load_in_8bit": True}, "bitsandbytes 8-bit (load_in_8bit)")):
        d = _bnb_checkpoint(tmp_path / name, **bnb)
        rc, _, err = _main(capsys, str(d), *flags)
        line = _one_error_line(err)
        assert rc == 2 and f"{d / 'config.json'}: quantization_config is {needle}" in line, line
        assert "supported: a bitsandbytes checkpoint with load_in_4bit and bnb_4bit_quant_type nf4" in line


def test_fp8_checkpoint_refuses_bits_4(capsys, tmp_path):
    d = tmp_path / "fp8"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 320, "intermediate_size": 832,
                                               "num_hidden_layers": 1, "num_attention_heads": 5,
                                               "num_key_value_heads": 1, "vocab_size": 1000,
                                               "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}))
    rc, out, _ = _main(capsys, str(d), "--gpu_memory_gb", "8", "--max_seq_len", "64", "--json")
    assert rc == 0 and json.loads(out)["inputs"]["training"]["bits"] == 8
    rc, _, err = _main(capsys, str(d), "--bits", "4", "--gpu_memory_gb", "8", "--max_seq_len", "64")
    assert rc == 2 and "pre-quantized FP8 (llama-ft quantize) checkpoint, 8-bit; drop --bits" in _one_error_line(err)


def test_bits_table_in_benchmarks_md_is_what_the_script_prints():
    """The 405B and one-GPU 70B rows of BENCHMARKS.md's 16/8/4-bit table are `benchmarks/plan_table.py --bits`'s
    output today (the table is the planner's arithmetic: a change to it must regenerate the table)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import plan_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = {line for line in (REPO / "BENCHMARKS.md").read_text().splitlines() if line.startswith("| 405B | NF4 |")
            or line.startswith("| 70B | NF4 | 1 | 64 |")}
    assert len(rows) == 6
    for model, gpus, r, seq in (("405b", 8, 64, 2048), ("405b", 8, 16, 8192), ("70b", 1, 64, 2048)):
        assert plan_table.bits_row(model, gpus, 4, r, seq) in rows, (model, r, seq)
