"""`llama-ft quantize --bits 4` and the bnb-4bit layout (llama_ft/nf4/checkpoint.py), against transformers +
bitsandbytes: what they write for BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True), what they load, and what bitsandbytes' dequantize_4bit gives.

The tiny Llama has hidden 128 and intermediate 200: down_proj's K = 200 is not a multiple of 64, so bitsandbytes'
blocks (over the flattened weight) span rows; gate/up/down hold 400 blocks, more than one nested block of 256.
bitsandbytes' AVX512-bf16 CPU matmul (used where the CPU has it) needs K % 64 == 0: the tests switch that path
off, so that they run the same dequantize-then-matmul on every CPU. (K = 200, not 96 or 224: bitsandbytes'
native CPU dequantize_4bit is wrong where K % 16 == 0 and K % 64 != 0, see tests/test_nf4_format.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama_ft.errors import UserError
from llama_ft.lora import LLAMA_LINEAR_NAMES
from llama_ft.nf4.checkpoint import (
    QUANT_STATE,
    aligned_rows,
    check_bnb_checkpoint,
    is_bnb_4bit,
    read_absmax,
    read_nf4_tensor,
    read_quant_state,
    targets_of,
)
from llama_ft.nf4.format import dequantize_nf4
from llama_ft.quantize import main as quantize_main
from llama_ft.quantize import output_bytes, quantize_checkpoint
from llama_ft.shards import ShardReader, open_checkpoint

bnbf = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")


def bnb_config(dtype: torch.dtype):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def load_4bit(path: Path, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kw)
    for m in model.modules():  # the portable dequantize + matmul path (see the module docstring)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def dirs(request, tmp_path_factory):
    """(source dir, transformers' bnb-4bit save of it, ours from `llama-ft quantize --bits 4`, dtype)."""
    dtype = request.param
    root = tmp_path_factory.mktemp(f"nf4-{str(dtype)[6:]}")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=200, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(root / "src")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(root / "src", device_map="cpu",
                                                               quantization_config=bnb_config(dtype))
    theirs.save_pretrained(root / "hf")
    quantize_checkpoint(root / "src", root / "ours", progress=False, bits=4)
    return root / "src", root / "hf", root / "ours", dtype


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def test_we_write_what_transformers_writes(dirs):
    """Same tensor names, every tensor (packed codes, absmax codes, nested scales, code books, the quant-state
    JSON, the untouched embeddings / norms / lm_head) equal byte for byte; same quantization_config."""
    _, hf, ours, _ = dirs
    a, b = tensors(ours), tensors(hf)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((hf / "config.json").read_text())["quantization_config"]
    assert qa.pop("llama_ft_target_modules") == list(LLAMA_LINEAR_NAMES)
    assert qa == qb
    with safe_open(str(next(ours.glob("*.safetensors"))), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_transformers_loads_ours_with_the_same_logits(dirs):
    src, _, ours, dtype = dirs
    mine = load_4bit(ours)
    ref = load_4bit(src, quantization_config=bnb_config(dtype))
    assert type(mine.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = mine(x).logits, ref(x).logits
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dirs", [torch.bfloat16], indirect=True, ids=["bf16"])
def test_some_targets_only(dirs, tmp_path):
    """--target_modules q_proj v_proj: the other linears stay bf16 and config.json lists them (with lm_head) in
    llm_int8_skip_modules, so transformers builds them as plain Linear; logits equal transformers' quantization
    with that skip list."""
    src, _, _, dtype = dirs
    out = tmp_path / "qv"
    quantize_checkpoint(src, out, targets=("q_proj", "v_proj"), progress=False, bits=4)
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "lm_head" in skip and "model.layers.1.self_attn.k_proj" in skip and len(skip) == 2 + 2 * 5
    mine = load_4bit(out)
    attn = mine.model.layers[1].self_attn
    assert type(attn.q_proj).__name__ == "Linear4bit" and type(attn.k_proj) is torch.nn.Linear
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    ref = load_4bit(src, quantization_config=cfg)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(mine(x).logits, ref(x).logits)


def test_read_nf4_tensor_gives_bitsandbytes_dequantization(dirs):
    """On the directory transformers wrote: our reads + dequantize_nf4 == bitsandbytes' dequantize_4bit of the
    QuantState it rebuilds from the same stored tensors, whole weights and row ranges."""
    _, hf, _, dtype = dirs
    ckpt = open_checkpoint(hf)
    names = check_bnb_checkpoint(ckpt)
    assert len(names) == 14 and targets_of(names) == sorted(LLAMA_LINEAR_NAMES)
    stored = tensors(hf)
    reader = ShardReader(ckpt)
    for name in names:
        w = read_quant_state(ckpt, name, reader)
        state = bnbf.QuantState.from_dict({k[len(name) + 1:]: v for k, v in stored.items()
                                           if k.startswith(name + ".")}, device=torch.device("cpu"))
        want = bnbf.dequantize_4bit(stored[name], state)
        assert want.dtype == dtype and w.nested
        packed, absmax, shape = read_nf4_tensor(reader, w)
        assert shape == tuple(want.shape) and same_bits(dequantize_nf4(packed, absmax, shape, dtype), want)
        n, k = shape
        step = 1 if k % 64 == 0 else 8  # K = 200: 8 rows hold 25 blocks
        for r0, r1 in [(8, 24), (n - 8, n), (3, 13)]:
            a0, a1 = aligned_rows(w, r0, r1)
            assert (a0, a1) == ((r0 // step) * step, -(-r1 // step) * step)
            p, a, sub = read_nf4_tensor(reader, w, (a0, a1))
            assert sub == (a1 - a0, k) and same_bits(dequantize_nf4(p, a, sub, dtype)[r0 - a0: r1 - a0], want[r0:r1])
        if step > 1:
            with pytest.raises(ValueError, match="not a block-aligned range"):
                read_nf4_tensor(reader, w, (3, 13))
    # absmax across a nested block boundary (blocks 250..300 of a 400-block weight)
    w = read_quant_state(ckpt, "model.layers.1.mlp.down_proj.weight", reader)
    whole = read_absmax(reader, w, 0, w.num_blocks)
    assert w.num_blocks == 400 and torch.equal(read_absmax(reader, w, 250, 300), whole[250:300])
    reader.close()


@pytest.mark.parametrize("dirs", [torch.bfloat16], indirect=True, ids=["bf16"])
def test_read_without_double_quantization(dirs, tmp_path):
    """bnb_4bit_use_double_quant=False (some Hub repos): absmax stored as F32, no nested tensors."""
    src, _, _, dtype = dirs
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=dtype)
    transformers.AutoModelForCausalLM.from_pretrained(src, device_map="cpu", quantization_config=cfg) \
        .save_pretrained(tmp_path / "plain")
    ckpt = open_checkpoint(tmp_path / "plain")
    names = check_bnb_checkpoint(ckpt)
    stored = tensors(tmp_path / "plain")
    reader = ShardReader(ckpt)
    for name in names:
        w = read_quant_state(ckpt, name, reader)
        assert not w.nested and stored[name + ".absmax"].dtype == torch.float32
        state = bnbf.QuantState.from_dict({k[len(name) + 1:]: v for k, v in stored.items()
                                           if k.startswith(name + ".")}, device=torch.device("cpu"))
        packed, absmax, shape = read_nf4_tensor(reader, w)
        assert same_bits(dequantize_nf4(packed, absmax, shape, dtype), bnbf.dequantize_4bit(stored[name], state))
    reader.close()


def test_output_size_estimate_covers_what_is_written(dirs):
    src, _, ours, _ = dirs
    written = sum(p.stat().st_size for p in ours.iterdir())
    assert written <= output_bytes(open_checkpoint(src), LLAMA_LINEAR_NAMES, 4) <= 1.05 * written


@pytest.mark.parametrize("dirs", [torch.bfloat16], indirect=True, ids=["bf16"])
def test_not_enough_disk_space_is_one_line(dirs, tmp_path, monkeypatch, capsys):
    """--bits 4 goes through the FP8 path's space check with its own size estimate, before writing anything."""
    from llama_ft import fsutil

    src, _, _, dtype = dirs
    needed = output_bytes(open_checkpoint(src), LLAMA_LINEAR_NAMES, 4)
    monkeypatch.setattr(fsutil, "_free_bytes", lambda path: needed - 1)
    out = tmp_path / "q4"
    with pytest.raises(SystemExit) as e:
        quantize_main(["--model", str(src), "--output", str(out), "--bits", "4", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0] == (f"llama-ft: error: {out}: not enough free disk space: about {needed / 2**20:.1f} MiB needed, "
                      f"{(needed - 1) / 2**20:.1f} MiB free; nothing was written")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_is_bnb_4bit(dirs):
    src, hf, ours, _ = dirs
    assert is_bnb_4bit(open_checkpoint(hf).config) and is_bnb_4bit(open_checkpoint(ours).config)
    assert not is_bnb_4bit(open_checkpoint(src).config)


def broken_copy(hf: Path, dest: Path, config=None, tensors_change=None) -> Path:
    shutil.copytree(hf, dest)
    if config is not None:
        cfg = json.loads((dest / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (dest / "config.json").write_text(json.dumps(cfg))
    if tensors_change is not None:
        shard = next(dest.glob("*.safetensors"))
        t = load_file(str(shard))
        tensors_change(t)
        save_file(t, str(shard), metadata={"format": "pt"})
    return dest


W = "model.layers.0.mlp.down_proj.weight"


def _set_state(t: dict, **change) -> None:
    state = json.loads(bytes(t[W + QUANT_STATE].tolist()).decode())
    state.update(change)
    t[W + QUANT_STATE] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


BAD = [
    ({"load_in_8bit": True, "_load_in_8bit": True, "load_in_4bit": False, "_load_in_4bit": False}, None,
     r"config.json: quantization_config: load_in_8bit .* not supported"),
    ({"bnb_4bit_quant_type": "fp4"}, None, r"config.json: quantization_config: bnb_4bit_quant_type 'fp4' is not"),
    (None, lambda t: t.update({W + ".absmax": t[W + ".absmax"][:-1].clone()}),
     rf"tensor '{W}.absmax' has 399 U8 values, expected 400 .*weight shape \[128, 200\]"),
    (None, lambda t: t.update({W: t[W][:-2].clone()}),
     rf"tensor '{W}' has 12798 U8 values, expected 12800 .*weight shape \[128, 200\]"),
    (None, lambda t: t.pop(W + QUANT_STATE), rf"tensor '{W}{QUANT_STATE}' missing"),
    (None, lambda t: t.update({W + ".quant_map": t[W + ".quant_map"].flip(0).contiguous()}),
     rf"tensor '{W}.quant_map' is not the NF4 code book"),
    (None, lambda t: _set_state(t, blocksize=128), rf"tensor '{W}{QUANT_STATE}': blocksize 128, expected 64"),
    (None, lambda t: _set_state(t, shape=[128, 192]),
     rf"tensor '{W}' has 12800 U8 values, expected 12288 .*weight shape \[128, 192\]"),
]


@pytest.mark.parametrize("config,change,needle", BAD, ids=["8bit", "fp4", "absmax", "packed", "no-state",
                                                           "quant-map", "blocksize", "shape"])
@pytest.mark.parametrize("dirs", [torch.bfloat16], indirect=True, ids=["bf16"])
def test_bad_checkpoints_are_one_line(dirs, tmp_path, config, change, needle):
    _, hf, _, dtype = dirs
    bad = broken_copy(hf, tmp_path / "bad", config, change)
    with pytest.raises(UserError, match=needle) as e:
        check_bnb_checkpoint(open_checkpoint(bad))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dirs", [torch.bfloat16], indirect=True, ids=["bf16"])
def test_shape_the_model_does_not_need(dirs):
    _, hf, _, _ = dirs
    ckpt = open_checkpoint(hf)
    assert len(check_bnb_checkpoint(ckpt, {W: (128, 200)})) == 14
    with pytest.raises(UserError, match=rf"tensor '{W}{QUANT_STATE}' says shape \[128, 200\], the model "
                                        r"\(config.json\) needs \[128, 256\]"):
        check_bnb_checkpoint(ckpt, {W: (128, 256)})


@pytest.mark.parametrize("dirs", [torch.bfloat16], indirect=True, ids=["bf16"])
def test_quantize_cli_bits(dirs, tmp_path, capsys):
    src, hf, _, dtype = dirs
    assert quantize_main(["--model", str(src), "--output", str(tmp_path / "q4"), "--bits", "4", "--no-progress"]) == 0
    assert "14 weights to NF4 (bnb-4bit)" in capsys.readouterr().out
    for args, needle in [(["--bits", "3"], "--bits 3: expected 4"),
                         (["--model", str(hf), "--bits", "4"], "already quantized (bitsandbytes")]:
        argv = ["--model", str(src), "--output", str(tmp_path / "x"), "--no-progress", *args]
        with pytest.raises(SystemExit) as e:
            quantize_main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("llama-ft: error: ") and needle in lines[0]
        assert not (tmp_path / "x").exists()
