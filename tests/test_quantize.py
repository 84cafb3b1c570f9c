"""`llama-ft quantize`: the FP8 checkpoint layout, its loading, and its bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from llama_ft.errors import UserError
from llama_ft.fp8 import quantize_fp8_reference, scales_from_bytes
from llama_ft.fp8.module import FP8LoRALinear
from llama_ft.lora import LLAMA_LINEAR_NAMES, LoraSpec
from llama_ft.model.build import build_lora_model
from llama_ft.quantize import quantize_checkpoint
from llama_ft.shards import open_checkpoint


@pytest.fixture(scope="module")
def fp8_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-fp8"
    quantize_checkpoint(tiny_model_dir, out, progress=False)
    return out


def test_layout_matches_reference_quantization(tiny_model_dir, fp8_dir):
    src, ckpt = open_checkpoint(tiny_model_dir), open_checkpoint(fp8_dir)
    qc = ckpt.config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert sorted(qc["llama_ft_target_modules"]) == sorted(LLAMA_LINEAR_NAMES)
    assert ckpt.shards == src.shards  # same shard names, scales beside their weights
    n_fp8 = 0
    for name in src.tensors:
        got = ckpt.tensors[name]
        if name.split(".")[-2] in LLAMA_LINEAR_NAMES:
            n_fp8 += 1
            q, s = quantize_fp8_reference(src.read(name))
            assert got.dtype == "F8_E4M3" and torch.equal(ckpt.read(name).view(torch.uint8), q)
            assert ckpt.tensors[name + "_scale_inv"].shard == got.shard
            assert torch.equal(ckpt.read(name + "_scale_inv"), s)
        else:
            assert torch.equal(ckpt.read(name), src.read(name))
    assert n_fp8 == 14
    assert ckpt.total_bytes() < 0.7 * src.total_bytes()
    with safe_open(str(fp8_dir / ckpt.shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    AutoTokenizer.from_pretrained(fp8_dir)


def test_loading_prequantized_equals_quantizing_on_load(tiny_model_dir, fp8_dir):
    spec = LoraSpec(4, 8)
    torch.manual_seed(0)
    a, _ = build_lora_model(tiny_model_dir, spec, None, torch.float32, quantize=True)
    torch.manual_seed(0)
    b, report = build_lora_model(fp8_dir, spec, None, torch.float32)
    assert report.quantized_layers == 14
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    layer = b.model.layers[0].mlp.down_proj
    assert isinstance(layer, FP8LoRALinear) and scales_from_bytes(layer.weight_scale).dtype == torch.float32
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=0)


def test_prequantized_cannot_go_to_nvme_partitions(fp8_dir):
    ds = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}}
    with pytest.raises(UserError, match="pre-quantized FP8 checkpoint cannot be loaded into NVMe"):
        build_lora_model(fp8_dir, LoraSpec(4, 8), ds, torch.bfloat16)


def test_quantize_on_load_cannot_go_to_nvme_partitions(tiny_model_dir):
    ds = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}}
    with pytest.raises(UserError, match="--quantize: FP8 layers cannot live in NVMe-offloaded partitions"):
        build_lora_model(tiny_model_dir, LoraSpec(4, 8), ds, torch.bfloat16, quantize=True)


def test_prequantized_needs_matching_lora_targets(fp8_dir):
    with pytest.raises(UserError, match="--lora_target_modules .*quantized for"):
        build_lora_model(fp8_dir, LoraSpec(4, 8, target_modules=("q_proj",)), None, torch.float32)


@pytest.mark.parametrize("change,needle", [
    ({"weight_block_size": [64, 64]}, "weight_block_size"),
    ({"fmt": "e5m2"}, "expected fp8/e4m3"),
    ({"quant_method": "bitsandbytes"}, "neither load_in_4bit nor load_in_8bit"),
])
def test_foreign_quantization_layout_is_refused(fp8_dir, tmp_path, change, needle):
    bad = tmp_path / "bad"
    shutil.copytree(fp8_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=needle):
        build_lora_model(bad, LoraSpec(4, 8), None, torch.float32)


def test_quantize_cli(tiny_model_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "llama_ft.cli", "quantize", *args, "--no-progress"],
                              capture_output=True, text=True, timeout=300)

    ok = run("--model", str(tiny_model_dir), "--output", str(tmp_path / "q"))
    assert ok.returncode == 0 and "14 weights to FP8" in ok.stdout, ok.stderr
    again = run("--model", str(tiny_model_dir), "--output", str(tmp_path / "q"))
    assert again.returncode == 2 and "--output" in again.stderr and "Traceback" not in again.stderr
    inside = run("--model", str(tiny_model_dir), "--output", str(tiny_model_dir / "q"))
    assert inside.returncode == 2 and "inside --model" in inside.stderr
    twice = run("--model", str(tmp_path / "q"), "--output", str(tmp_path / "qq"))
    assert twice.returncode == 2 and "already quantized" in twice.stderr
    typo = run("--model", str(tiny_model_dir), "--output", str(tmp_path / "q3"), "--target_modules", "q_prj")
    assert typo.returncode == 2 and "q_prj" in typo.stderr and not (tmp_path / "q3").exists()


def test_output_that_is_a_file_is_refused(tiny_model_dir, tmp_path):
    # --overwrite must not swap a file for the new directory (the file would stay behind under a temporary name)
    out = tmp_path / "q"
    out.write_text("mine")
    with pytest.raises(UserError, match=r"--output .*q: exists and is not a directory"):
        quantize_checkpoint(tiny_model_dir, out, overwrite=True, progress=False)
    assert out.read_text() == "mine" and not list(tmp_path.glob(".q.tmp-*"))
