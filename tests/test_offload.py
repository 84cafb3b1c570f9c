"""Partial offload of frozen base weights: how the offloaded share is chosen (model/offload.py)."""

from __future__ import annotations

import pytest
import torch

from llama_ft.lora import LoRALinear, LoraSpec
from llama_ft.model.offload import choose_offloaded, frozen_base_params, spread_evenly

# Llama 3.1 8B linear weight sizes of one block, in model order: q, k, v, o, gate, up, down
LAYER_8B = [4096 * 4096, 1024 * 4096, 1024 * 4096, 4096 * 4096, 14336 * 4096, 14336 * 4096, 4096 * 14336]


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_offloaded_share_is_spread_evenly_through_the_depth(ratio):
    sizes = LAYER_8B * 32
    chosen = spread_evenly(sizes, ratio)
    total = sum(sizes)
    picked = sum(s for s, c in zip(sizes, chosen, strict=True) if c)
    assert abs(picked - ratio * total) <= max(sizes) / 2
    # every quarter of the depth carries its share, not the first R of the layers
    q = len(sizes) // 4
    for i in range(4):
        part = sizes[i * q:(i + 1) * q]
        got = sum(s for s, c in zip(part, chosen[i * q:(i + 1) * q], strict=True) if c)
        assert abs(got - ratio * sum(part)) <= max(sizes), (i, got / sum(part))


def test_equal_sizes_pick_every_kth():
    chosen = spread_evenly([1] * 16, 0.25)
    idx = [i for i, c in enumerate(chosen) if c]
    assert len(idx) == 4 and {b - a for a, b in zip(idx, idx[1:], strict=False)} == {4}


def test_offload_reports_the_chosen_partition_bytes():
    spec = LoraSpec(2, 4)
    model = torch.nn.Sequential(*[LoRALinear(torch.nn.Parameter(torch.randn(8, 8)), 8, 8, spec) for _ in range(4)])
    assert [n for n, _ in frozen_base_params(model)] == [f"{i}.weight" for i in range(4)]
    ids, got = choose_offloaded(model, 0.5)
    assert got["frozen_base_bytes"] == 4 * 64 * 4 and got["offloaded_bytes"] == 2 * 64 * 4
    assert got["offloaded_tensors"] == 2 and len(ids) == 2
    # over 3 ranks each partition is ceil(64 / 3) = 22 elements of 4 bytes
    assert choose_offloaded(model, 0.5, world_size=3)[1]["frozen_base_bytes"] == 4 * 22 * 4


@pytest.mark.gpu
def test_offloaded_partitions_are_pinned_host_memory_and_gather_to_the_gpu(tiny_model_dir, monkeypatch):
    """On a GPU: the chosen partitions are pinned host memory, the rest on the GPU, and gathering
    them (what ZeRO-3 does before each use) gives the same model as without offload."""
    import socket

    import deepspeed

    from llama_ft.model.build import build_lora_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    deepspeed.init_distributed()
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    spec = LoraSpec(4, 8)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    logits = []
    for ratio in (None, 0.5):
        torch.manual_seed(0)
        model, report = build_lora_model(tiny_model_dir, spec, ds, torch.bfloat16, offload_ratio=ratio)
        if ratio is not None:
            base = frozen_base_params(model)
            on_host = [p for _, p in base if p.ds_tensor.device.type == "cpu"]
            assert 0 < len(on_host) < len(base) and all(p.ds_tensor.is_pinned() for p in on_host)
            assert report.partition_bytes_host > 0 and report.partition_bytes_gpu > 0
        with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
            logits.append(model(input_ids=ids).logits.float().cpu())
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
