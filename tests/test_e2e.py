"""End to end on 2 real CPU ranks under DeepSpeed ZeRO-3, through run-llama.sh.

One default run (the embedded tiny Llama + bundled data, train then merge) serves most checks;
a second run resumes from its mid-way checkpoint and must reproduce it bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_ft.data import IGNORE_INDEX, collate, load_rows, tokenize_rows, train_eval_split
from llama_ft.tiny import BUNDLED_DATASET

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
MAX_STEPS, SAVE_STEPS = 60, 30  # run-llama.sh's tiny defaults


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_llama(tmp: Path, output: Path, *extra: str, merge_dir: Path | None = None) -> subprocess.CompletedProcess:
    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env.update(
        OUTPUT_DIR=str(output),
        LLAMA_FT_CACHE=str(tmp / "cache"),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                            str(Path.home() / ".cache" / "llama-ft" / "torch_extensions")),
        MASTER_PORT=str(_free_port()),
        PYTHON=sys.executable,
        DEEPSPEED=str(bindir / "deepspeed"),
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("MODEL", None)
    env.pop("DATA", None)
    if merge_dir is not None:
        env["MERGE_DIR"] = str(merge_dir)
    proc = subprocess.run(["bash", str(REPO / "run-llama.sh"), *extra], env=env, cwd=tmp, capture_output=True,
                          text=True, timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"run-llama.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    proc = run_llama(tmp, tmp / "output", merge_dir=tmp / "merged")
    return {"tmp": tmp, "out": tmp / "output", "merged": tmp / "merged", "model": tmp / "cache" / "tiny-llama",
            "log": proc.stderr}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_default_run_outputs(default_run):
    out = default_run["out"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "train_results.json", "tokenizer.json", f"checkpoint-{SAVE_STEPS}", f"checkpoint-{MAX_STEPS}"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    assert "[rank 0] INFO llama_ft: done: step 60" in default_run["log"]  # logs carry the rank
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == MAX_STEPS and results["world_size"] == 2
    state = json.loads((out / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == SAVE_STEPS and state["world_size"] == 2


def test_loss_falls(default_run):
    rows = _metrics(default_run["out"])
    train = [r["loss"] for r in rows if "loss" in r]
    assert len(train) == MAX_STEPS
    first, last = sum(train[:5]) / 5, sum(train[-5:]) / 5
    assert last < first - 1.0, (first, last)  # ~6.3 nats at random init
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]


def _eval_batches(model_dir: Path):
    """The run's eval split, rebuilt from the data module with run-llama.sh's tiny settings."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    ex = tokenize_rows(load_rows(str(BUNDLED_DATASET), "alpaca"), tok, 256, 64)
    _, eval_set = train_eval_split(ex, 16, 42)
    return collate(eval_set, tok.pad_token_id)


def _token_loss(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    return nll.item() / (labels != IGNORE_INDEX).sum().item()


def test_peft_round_trip_reproduces_trained_model(default_run):
    """PeftModel on the plain bf16 base gives the eval loss the ZeRO-3 engine measured at the end."""
    model_dir, out = default_run["model"], default_run["out"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    batch = _eval_batches(model_dir)
    trained_eval = json.loads((out / "train_results.json").read_text())["eval_loss"]
    peft_eval = _token_loss(peft_model, batch)
    with peft_model.disable_adapter():
        base_eval = _token_loss(peft_model, batch)
    assert abs(peft_eval - trained_eval) < 5e-3 * trained_eval, (peft_eval, trained_eval)
    assert base_eval - trained_eval > 0.5  # without the adapters the loss is far off


def test_merged_checkpoint_matches_peft(default_run):
    model_dir, out, merged = default_run["model"], default_run["out"], default_run["merged"]
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded like the base
    ids = _eval_batches(model_dir)["input_ids"][:4]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        got = merged_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    err, effect = (got - ref).abs().max().item(), (plain - ref).abs().max().item()
    # the merged weights are rounded to bf16; that rounding is all that may differ
    assert err < 0.05 * effect, (err, effect)
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


def test_exact_resume(default_run):
    """60 steps straight == 30 steps, checkpoint, resume for 30 more: bit-identical adapters and losses."""
    tmp, out = default_run["tmp"], default_run["out"]
    resumed = tmp / "resumed"
    run_llama(tmp, resumed, "--resume_from_checkpoint", str(out / f"checkpoint-{SAVE_STEPS}"))
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref = [r for r in _metrics(out) if r["step"] > SAVE_STEPS]
    got = [r for r in _metrics(resumed) if r["step"] > SAVE_STEPS]
    assert [r.get("loss", r.get("eval_loss")) for r in got] == [r.get("loss", r.get("eval_loss")) for r in ref]
