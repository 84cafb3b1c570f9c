"""End to end on 2 real CPU ranks under DeepSpeed ZeRO-3, through run-llama.sh.

One default run (the embedded tiny Llama + bundled data, train then merge, --report_to tensorboard) serves most checks;
a second run resumes from its mid-way checkpoint and must reproduce it bit for bit.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from proc import run_job, run_jobs
from safetensors.torch import load_file
from test_reporting import expected_scalars, tensorboard_options, tensorboard_scalars
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_ft.data import IGNORE_INDEX, collate, load_rows, tokenize_rows, train_eval_split
from llama_ft.tiny import BUNDLED_DATASET

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
MAX_STEPS, SAVE_STEPS = 60, 30  # run-llama.sh's tiny defaults
EXT_DIR = str(Path.home() / ".cache" / "llama-ft" / "torch_extensions")  # run-llama.sh's default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TINY: list[Path] = []


def _seed_tiny(cache: Path) -> None:
    """Put the embedded tiny checkpoint into a test's fresh LLAMA_FT_CACHE. run-llama.sh would write it there
    itself at its first launch (make-tiny: a Python start that imports torch and transformers, about 4 s a test);
    it is the same bytes every time (seed 0), so one copy made in this process is copied instead."""
    target = cache / "tiny-llama"
    if (target / "model.safetensors.index.json").exists():
        return
    if not _TINY:
        from llama_ft.tiny import make_tiny_llama

        home = Path(tempfile.mkdtemp(prefix="llama-ft-tiny-"))
        atexit.register(shutil.rmtree, home, True)
        _TINY.append(make_tiny_llama(home / "tiny-llama"))
    shutil.copytree(_TINY[0], target)


def llama_env(tmp: Path, output: Path, merge_dir: Path | None = None, ds_config: str | None = None,
              nproc: int | None = None, model: Path | None = None, fresh: bool = False,
              **extra_env: str) -> dict[str, str]:
    """The environment run-llama.sh gets in these tests: the embedded default unless told otherwise. Its cache
    (LLAMA_FT_CACHE) is the test's own, holding the tiny checkpoint already unless `fresh` (a new machine's)."""
    if model is None and not fresh:
        _seed_tiny(tmp / "cache")
    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env.update(
        OUTPUT_DIR=str(output),
        LLAMA_FT_CACHE=str(tmp / "cache"),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", EXT_DIR),
        MASTER_PORT=str(_free_port()),
        PYTHON=sys.executable,
        DEEPSPEED=str(bindir / "deepspeed"),
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
    )
    for k in ("DATA", "MODEL", "MERGE_DIR", "DS_CONFIG", "NPROC", "HOSTFILE", "NODE_RANK", "MASTER_ADDR", "INCLUDE",
              "EXCLUDE"):
        env.pop(k, None)
    for k in [k for k in env if k.startswith("SLURM_")]:  # a suite run inside a Slurm job launches as outside one
        del env[k]
    env.pop("TRITON_INTERPRET", None)  # CPU ranks train through the PyTorch reference, not the interpreter
    if merge_dir is not None:
        env["MERGE_DIR"] = str(merge_dir)
    if ds_config is not None:
        env["DS_CONFIG"] = str(REPO / ds_config)
    if nproc is not None:
        env["NPROC"] = str(nproc)
    if model is not None:
        env["MODEL"] = str(model)
    env.update(extra_env)
    return env


def run_llama(tmp: Path, output: Path, *extra: str, check: bool = True, **env_kw) -> subprocess.CompletedProcess:
    proc = run_job(["bash", str(REPO / "run-llama.sh"), *extra], timeout=900, env=llama_env(tmp, output, **env_kw),
                   cwd=tmp)
    if check and proc.returncode != 0:
        raise AssertionError(f"run-llama.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


SHM = Path("/dev/shm")


# default_run (the embedded default run, 60 steps) is a session fixture in conftest.py: defined once there, so
# every module that uses it shares one run (a fixture imported into a second module would run again)


def test_default_run_leaves_no_shared_memory(default_run):
    """DeepSpeed's CPU all-reduce buffers (64 MiB of /dev/shm per rank) are unlinked once every rank maps them
    (llama_ft/ops.py unlink_shm_buffer); DeepSpeed itself never removes them."""
    assert not default_run["shm_left"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_default_run_outputs(default_run):
    out = default_run["out"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "train_results.json", "tokenizer.json", f"checkpoint-{SAVE_STEPS}", f"checkpoint-{MAX_STEPS}"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(load_file(str(out / "adapter_model.safetensors"))) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    # exact resume is tested where it is hardest: with offload, checkpointing and accumulation (below), on the
    # 4-bit base (below, and the signal chain of test_faults.py), requeued after faults (test_soak.py), and with
    # 3 ranks, packed rows and SP against a float64 reference (test_token_loss.py)
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    assert "[rank 0] INFO llama_ft: done: step 60" in default_run["log"]  # logs carry the rank
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == MAX_STEPS and results["world_size"] == 2
    state = json.loads((out / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == SAVE_STEPS and state["world_size"] == 2
    reports = [json.loads((out / f"load_report_rank{r}.json").read_text()) for r in (0, 1)]
    total = reports[0]["checkpoint_bytes"]
    assert sum(r["bytes_read"] for r in reports) <= 1.05 * total  # each byte read about once, by its owner
    assert all(0.4 * total <= r["bytes_read"] <= 0.6 * total and r["peak_rss_bytes"] > 0 for r in reports)
    assert "load: read" in default_run["log"]


def test_loss_falls(default_run):
    rows = _metrics(default_run["out"])
    train = [r["loss"] for r in rows if "loss" in r]
    assert len(train) == MAX_STEPS
    first, last = sum(train[:5]) / 5, sum(train[-5:]) / 5
    assert last < first - 1.0, (first, last)  # ~6.3 nats at random init
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]


def test_tensorboard_matches_metrics_jsonl(default_run):
    """--report_to tensorboard on 2 real ranks: one event file (rank 0's), whose scalars are metrics.jsonl's
    numbers at the same steps (as float32), and the run's options in the TEXT tab."""
    logdir = default_run["out"] / "tensorboard"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    got = tensorboard_scalars(logdir)
    assert got == expected_scalars(default_run["out"] / "metrics.jsonl", np.float32)
    assert got["train/loss"].keys() == set(range(1, MAX_STEPS + 1)) and got["eval/loss"].keys() == {30, 60}
    assert got["train/trained_tokens_per_s"][MAX_STEPS] > 0 and got["train/grad_norm"][1] > 0
    options = tensorboard_options(logdir)
    assert options["report_to"] == "tensorboard" and options["max_steps"] == MAX_STEPS and "data_sha256" in options


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


def _same_adapters(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_offload_checkpointing_accumulation_exact_resume(tmp_path):
    """CPU offload of params and optimizer (DeepSpeedCPUAdam), activation checkpointing and
    gradient accumulation: the run trains, and resuming mid-way reproduces it bit for bit."""
    flags = ("--max_steps", "6", "--save_steps", "3", "--gradient_checkpointing", "--gradient_accumulation_steps", "2",
             "--eval_dataset_size", "0")
    # A compile killed half-way leaves torch's build lock behind; it must not hang the run (llama_ft/ops.py).
    stale = Path(os.environ.get("TORCH_EXTENSIONS_DIR", EXT_DIR)) / "cpu_adam" / "lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    run_llama(tmp_path, tmp_path / "full", *flags, ds_config="ds_configs/zero3_offload.json")
    assert not stale.exists()
    run_llama(tmp_path, tmp_path / "resumed", *flags, "--resume_from_checkpoint", str(tmp_path / "full/checkpoint-3"),
              ds_config="ds_configs/zero3_offload.json")
    _same_adapters(tmp_path / "full", tmp_path / "resumed")
    losses = [r["loss"] for r in _metrics(tmp_path / "full")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [r["loss"] for r in _metrics(tmp_path / "resumed")] == losses[3:]  # the resumed run logs steps 4-6


def test_launcher_propagates_user_errors(tmp_path):
    proc = run_llama(tmp_path, tmp_path / "out", "--lora_r", "0", check=False)
    assert proc.returncode != 0
    assert "llama-ft: error: --lora_r 0: expected an integer > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _last_losses(out: Path, n: int = 5) -> float:
    losses = [r["loss"] for r in _metrics(out) if "loss" in r]
    return sum(losses[-n:]) / n


def _peft_eval_losses(model_dir: Path, out: Path) -> tuple[float, float, float]:
    """(base loss, base + adapters loss) of PEFT on the bf16 checkpoint over the eval batches, and the run's own
    eval_loss: a quantized run's adapters, loaded as plain PEFT adapters, must give the loss it reported."""
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
                                           out).eval()
    batch = _eval_batches(model_dir)
    adapted = _token_loss(peft_model, batch)
    with peft_model.disable_adapter():
        plain = _token_loss(peft_model, batch)
    return plain, adapted, json.loads((out / "train_results.json").read_text())["eval_loss"]


def test_fp8_training_matches_bf16(default_run):
    """--quantize --bits 8: same steps as the bf16 default run, final loss within 5% of it; the
    partitions hold half the bytes for the base linears; the adapters load on the bf16 base."""
    tmp, out = default_run["tmp"], default_run["out"]
    fp8_out = tmp / "fp8"
    run_llama(tmp, fp8_out, "--quantize", "--bits", "8")
    bf16_loss, fp8_loss = _last_losses(out), _last_losses(fp8_out)
    assert abs(fp8_loss - bf16_loss) <= 0.05 * bf16_loss, (fp8_loss, bf16_loss)
    held_bf16 = json.loads((out / "train_results.json").read_text())["partition_bytes_all_ranks"]
    held_fp8 = json.loads((fp8_out / "train_results.json").read_text())["partition_bytes_all_ranks"]
    assert 0.49 <= held_fp8["frozen_linear"] / held_bf16["frozen_linear"] <= 0.53, (held_fp8, held_bf16)
    assert held_fp8["lora"] == held_bf16["lora"] and held_fp8["frozen_other"] == held_bf16["frozen_other"]

    plain, adapted, fp8_eval = _peft_eval_losses(default_run["model"], fp8_out)
    assert plain - adapted > 0.5 and abs(adapted - fp8_eval) < 0.05 * fp8_eval


def test_nf4_training_learns(default_run):
    """--bits 4 (NF4 base, quantized on load), 12 steps: the first step's loss (B = 0: the base alone) is within 5%
    of the bf16 run's first step on the same batch (4-bit rounding of the base), and the run learns; the base
    linears' partitions hold 0.5625 bytes a weight (0.28x bf16); the adapters load on the bf16 base with PEFT and
    give the run's own eval loss; --generate_every samples on the 4-bit model. (Exact resume at 4 bits, after
    SIGTERM and kill -9 too: tests/test_faults.py, which trains on the NF4 base throughout.)"""
    tmp, out = default_run["tmp"], default_run["out"]
    nf4_out = tmp / "nf4"
    steps = ("--max_steps", "12", "--save_steps", "6", "--generate_every", "6", "--generate_max_new_tokens", "4")
    proc = run_llama(tmp, nf4_out, "--bits", "4", *steps)
    assert "(NF4)" in proc.stderr
    samples = [json.loads(ln) for ln in (nf4_out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [6, 6, 6, 12, 12, 12] and all(isinstance(s["completion"], str)
                                                                            for s in samples)
    bf16_losses = [r["loss"] for r in _metrics(out) if "loss" in r]
    nf4_losses = [r["loss"] for r in _metrics(nf4_out) if "loss" in r]
    assert abs(nf4_losses[0] - bf16_losses[0]) <= 0.05 * bf16_losses[0], (nf4_losses[0], bf16_losses[0])
    assert sum(nf4_losses[-3:]) / 3 < sum(nf4_losses[:3]) / 3 - 0.5, nf4_losses
    held_bf16 = json.loads((out / "train_results.json").read_text())["partition_bytes_all_ranks"]
    held_nf4 = json.loads((nf4_out / "train_results.json").read_text())["partition_bytes_all_ranks"]
    assert 0.27 <= held_nf4["frozen_linear"] / held_bf16["frozen_linear"] <= 0.30, (held_nf4, held_bf16)
    assert held_nf4["lora"] == held_bf16["lora"] and held_nf4["frozen_other"] == held_bf16["frozen_other"]

    plain, adapted, nf4_eval = _peft_eval_losses(default_run["model"], nf4_out)
    assert plain - adapted > 0.3 and abs(adapted - nf4_eval) < 0.05 * nf4_eval



TINY_FLAGS = ("--max_steps", "10", "--lora_r", "16", "--lora_alpha", "32", "--learning_rate", "5e-3",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--source_max_len", "256",
              "--target_max_len", "64", "--save_steps", "10", "--eval_dataset_size", "0", "--gradient_checkpointing",
              "false", "--max_grad_norm", "1.0")


def test_training_from_prequantized_equals_quantizing_on_load(default_run, tmp_path):
    """`llama-ft quantize` then train == train with --quantize from the bf16 checkpoint: same losses, adapters.
    The pre-quantized run also offloads half of the frozen base partitions, which must change nothing. Both run
    --fp8_compute (activations in FP8 too: on CPU the kernels' PyTorch reference), and it learns."""
    tiny = default_run["model"]
    q = subprocess.run([sys.executable, "-m", "llama_ft.cli", "quantize", "--model", str(tiny), "--output",
                        str(tmp_path / "fp8"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr
    run_llama(tmp_path, tmp_path / "on-load", *TINY_FLAGS, "--quantize", "--fp8_compute", model=tiny)
    run_llama(tmp_path, tmp_path / "pre", *TINY_FLAGS, "--quantize", "--fp8_compute", "--offload", "--offload_ratio",
              "0.5", model=tmp_path / "fp8")
    losses = [r["loss"] for r in _metrics(tmp_path / "on-load")]
    assert [r["loss"] for r in _metrics(tmp_path / "pre")] == losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    _same_adapters(tmp_path / "on-load", tmp_path / "pre")
    reports = [json.loads((tmp_path / "pre" / f"load_report_rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(r["bytes_read"] for r in reports) <= 1.05 * reports[0]["checkpoint_bytes"]
    for r in reports:
        off = r["extra"]["offload"]
        assert off["ratio"] == 0.5 and 0 < off["offloaded_tensors"] < 28  # of 2 layers x 7 linears x (bytes, scales)
        assert abs(off["offloaded_bytes"] - 0.5 * off["frozen_base_bytes"]) <= 0.25 * off["frozen_base_bytes"]


def test_two_nodes_without_ssh_match_one_node(default_run, tmp_path):
    """Two "nodes" on this machine, each its own launcher (DeepSpeed --no_ssh --node_rank), one CPU rank
    each, ZeRO-3: the run trains and its adapters are bit-identical to the 1-node x 2-rank default run."""
    hostfile = tmp_path / "two-nodes"
    hostfile.write_text("# two nodes, one rank each\nnode-a slots=1\nnode-b slots=1\n")
    port = str(_free_port())
    out = tmp_path / "two-node-out"
    # OMP_NUM_THREADS=1: as run-llama.sh sets for 2 local ranks on 2 cores
    nodes = [llama_env(tmp_path, out, HOSTFILE=str(hostfile), NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port, OMP_NUM_THREADS="1") for node_rank in (0, 1)]
    for p in run_jobs([(["bash", str(REPO / "run-llama.sh")], env) for env in nodes], timeout=900, cwd=tmp_path):
        assert p.returncode == 0, p.stderr[-5000:]
    assert json.loads((out / "train_results.json").read_text())["world_size"] == 2
    _same_adapters(default_run["out"], out)
    assert [r.get("loss", r.get("eval_loss")) for r in _metrics(out)] == \
        [r.get("loss", r.get("eval_loss")) for r in _metrics(default_run["out"])]


def test_unreachable_master_fails_fast_with_its_name(tmp_path):
    """A node whose MASTER_ADDR:MASTER_PORT nobody serves stops with one line naming them, not a hang."""
    hostfile = tmp_path / "two-nodes"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    proc = run_llama(tmp_path, tmp_path / "out", check=False, HOSTFILE=str(hostfile), NODE_RANK="1",
                     MASTER_ADDR="127.0.0.1", LLAMA_FT_MASTER_TIMEOUT="3")
    assert proc.returncode != 0
    assert "llama-ft: error: MASTER_ADDR=127.0.0.1 MASTER_PORT=" in proc.stderr
    assert "not reachable from rank 1 within 3 s" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("hostfile,env,needle", [
    ("localhost slots=8\nnode2 slot=8\n", {}, ":2: 'node2 slot=8': expected 'HOST slots=N'"),
    ("localhost slots=2\n", {"NPROC": "3"}, ":1: host 'localhost' has slots=2, fewer than the 3 ranks"),
    ("localhost slots=2\n", {"INCLUDE": "localhost:0,2"}, "slot 2 of host 'localhost' is outside its slots 0..1"),
    ("localhost slots=2\n", {"NODE_RANK": "0"}, "NODE_RANK=0 needs MASTER_ADDR"),
    ("a slots=1\nb slots=1\nc slots=1\n", {"NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1", "EXCLUDE": "b"},
     "NODE_RANK=2: expected 0..1, one per host the launch uses (a, c)"),
    ("localhost slots=2\n", {"NPROC": "two"}, "NPROC=two: expected an integer > 0"),
])
def test_bad_launch_requests_fail_before_launching(tmp_path, hostfile, env, needle):
    hf = tmp_path / "hostfile"
    hf.write_text(hostfile)
    proc = run_llama(tmp_path, tmp_path / "out", check=False, HOSTFILE=str(hf), **env)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
