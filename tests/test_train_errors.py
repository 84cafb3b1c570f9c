"""Bad input to training: one line naming the thing, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llama_ft.config import parse_train_args
from llama_ft.errors import UserError
from llama_ft.train.recipe import main as train_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) + "\n"
                         for i in range(8)))
    return p


def _fail(capsys, argv, needle: str) -> str:
    with pytest.raises(SystemExit) as e:
        train_main(argv)
    assert e.value.code == 2
    # progress log lines may come first; the error is one line, the last, and nothing else is printed
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "[rank 0] INFO" not in ln]
    assert len(err) == 1 and err[0].startswith("llama-ft: error: "), err
    assert needle in err[0], err[0]
    return err[0]


def _argv(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--max_steps", "2", *extra]


def _break_index(model: Path):
    (model / "model.safetensors.index.json").write_text("{ not json")


def _drop_shard(model: Path):
    (model / "model-00002-of-00006.safetensors").unlink()


def _truncate_shard(model: Path):
    p = model / "model-00003-of-00006.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def _no_config(model: Path):
    (model / "config.json").unlink()


def _index_misses_tensor(model: Path):
    idx = json.loads((model / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.norm.weight"]
    (model / "model.safetensors.index.json").write_text(json.dumps(idx))


def _wrong_shape(model: Path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (model / "config.json").write_text(json.dumps(cfg))


def _wrong_dtype(model: Path):
    from safetensors.torch import load_file, save_file

    idx = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / idx["weight_map"]["model.norm.weight"]
    tensors = load_file(str(shard))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _corrupt_header(model: Path):
    p = model / "model-00004-of-00006.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:24] = b"\xff" * 16  # header length intact, JSON destroyed
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize("breaker,needle", [
    (_wrong_dtype, "tensor 'model.norm.weight' has dtype I32, expected BF16/F16/F32"),
    (_corrupt_header, "model-00004-of-00006.safetensors: corrupt safetensors header"),
    (_break_index, "model.safetensors.index.json: safetensors index is not valid JSON"),
    (_drop_shard, "model-00002-of-00006.safetensors: shard named in"),
    (_truncate_shard, "model-00003-of-00006.safetensors: "),
    (_no_config, "config.json: missing"),
    (_index_misses_tensor, "lacks tensor 'model.norm.weight'"),
    (_wrong_shape, "config.json implies"),
])
def test_malformed_model_dir(capsys, model_copy, data_file, tmp_path, breaker, needle):
    breaker(model_copy)
    out = tmp_path / "out"
    _fail(capsys, _argv(model_copy, data_file, out), needle)
    assert not out.exists()


def test_missing_model_dir(capsys, data_file, tmp_path):
    _fail(capsys, _argv(tmp_path / "nope", data_file, tmp_path / "out"), "--model_name_or_path")


@pytest.mark.parametrize("content,needle", [
    (None, "data.jsonl"),  # file missing
    ("", "data.jsonl"),  # empty
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "line 2"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "line 2"),
])
def test_bad_dataset(capsys, tiny_model_dir, tmp_path, content, needle):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    msg = _fail(capsys, _argv(tiny_model_dir, data, tmp_path / "out"), needle)
    assert str(data) in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--dataset_format", "vicuna"], "--dataset_format"),
    (["--lora_r", "0"], "--lora_r"),
    (["--max_steps", "0"], "--max_steps"),
    (["--deepspeed", "nope.json"], "--deepspeed"),
])
def test_bad_flags(capsys, tiny_model_dir, data_file, tmp_path, extra, needle):
    _fail(capsys, _argv(tiny_model_dir, data_file, tmp_path / "out", *extra), needle)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir(capsys, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fail(capsys, _argv(tiny_model_dir, data_file, out), "--overwrite_output_dir")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llama_ft.cli", "train", "--model_name_or_path", str(tmp_path),
                           "--lora_r", "-1", "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["llama-ft: error: --lora_r -1: expected an integer > 0"], proc.stderr


def test_changed_chat_template_is_refused_on_resume(capsys, tiny_model_dir, tmp_path):
    """The template is compared by content: the same file path with other text is a different run."""
    from llama_ft.tiny import BUNDLED_CHAT_DATASET, LLAMA31_CHAT_TEMPLATE

    template = tmp_path / "t.jinja"
    template.write_text(LLAMA31_CHAT_TEMPLATE.read_text())
    import hashlib

    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    saved_sha = hashlib.sha256(b"{{ messages }}").hexdigest()
    state = {"global_step": 2, "epoch": 0, "micro_index": 2, "world_size": 1, "optimizer_step": 2,
             "lr_scheduler": {}, "options": {"chat_template_sha256": saved_sha}}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    _fail(capsys, _argv(tiny_model_dir, BUNDLED_CHAT_DATASET, tmp_path / "out", "--dataset_format", "chat",
                        "--chat_template", str(template), "--resume_from_checkpoint", str(ckpt)),
          "the chat template (--chat_template or the tokenizer's) differs")


def test_unknown_lora_target_caught_before_loading(capsys, tiny_model_dir, data_file, tmp_path):
    msg = _fail(capsys, _argv(tiny_model_dir, data_file, tmp_path / "out", "--lora_target_modules", "q_prj"),
                "--lora_target_modules")
    assert "q_prj" in msg and "q_proj" in msg


def test_dataset_too_small_for_the_batch(capsys, tiny_model_dir, data_file, tmp_path):
    _fail(capsys, _argv(tiny_model_dir, data_file, tmp_path / "out", "--per_device_train_batch_size", "9"),
          "--per_device_train_batch_size 9")


@pytest.mark.parametrize("saved,needle", [
    ({"lora_r": 32}, "--lora_r 32"),
    ({"world_size": 4}, "saved with 4 ranks"),
    ({"drop": "lr_scheduler"}, "missing fields"),
    ({"learning_rate": 1e-3}, "saved with --learning_rate 0.001, this run has 0.0002"),
    ({"lora_dropout": 0.0}, "saved with --lora_dropout 0.0, this run has 0.05"),
    ({"bf16": False}, "saved with --bf16 False, this run has True"),
    ({"fp8_compute": True}, "saved with --fp8_compute True"),
    ({"dataset_format": "input-output"}, "saved with --dataset_format 'input-output', this run has 'alpaca'"),
    ({"max_seq_len": 512}, "saved with --max_seq_len 512, this run has None"),
    ({"tokenizer_sha256": "0" * 64}, "the tokenizer (--tokenizer_name_or_path) differs from the one the checkpoint"),
])
def test_resume_mismatch_is_refused_before_start(capsys, tiny_model_dir, data_file, tmp_path, saved, needle):
    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    options = {"lora_r": 64, "lora_alpha": 16, "seed": 42}
    options.update({k: v for k, v in saved.items() if k not in ("world_size", "drop")})
    state = {"global_step": 2, "epoch": 0, "micro_index": 2, "world_size": saved.get("world_size", 1),
             "optimizer_step": 2, "lr_scheduler": {}, "options": options}
    state.pop(saved.get("drop", "none"), None)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    _fail(capsys, _argv(tiny_model_dir, data_file, tmp_path / "out", "--resume_from_checkpoint", str(ckpt)), needle)


def _fake_gpu(monkeypatch, name: str, cap: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


def test_fp8_compute_is_refused_on_a_gpu_without_fp8_tensor_cores(capsys, monkeypatch, model_copy, data_file,
                                                                    tmp_path):
    """An A100 (compute capability 8.0, faked): --quantize --fp8_compute stops before anything is built or launched,
    in one line that names the GPU and says what runs instead."""
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    out = tmp_path / "out"
    line = _fail(capsys, _argv(model_copy, data_file, out, "--quantize", "--fp8_compute"),
                 "--fp8_compute: NVIDIA A100-SXM4-80GB (compute capability 8.0) has no FP8 tensor cores")
    assert "--quantize alone runs weight-only FP8 on it (e4m3 weights decoded with integer operations" in line
    assert not out.exists()


@pytest.mark.parametrize("name,cap,fp8_compute,mode", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), False, "weight-only (e4m3 weights decoded with integer operations"),
    ("NVIDIA RTX A6000", (8, 6), False, "weight-only (e4m3 weights decoded with integer operations"),
    ("NVIDIA L40S", (8, 9), True, "fp8 compute"),
    ("NVIDIA H100 80GB HBM3", (9, 0), False, "weight-only (e4m3 weights converted by the hardware"),
])
def test_quantize_runs_on_every_supported_gpu(monkeypatch, caplog, name, cap, fp8_compute, mode):
    """--quantize is no longer refused below 8.9: weight-only mode decodes the e4m3 bytes itself there."""
    from llama_ft.train.recipe import check_fp8_mode

    _fake_gpu(monkeypatch, name, cap)
    cfg = SimpleNamespace(quantize=True, bits=8, fp8_compute=fp8_compute)
    with caplog.at_level("INFO", logger="llama_ft"):
        check_fp8_mode(cfg)
    assert f"FP8 on {name} (compute capability {cap[0]}.{cap[1]}): {mode}" in caplog.text


@pytest.fixture
def bnb_4bit(tiny_model_dir, tmp_path):
    from llama_ft.quantize import quantize_checkpoint

    return Path(quantize_checkpoint(tiny_model_dir, tmp_path / "nf4", bits=4, progress=False)["output"])


@pytest.mark.parametrize("extra,needle", [
    (("--bits", "8"), "--bits 8: {m} is a pre-quantized NF4 (bitsandbytes bnb-4bit) checkpoint, 4-bit"),
    (("--quantize", "--fp8_compute", "true"), "--fp8_compute: {m} holds NF4 weights (4-bit)"),
])
def test_a_bnb_4bit_checkpoint_refuses_8_bit_requests(capsys, bnb_4bit, data_file, tmp_path, extra, needle):
    """A bnb-4bit checkpoint implies --bits 4; asking for FP8 of it is one line before anything is built."""
    out = tmp_path / "out"
    _fail(capsys, _argv(bnb_4bit, data_file, out, *extra), needle.format(m=bnb_4bit))
    assert not out.exists()


def test_a_4bit_request_on_an_fp8_checkpoint_is_one_line(capsys, tiny_model_dir, data_file, tmp_path):
    from llama_ft.quantize import quantize_checkpoint

    fp8 = Path(quantize_checkpoint(tiny_model_dir, tmp_path / "fp8", progress=False)["output"])
    _fail(capsys, _argv(fp8, data_file, tmp_path / "out", "--bits", "4"),
          f"--bits 4: {fp8} is a pre-quantized FP8 (llama-ft quantize) checkpoint, 8-bit")


def test_fp8_compute_needs_fp8_weights_on_load_or_in_the_checkpoint(capsys, tiny_model_dir, data_file, tmp_path):
    """--fp8_compute on a bf16 checkpoint without --quantize is one line; on a pre-quantized FP8 checkpoint it needs
    no --quantize (the checkpoint implies it), in training as in `llama-ft plan`."""
    from llama_ft.plan.planner import quantized_bits
    from llama_ft.quantize import quantize_checkpoint
    from llama_ft.train.recipe import check_model_options

    out = tmp_path / "out"
    _fail(capsys, _argv(tiny_model_dir, data_file, out, "--fp8_compute", "true"), "--fp8_compute needs --quantize")
    assert not out.exists()
    fp8 = Path(quantize_checkpoint(tiny_model_dir, tmp_path / "fp8", progress=False)["output"])
    cfg = parse_train_args(_argv(fp8, data_file, out, "--fp8_compute", "true"))
    check_model_options(cfg, 1)
    assert cfg.quantize and cfg.bits == 8 and cfg.fp8_compute
    flags = SimpleNamespace(quantize=False, bits=None, fp8_compute=True)
    assert quantized_bits(flags, 8, "fp8") == (True, 8)
    with pytest.raises(UserError, match="--fp8_compute needs --quantize"):
        quantized_bits(flags, None, "bf16")
