"""Streaming adapter merge (llama_ft/merge.py) against real PEFT adapters on the tiny Llama.

References are independent of the code under test: a float64 recomputation of W + s.B@A, and
PEFT itself (`PeftModel` forward, `merge_and_unload` in float32).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama_ft import merge as merge_mod
from llama_ft import shards as shards_mod
from llama_ft.errors import UserError
from llama_ft.merge import main, merge_adapters
from llama_ft.shards import Checkpoint

REPO = Path(__file__).resolve().parents[1]
PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


def make_adapter(base: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for `base` with non-zero B (init_lora_weights=False) to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    kwargs = dict(r=8, lora_alpha=16, target_modules=PROJS, init_lora_weights=False)
    kwargs.update(lora_kwargs)
    get_peft_model(model, LoraConfig(**kwargs)).save_pretrained(out)
    return out


def read_all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def peft_merged_fp32(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge in float32: the base loaded as fp32, adapter applied, merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each bf16 value (8 significant bits), in float64."""
    _, e = torch.frexp(x.double())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - 8).clamp_min(2.0**-133)


def no_leftovers(output: Path) -> bool:
    """Neither the output nor an atomic_dir temp sibling exists."""
    return not output.exists() and not list(output.parent.glob(f".{output.name}.tmp-*"))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def merged_dir(tiny_model_dir, adapter_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "out"
    summary = merge_adapters(tiny_model_dir, adapter_dir, out, progress=False)
    assert summary["tensors_merged"] == 2 * len(PROJS)
    assert summary["shards_written"] == 6
    assert summary["peak_rss_bytes"] > 0 and summary["seconds"] >= 0
    return out


# 1. merge math ---------------------------------------------------------------------------------


def test_merge_math_matches_float64_reference(tiny_model_dir, adapter_dir, merged_dir):
    base, merged = read_all(tiny_model_dir), read_all(merged_dir)
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    assert merged.keys() == base.keys()
    scale = 16 / 8
    targeted = set()
    for key in lora:
        if ".lora_A." not in key:
            continue
        module = key[len(PREFIX) : -len(".lora_A.weight")]
        name = f"{module}.weight"
        targeted.add(name)
        a, b = lora[key].double(), lora[key.replace("lora_A", "lora_B")].double()
        exact = base[name].double() + scale * (b @ a)
        ref = exact.to(torch.bfloat16)
        got = merged[name]
        assert got.dtype == torch.bfloat16 and got.shape == base[name].shape
        assert not torch.equal(got, base[name]), f"{name} unchanged: the merge did nothing"
        diff = (got.double() - ref.double()).abs()
        assert (diff <= bf16_ulp(ref)).all(), f"{name}: more than 1 ulp from the float64 reference"
        assert (diff == 0).float().mean() > 0.99, f"{name}: too many values off by one ulp"
    assert len(targeted) == 2 * len(PROJS)
    for name in base.keys() - targeted:
        assert base[name].dtype == merged[name].dtype
        assert base[name].view(torch.uint8).numpy().tobytes() == merged[name].view(torch.uint8).numpy().tobytes()


# 2. against PEFT ---------------------------------------------------------------------------------


def test_merged_logits_match_peft(tiny_model_dir, adapter_dir, merged_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))

    # bf16: merged checkpoint vs PEFT's unmerged forward on the bf16 base
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), adapter_dir
        ).eval()
        ref = peft_model(ids).logits.float()
        got = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).eval()(ids).logits.float()
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)(ids).logits.float()
    err = (got - ref).abs().max().item()
    effect = (ref - base_logits).abs().max().item()
    assert effect > 20 * err, f"adapter effect {effect} not well above bf16 error {err}"
    torch.testing.assert_close(got, ref, atol=3e-2 * ref.abs().max().item(), rtol=0)

    # fp32: --dtype float32 merge vs PEFT merge_and_unload on the fp32 base
    out32 = tmp_path / "merged32"
    merge_adapters(tiny_model_dir, adapter_dir, out32, dtype="float32", progress=False)
    cfg = json.loads((out32 / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
    assert all(t.dtype == torch.float32 for t in read_all(out32).values())
    with torch.no_grad():
        peft32 = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_dir
        ).merge_and_unload()
        ref32 = peft32.eval()(ids).logits
        got32 = AutoModelForCausalLM.from_pretrained(out32, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got32, ref32, atol=1e-4, rtol=0)


# 3. rslora, rank/alpha patterns, single-file base ---------------------------------------------------


def _assert_equals_peft_fp32(base: Path, adapter: Path, out: Path) -> None:
    merge_adapters(base, adapter, out, dtype="float32", progress=False)
    ref, got = peft_merged_fp32(base, adapter), read_all(out)
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, atol=1e-6, rtol=1e-6, msg=name)


def test_rslora_scale(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "rs", use_rslora=True, seed=1)
    assert merge_mod.load_lora_config(adapter).use_rslora
    _assert_equals_peft_fp32(tiny_model_dir, adapter, tmp_path / "out")
    # and the rslora scale (alpha/sqrt r) is what made the difference, not alpha/r
    base, got = read_all(tiny_model_dir), read_all(tmp_path / "out")
    lora = load_file(adapter / "adapter_model.safetensors")
    m = "model.layers.0.self_attn.q_proj"
    delta = lora[f"{PREFIX}{m}.lora_B.weight"] @ lora[f"{PREFIX}{m}.lora_A.weight"]
    torch.testing.assert_close(got[f"{m}.weight"], base[f"{m}.weight"].float() + 16 / math.sqrt(8) * delta)


def test_rank_and_alpha_patterns(tiny_model_dir, tmp_path):
    adapter = make_adapter(
        tiny_model_dir,
        tmp_path / "pat",
        seed=2,
        rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 3, "gate_proj": 40},
    )
    lora = load_file(adapter / "adapter_model.safetensors")
    assert lora[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4
    assert lora[f"{PREFIX}model.layers.1.mlp.down_proj.lora_A.weight"].shape[0] == 2
    assert lora[f"{PREFIX}model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 8
    _assert_equals_peft_fp32(tiny_model_dir, adapter, tmp_path / "out")


def test_single_file_base(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    single = tmp_path / "single"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(
        single, max_shard_size="1GB"
    )
    assert (single / "model.safetensors").exists() and not (single / "model.safetensors.index.json").exists()
    adapter = make_adapter(single, tmp_path / "ad", seed=3)
    out = tmp_path / "out"
    s = merge_adapters(single, adapter, out, progress=False)
    assert s["shards_written"] == 1 and s["tensors_merged"] == 2 * len(PROJS)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    _assert_equals_peft_fp32(single, adapter, tmp_path / "out32")


# 4. output layout ---------------------------------------------------------------------------------


def test_output_layout(tiny_model_dir, merged_dir):
    from transformers import AutoTokenizer

    base_shards = sorted(p.name for p in tiny_model_dir.glob("*.safetensors"))
    assert sorted(p.name for p in merged_dir.glob("*.safetensors")) == base_shards
    base_index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    tensors = read_all(merged_dir)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    for shard in base_shards:  # each shard holds exactly the base shard's tensors, with pt metadata
        with safe_open(merged_dir / shard, framework="pt") as f, safe_open(tiny_model_dir / shard, "pt") as g:
            assert sorted(f.keys()) == sorted(g.keys())
            assert f.metadata() == {"format": "pt"}
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (merged_dir / name).is_file(), name
    assert (merged_dir / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    base_tok, tok = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(merged_dir)
    assert tok("Give three tips.").input_ids == base_tok("Give three tips.").input_ids
    assert not list(merged_dir.parent.glob(".out.tmp-*"))


def test_side_files_copied_and_weights_skipped(tiny_model_dir, adapter_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    extras = {"special_tokens_map.json": "{}", "chat_template.jinja": "{{ x }}", "tokenizer.model": "spm"}
    for name, text in extras.items():
        (base / name).write_text(text)
    (base / "pytorch_model.bin").write_bytes(b"pickle")
    (base / "consolidated.00.pth").write_bytes(b"pickle")
    (base / "original").mkdir()
    (base / "original" / "params.json").write_text("{}")
    out = tmp_path / "out"
    merge_adapters(base, adapter_dir, out, progress=False)
    for name, text in extras.items():
        assert (out / name).read_text() == text
    for name in ["pytorch_model.bin", "consolidated.00.pth", "original"]:
        assert not (out / name).exists(), name


def test_overwrite_and_empty_output(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory is fine
    merge_adapters(tiny_model_dir, adapter_dir, out, progress=False)
    (out / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        merge_adapters(tiny_model_dir, adapter_dir, out, progress=False)
    assert (out / "stale.txt").exists()
    merge_adapters(tiny_model_dir, adapter_dir, out, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors.index.json").exists()


# 5. bad inputs ------------------------------------------------------------------------------------


def _edit_tensors(adapter: Path, fn) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


Q0 = f"{PREFIX}model.layers.0.self_attn.q_proj"


def _rename_layer(t):
    for ab in "AB":
        t[f"{PREFIX}model.layers.7.self_attn.q_proj.lora_{ab}.weight"] = t.pop(f"{Q0}.lora_{ab}.weight")


def _to_other_model(t):
    for k in list(t):
        t[k.replace("self_attn.q_proj", "attn.c_attn")] = t.pop(k)


def _bad_shape(t):
    t[f"{Q0}.lora_A.weight"] = torch.zeros(8, 65)


def _drop_b(t):
    del t[f"{Q0}.lora_B.weight"]


def _drop_a(t):
    del t[f"{Q0}.lora_A.weight"]


def _non_lora_key(t):
    t[f"{PREFIX}lm_head.weight"] = torch.zeros(384, 64)


ADAPTER_CASES = {
    "adapter_missing": (lambda a: shutil.rmtree(a), r"--adapter .*not a directory"),
    "config_missing": (lambda a: (a / "adapter_config.json").unlink(), r"no adapter_config\.json"),
    "config_bad_json": (lambda a: (a / "adapter_config.json").write_text("{r: 8,"), r"adapter_config\.json: not valid"),
    "weights_missing_bin": (
        lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
        r"no adapter_model\.safetensors \(found adapter_model\.bin.*pickle",
    ),
    "weights_missing": (
        lambda a: (a / "adapter_model.safetensors").unlink(),
        r"no adapter_model\.safetensors \(\.bin adapters .*pickle",
    ),
    "key_not_in_base": (
        lambda a: _edit_tensors(a, _rename_layer),
        r"layers\.7\.self_attn\.q_proj\.lora_A\.weight.*missing target module",
    ),
    "targets_absent": (
        lambda a: (_edit_tensors(a, _to_other_model), _edit_config(a, target_modules=["c_attn"])),
        r"none of target_modules \['c_attn'\] exist in --base",
    ),
    "shape_mismatch": (
        lambda a: _edit_tensors(a, _bad_shape),
        r"shape mismatch for 'model\.layers\.0\.self_attn\.q_proj\.weight': lora_A \[8, 65\] and lora_B \[64, 8\]"
        r" do not fit base weight \[64, 64\]",
    ),
    "a_without_b": (lambda a: _edit_tensors(a, _drop_b), r"q_proj\.lora_A\.weight' has no matching lora_B"),
    "b_without_a": (lambda a: _edit_tensors(a, _drop_a), r"q_proj\.lora_B\.weight' has no matching lora_A"),
    "non_lora_tensor": (
        lambda a: _edit_tensors(a, _non_lora_key),
        r"'base_model\.model\.lm_head\.weight' is not a LoRA",
    ),
    "rank_vs_config": (
        lambda a: _edit_config(a, r=4),
        r"shape mismatch for .*rank 8 but adapter_config\.json gives r=4",
    ),
    "dora": (lambda a: _edit_config(a, use_dora=True), r"'use_dora' is True.*DoRA"),
    "bias": (lambda a: _edit_config(a, bias="all"), r"'bias' is 'all'"),
    "fan_in_fan_out": (lambda a: _edit_config(a, fan_in_fan_out=True), r"'fan_in_fan_out' is True"),
    "not_lora": (lambda a: _edit_config(a, peft_type="IA3"), r"'peft_type' is 'IA3'"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter(case, tiny_model_dir, adapter_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    breaker, pattern = ADAPTER_CASES[case]
    breaker(adapter)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=pattern) as exc:
        merge_adapters(tiny_model_dir, adapter, out, progress=False)
    assert "\n" not in str(exc.value)
    assert no_leftovers(out)


def test_bad_base(adapter_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"--base .*nope: not a directory"):
        merge_adapters(tmp_path / "nope", adapter_dir, out, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"no model\.safetensors\.index\.json or model\.safetensors"):
        merge_adapters(bad, adapter_dir, out, progress=False)
    assert no_leftovers(out)


def test_bad_output_and_dtype(tiny_model_dir, adapter_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    with pytest.raises(UserError, match=r"--output .*inside --base"):
        merge_adapters(base, adapter_dir, base / "merged", progress=False)
    assert no_leftovers(base / "merged")
    with pytest.raises(UserError, match=r"--output .*inside --base"):
        merge_adapters(base, adapter_dir, base, overwrite=True, progress=False)
    with pytest.raises(UserError, match=r"--output .*contains --base"):
        merge_adapters(base, adapter_dir, tmp_path, overwrite=True, progress=False)
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    with pytest.raises(UserError, match=r"--output .*--adapter"):
        merge_adapters(base, adapter, adapter, overwrite=True, progress=False)
    assert (adapter / "adapter_model.safetensors").exists() and (base / "config.json").exists()
    with pytest.raises(UserError, match=r"--dtype int8: expected one of bfloat16, float16, float32"):
        merge_adapters(base, adapter, tmp_path / "out", dtype="int8", progress=False)
    assert no_leftovers(tmp_path / "out")


def test_failure_mid_merge_leaves_nothing(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(shards_mod, "save_file", failing_save)  # the shard writer merge uses
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        merge_adapters(tiny_model_dir, adapter_dir, out, progress=False)
    assert no_leftovers(out)


def test_main_exit_code(tiny_model_dir, adapter_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--base", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llama-ft: error: --adapter ")
    assert main(["--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output", str(tmp_path / "o"),
                 "--no-progress"]) == 0  # fmt: skip
    assert "merged 14 LoRA weights" in capsys.readouterr().out


# 6. the Snowflake-compatible script ------------------------------------------------------------------


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(REPO / "apply_ds_adapters.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_script_snowflake_flags(tiny_model_dir, adapter_dir, tmp_path):
    out = tmp_path / "merged"
    r = _run_script("--model-name", str(tiny_model_dir), "--ckpt-path", str(adapter_dir), "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert f"merged 14 LoRA weights into {out}" in r.stdout
    assert read_all(out).keys() == read_all(tiny_model_dir).keys()

    r = _run_script("--model-name", str(tmp_path / "nope"), "--ckpt-path", str(adapter_dir), "--output-dir", str(out))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"llama-ft: error: --base {tmp_path / 'nope'}: not a directory "
                      "(expected a Hugging Face model directory)"]  # fmt: skip


# 7. streaming: one shard at a time ------------------------------------------------------------------


def test_streams_one_shard_at_a_time(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    """Reads and writes must alternate shard by shard, and no tensor of an earlier shard may still be
    alive when the next shard is read or written. Loading every shard first fails both checks."""
    events: list[tuple[str, str]] = []
    alive: list[tuple[str, weakref.ref]] = []
    original_iter = Checkpoint.iter_shard

    def alive_shards() -> set[str]:
        gc.collect()
        return {shard for shard, ref in alive if ref() is not None}

    def tracking_iter(self, shard):
        assert alive_shards() == set(), f"tensors of {alive_shards()} still alive when reading {shard}"
        events.append(("read", shard))
        for name, t in original_iter(self, shard):
            alive.append((shard, weakref.ref(t)))
            yield name, t

    def tracking_save(tensors, path, metadata=None):
        shard = Path(path).name
        assert alive_shards() <= {shard}
        events.append(("write", shard))
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(Checkpoint, "iter_shard", tracking_iter)
    monkeypatch.setattr(shards_mod, "save_file", tracking_save)
    merge_adapters(tiny_model_dir, adapter_dir, tmp_path / "out", progress=False)

    shards = sorted(p.name for p in tiny_model_dir.glob("model-*.safetensors"))
    assert events == [(kind, s) for s in shards for kind in ("read", "write")]
    assert len(alive) == len(read_all(tiny_model_dir))
    assert alive_shards() == set()


@pytest.mark.parametrize("bits,kind", [(4, "bitsandbytes"), (8, "FP8")])
def test_a_quantized_base_is_refused_in_one_line(tiny_model_dir, adapter_dir, tmp_path, bits, kind):
    """A 4-bit (bnb-4bit) or FP8 checkpoint as --base: one line saying the merge needs the bf16 base."""
    from llama_ft.quantize import quantize_checkpoint

    qdir = Path(quantize_checkpoint(tiny_model_dir, tmp_path / "q", bits=bits, progress=False)["output"])
    with pytest.raises(UserError, match=f"--base {qdir}: a {kind}.*needs the bf16 base") as e:
        merge_adapters(qdir, adapter_dir, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
