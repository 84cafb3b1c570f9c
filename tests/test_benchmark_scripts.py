"""The benchmark scripts run: a --smoke pass of benchmarks/fp8_lora_linear.py on the PyTorch reference path,
and its refusal (exit 2, one line) to run the real benchmark without a CUDA GPU. Times are not checked here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from proc import run_job

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "fp8_lora_linear.py"
METHODS = {"weight_only", "fp8_compute", "bf16_lora", "deepspeed_fp8"}


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the reference path: fast on CPU
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_fp8_lora_linear_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert set(report["methods"]) == METHODS and report["baseline"] == "bf16_lora"
    for key in ("device", "torch", "triton", "deepspeed", "date", "timing", "command"):
        assert report["header"][key], key
    rows = report["rows"]
    assert [(r["layer"], r["N"], r["K"]) for r in rows] == [("q_proj", 256, 256), ("gate_proj", 512, 256),
                                                             ("down_proj", 256, 512)]
    for row in rows:
        m, n, k, r = row["M"], row["N"], row["K"], row["r"]
        assert row["flop"] == 4 * m * n * k + 6 * m * r * (n + k)
        assert set(row["results"]) == METHODS
        for name, res in row["results"].items():
            if "unavailable" in res:
                assert isinstance(res["unavailable"], str) and res["unavailable"], (name, res)
                continue
            assert res["ms"] > 0 and math.isfinite(res["ms"]), (name, res)
            assert res["tflops"] == pytest.approx(row["flop"] / (res["ms"] * 1e-3) / 1e12)
            base = row["results"]["bf16_lora"]["ms"]
            assert res["speedup_vs_bf16_lora"] == pytest.approx(base / res["ms"])
        # ours and the baseline always run (the reference path on CPU); DeepSpeed's FP8 op has no CPU backend
        for name in ("weight_only", "fp8_compute", "bf16_lora"):
            assert "ms" in row["results"][name], (name, row["results"][name])
        if not torch.cuda.is_available():
            assert row["results"]["deepspeed_fp8"]["unavailable"]
        assert 0 < row["rel_err_weight_only"] <= 1e-2
        assert 0 < row["rel_err_fp8_compute"] <= 5e-2

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and "DeepSpeed OptimizedLinear FP8" in table[0]
    assert report["header"]["torch"] in proc.stdout.splitlines()[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA GPU")
def test_fp8_lora_linear_needs_cuda():
    proc = _run("--models", "70b")
    assert proc.returncode == 2
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert "needs a CUDA GPU" in last and "--smoke" in last
    assert sum("CUDA GPU" in line for line in proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_load_benchmark_smoke(tmp_path):
    """benchmarks/load.py on the tiny shape: our streaming loader at bf16 and at 4 bits on 2 ranks; the byte
    counts show what it does (each rank about half, once in all). The HF peer (--loaders hf) is left out for the
    suite's time: the GPU proof's dry run rehearses this script, and tests/test_loader.py checks `--loader hf`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llama-ft" / "torch_extensions"))
    out = tmp_path / "load.json"
    proc = run_job([sys.executable, str(REPO / "benchmarks" / "load.py"), "--shape", "tiny", "--dir", str(tmp_path),
                    "--loaders", "stream", "nf4", "--json", str(out)],
                   timeout=600, cwd=REPO, env=env)  # kills torchrun's ranks too on a timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| stream | all |" in proc.stdout and "| nf4 | all |" in proc.stdout
    report = json.loads(out.read_text())
    ckpt = report["checkpoint_bytes"]
    rows = {(r["loader"], r["rank"]): r for r in report["rows"]}
    stream = [rows[("stream", r)]["bytes_read"] for r in (0, 1)]
    assert sum(stream) <= 1.05 * ckpt and all(0.4 * ckpt <= b <= 0.6 * ckpt for b in stream)
    for r in report["rows"]:
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 0 and r["partition_bytes"] > 0
    # the frozen linears' partitions: bf16 2 bytes a weight; NF4 half a byte + an fp32 absmax per 64 = 0.5625
    h, i, kv, layers = 256, 768, 2 * 256 // 8, 4  # load.py's tiny shape: hidden, intermediate, kv width, layers
    weights = layers * (2 * h * h + 2 * kv * h + 3 * h * i)
    for loader, per_weight in (("stream", 2.0), ("nf4", 0.5 + 4 / 64)):
        held = [rows[(loader, r)]["frozen_linear_partition_bytes"] for r in (0, 1)]
        assert sum(held) == pytest.approx(per_weight * weights, rel=1e-3), loader  # ZeRO-3 pads to the ranks
        assert max(held) - min(held) <= 8 * layers * 7, loader
    for r in (0, 1):
        ratio = rows[("nf4", r)]["frozen_linear_partition_bytes"] / rows[("stream", r)]["frozen_linear_partition_bytes"]
        assert ratio == pytest.approx(0.5625 / 2, abs=2e-3)


# --- benchmarks/train_throughput.py, dpo_vs_trl.py and loss_memory.py: structure and consistency, not speed ---

TPUT = REPO / "benchmarks" / "train_throughput.py"
LOSS_MEM = REPO / "benchmarks" / "loss_memory.py"
DPO = REPO / "benchmarks" / "dpo_vs_trl.py"
TPUT_METHODS = ["ours_unpacked", "ours_packed", "ours_fp8", "ours_nf4", "hf", "hf_qlora", "trl_packed"]


def _bench_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llama-ft" / "torch_extensions"))
    return env


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    """--smoke: llama-ft unpacked and packed train the tiny shape on 2 ranks; every method is measured or says why
    not, and the figures are consistent with each other. The peers are left out for the suite's time: the GPU
    proof's dry run trains the HF Trainer (its throughput stage) and the FP8 and 4-bit methods with HF QLoRA;
    TRL's DPOTrainer runs in test_dpo_vs_trl_smoke."""
    out = tmp_path / "tput.json"
    proc = run_job([sys.executable, str(TPUT), "--smoke", "--methods", "ours_unpacked,ours_packed", "--dir",
                    str(tmp_path / "work"), "--json", str(out)],
                   timeout=600, cwd=REPO, env=_bench_env())  # kills the launchers' ranks too on a timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    head, cfg, data = report["header"], report["config"], report["data"]
    for key in ("device", "date", "torch", "deepspeed", "transformers", "peft", "trl", "command"):
        assert head[key], key
    assert cfg["shape"] == "tiny" and cfg["steps"] > cfg["warmup"] >= 1
    assert data["examples"] > 0 and 0.3 <= data["trained_share"] <= 0.6 and data["max"] <= cfg["seq"]
    assert list(report["methods"]) == TPUT_METHODS == list(report["method_labels"])

    measured = {}
    for name, res in report["methods"].items():
        assert "failed" not in res, (name, res)
        if "unavailable" in res:
            assert isinstance(res["unavailable"], str) and res["unavailable"], name
            continue
        measured[name] = res
        for key in ("trained_tokens_per_s", "tokens_per_s", "step_time_s", "tokens_per_step",
                    "trained_tokens_per_step", "peak_memory_bytes", "wall_s"):
            assert _positive(res[key]), (name, key, res[key])
        assert 0 <= res["padding_share"] < 1, name
        assert res["trained_tokens_per_s"] < res["tokens_per_s"], name
        assert res["measured_steps"] == [cfg["warmup"] + 1, cfg["steps"]]
        assert res["model_tflops_per_s"] == pytest.approx(cfg["model_flops_per_token"] * res["tokens_per_s"] / 1e12)
        assert len(res["steps"]) == cfg["steps"]
        for step in res["steps"]:  # per optimizer step, all ranks: trained <= non-pad <= all tokens
            assert 0 < step["trained"] <= step["nonpad"] <= step["tokens"] and step["time_s"] > 0, (name, step)
        steps = res["steps"][cfg["warmup"]:]
        seconds = sum(s["time_s"] for s in steps)
        assert res["trained_tokens_per_s"] == pytest.approx(sum(s["trained"] for s in steps) / seconds)
        assert res["padding_share"] == pytest.approx(1 - sum(s["nonpad"] for s in steps) /
                                                     sum(s["tokens"] for s in steps))
        assert len(res["peak_memory_bytes_per_rank"]) == cfg["nproc"]
        assert all(_positive(b) for b in res["peak_memory_bytes_per_rank"])
    assert set(measured) == {"ours_unpacked", "ours_packed"}, report["methods"]
    for name in ("ours_fp8", "ours_nf4", "hf", "hf_qlora", "trl_packed"):
        assert report["methods"][name] == {"unavailable": "not run (--methods)"}
    unpacked, packed = measured["ours_unpacked"], measured["ours_packed"]
    assert packed["padding_share"] < unpacked["padding_share"]

    ratios = report["ratios"]
    assert ratios["packed_vs_unpacked"] == pytest.approx(packed["trained_tokens_per_s"] /
                                                         unpacked["trained_tokens_per_s"])
    assert ratios["ours_packed_vs_hf"] is None and report["hf_batches_equal_ours_unpacked"] is None  # not run
    assert len(report["goals"]) == 3
    for goal in report["goals"]:
        assert goal["holds"] is None if goal["ratio"] is None else goal["holds"] == (goal["ratio"] >= goal["target"])

    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(TPUT_METHODS) and "trained tok/s" in rows[0] and "padding share" in rows[0]
    for label in report["method_labels"].values():
        assert any(row.startswith(f"| {label} |") for row in rows), label
    assert head["torch"] in proc.stdout.splitlines()[0] and head["command"] in proc.stdout


@pytest.mark.slow
def test_dpo_vs_trl_smoke(tmp_path):
    """--smoke: llama-ft --objective dpo unpacked and packed with the shared prompt, and TRL's DPOTrainer (where it
    imports) train the tiny shape on 2 ranks from the same pairs file; the figures are consistent with the per-step
    records, unpacked llama-ft and TRL train the same micro-batches token for token (TRL's sampler is the HF
    Trainer's, seeded like ours), and the shared-prompt rows hold fewer tokens per pair than both sides apart. Plain
    --packing (ours_packed) is left out for the suite's time: it is the shared-prompt method's row layout without
    the shared prompt, and tests/test_dpo_train.py trains it against float64."""
    import importlib.util

    out = tmp_path / "dpo.json"
    proc = run_job([sys.executable, str(DPO), "--smoke", "--methods", "ours,ours_shared,trl", "--dir",
                    str(tmp_path / "work"), "--json", str(out)], timeout=600, cwd=REPO, env=_bench_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    head, cfg, data, methods = report["header"], report["config"], report["data"], report["methods"]
    for key in ("device", "date", "torch", "deepspeed", "transformers", "peft", "trl", "command"):
        assert head[key], key
    assert cfg["shape"] == "tiny" and cfg["steps"] > cfg["warmup"] >= 1 and cfg["lora_dropout"] == 0
    assert data["pairs"] == cfg["steps"] * cfg["grad_accum"] * cfg["batch"] * cfg["nproc"]  # one pass, every pair
    assert 0 < data["trained_share"] < 1 and data["side_median"] <= data["side_max"]
    assert 0.5 < data["shared_prompt_share"] < 1  # each pair's prompt once: fewer tokens, every response kept
    assert data["side_max"] <= cfg["pack_len"]["ours_shared"] <= cfg["pack_len"]["ours_packed"]  # nothing cut
    # 6 FLOPs per frozen matmul weight (reference forward, policy forward, input gradient), 6 per LoRA weight
    d, r = cfg["dims"], cfg["lora_r"]
    h, layers, inter = d["hidden_size"], d["num_hidden_layers"], d["intermediate_size"]
    kv = d["num_key_value_heads"] * h // d["num_attention_heads"]
    frozen = cfg["params"] - d["vocab_size"] * h - (2 * layers + 1) * h  # all but the embedding and the norms
    lora = r * layers * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter))
    assert cfg["model_flops_per_token"] == 6 * frozen + 6 * lora
    assert list(methods) == ["ours", "ours_packed", "ours_shared", "trl"] == list(report["method_labels"])
    for name in ("ours", "ours_shared"):
        assert "pairs_per_s" in methods[name], methods[name]
    assert methods["ours_packed"] == {"unavailable": "not run (--methods)"}
    if importlib.util.find_spec("trl") is None:  # the row says why not
        assert "trl is not installed" in methods["trl"]["unavailable"]
    measured = {k: m for k, m in methods.items() if "pairs_per_s" in m}
    for name, res in measured.items():
        assert len(res["steps"]) == cfg["steps"] and res["measured_steps"] == [cfg["warmup"] + 1, cfg["steps"]]
        steps = res["steps"][cfg["warmup"]:]
        for s in res["steps"]:
            assert 0 < s["trained"] < s["nonpad"] <= s["tokens"], s
            if name in ("ours", "trl"):
                assert s["pairs"] == cfg["batch"] * cfg["nproc"], s
            else:  # one packed row per rank, of whole pairs
                assert cfg["nproc"] <= s["pairs"] and s["tokens"] <= cfg["nproc"] * 2 * cfg["pack_len"][name], s
        seconds = sum(s["time_s"] for s in steps)
        assert res["pairs_per_s"] == pytest.approx(sum(s["pairs"] for s in steps) / seconds)
        assert res["tokens_per_s"] == pytest.approx(sum(s["nonpad"] for s in steps) / seconds)
        assert len(res["peak_memory_bytes_per_rank"]) == cfg["nproc"]
        assert all(_positive(b) for b in res["peak_memory_bytes_per_rank"])
        assert res["rounds_pairs_per_s"] == [res["pairs_per_s"]]
    per_pair = {k: sum(s["nonpad"] for s in measured[k]["steps"]) / sum(s["pairs"] for s in measured[k]["steps"])
                for k in ("ours", "ours_shared")}
    assert per_pair["ours_shared"] < 0.9 * per_pair["ours"]  # each prompt once
    cmp = report["compare"]
    if "trl" in measured:
        trl = methods["trl"]
        assert cmp["same_batches"] is True and _positive(cmp["step_time_ratio_median"])
        for name in ("ours", "ours_shared"):
            m = cmp["per_method"][name]
            assert m["pairs_per_s_ratio"] == pytest.approx(methods[name]["pairs_per_s"] / trl["pairs_per_s"])
            assert m["round_ratios"] == [pytest.approx(m["pairs_per_s_ratio"])]  # one round
        ours = cmp["per_method"]["ours"]
        assert len(cmp["goals"]) == 4
        assert [g["holds"] for g in cmp["goals"][:2]] == [ours["pairs_per_s_ratio"] >= 1.3,
                                                          max(ours["memory_ratio_per_rank"]) < 1]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and "pairs/s" in rows[0]
    for label in report["method_labels"].values():
        assert any(row.startswith(f"| {label} |") for row in rows), label
    assert head["command"] in proc.stdout


def test_dpo_vs_trl_rounds_report_the_median_round():
    """--rounds: a method's row is its round with the median pairs/s (the lower middle one of an even count); a
    round that failed decides; the paired figure is the median over every measured step of TRL's time / ours, and
    each llama-ft method's ratio per round is its pairs/s over TRL's in that round."""
    sys.path.insert(0, str(DPO.parent))
    try:
        import dpo_vs_trl as dv
    finally:
        sys.path.remove(str(DPO.parent))

    def rec(pps: float, times: list[float], memory: float = 1.0) -> dict:
        return {"pairs_per_s": pps, "peak_memory_bytes_per_rank": [memory, memory], "steps": [
            {"time_s": t, "pairs": 4, "tokens": 10, "nonpad": 8, "trained": 4} for t in times]}

    three = [rec(1.0, [1, 1]), rec(3.0, [1, 1]), rec(2.0, [1, 1])]
    assert dv.median_round(three)["pairs_per_s"] == 2.0
    assert dv.median_round(three)["rounds_pairs_per_s"] == [1.0, 3.0, 2.0]
    assert dv.median_round(three[:2])["pairs_per_s"] == 1.0
    assert dv.median_round([three[0], {"failed": "x"}]) == {"failed": "x"}
    # two rounds, warmup 1: measured steps 2..3; TRL / ours per step: 2.0, 3.0 | 4.0, 0.5 -> median 2.5
    rounds = [{"ours": rec(1.0, [9, 1, 1]), "ours_packed": rec(0.6, [1, 1, 1]),
               "ours_shared": rec(1.5, [1, 1, 1], 0.5), "trl": rec(0.5, [9, 2, 3])},
              {"ours": rec(1.0, [9, 1, 4]), "ours_packed": {"failed": "x"},
               "ours_shared": rec(0.8, [1, 1, 1], 0.5), "trl": rec(0.4, [9, 4, 2])}]
    methods = {m: dv.median_round([r[m] for r in rounds]) for m in dv.METHODS}
    cmp = dv.compare(methods, rounds, 1)
    assert cmp["step_time_ratio_median"] == 2.5 and cmp["same_batches"]
    assert cmp["per_method"]["ours"]["pairs_per_s_ratio"] == 2.5  # median rounds: ours 1.0, TRL 0.4
    assert cmp["per_method"]["ours"]["round_ratios"] == [2.0, 2.5]
    assert "ours_packed" not in cmp["per_method"]  # a failed round decides: no figure
    shared = cmp["per_method"]["ours_shared"]
    assert shared["round_ratios"] == [3.0, 2.0] and shared["round_ratio_median"] == 2.5
    assert shared["pairs_per_s_ratio"] == 2.0 and shared["memory_ratio_per_rank"] == [0.5, 0.5]
    # ours: 2.5x pairs/s, memory equal (not below); shared: 2x, half the memory
    assert [g["holds"] for g in cmp["goals"]] == [True, False, True, True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA GPU")
@pytest.mark.parametrize("script", [TPUT, DPO])
def test_benchmark_8b_needs_cuda(tmp_path, script):
    proc = subprocess.run([sys.executable, str(script), "--shape", "8b", "--dir", str(tmp_path)], cwd=REPO,
                          env=_bench_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert "--shape 8b needs a CUDA GPU" in lines[-1]
    assert sum("CUDA" in line for line in lines) == 1
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("script,args,expect", [
    (TPUT, ["--steps", "0"], "--steps 0"),
    (TPUT, ["--steps", "3", "--warmup", "3"], "--warmup 3"),
    (TPUT, ["--methods", "ours,hf"], "--methods"),
    (TPUT, ["--offload-ratio", "1.5"], "--offload-ratio 1.5"),
    (DPO, ["--steps", "0"], "--steps 0"),
    (DPO, ["--methods", "ours,hf"], "--methods"),
    (DPO, ["--beta", "0"], "--beta 0"),
    (LOSS_MEM, ["--tokens", "1"], "--tokens 1"),
    (LOSS_MEM, ["--paths", "full,tiled"], "--paths"),
])
def test_benchmark_bad_input(script, args, expect):
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=_bench_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "error" in lines[0], proc.stderr


def test_loss_memory_smoke(tmp_path):
    """--smoke: both loss paths run in their own process on the same inputs, agree, and the chunked one peaks lower."""
    out = tmp_path / "loss.json"
    proc = subprocess.run([sys.executable, str(LOSS_MEM), "--smoke", "--json", str(out)], cwd=REPO, env=_bench_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("device", "date", "torch", "transformers", "command", "measure"):
        assert report["header"][key], key
    paths = report["paths"]
    assert set(paths) == {"full", "chunked"} == set(report["labels"])
    for name, res in paths.items():
        assert "failed" not in res, (name, res)
        if "unavailable" in res:
            assert res["unavailable"], name
            continue
        for key in ("peak_bytes", "seconds", "loss", "grad_norm"):
            assert _positive(res[key]), (name, key, res[key])
    assert "peak_bytes" in paths["chunked"]  # ours always runs
    if "peak_bytes" in paths["full"]:
        full, chunked = paths["full"], paths["chunked"]
        assert report["agree"] is True
        assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-3)
        assert report["ratio"] == pytest.approx(chunked["peak_bytes"] / full["peak_bytes"])
        assert chunked["peak_bytes"] < full["peak_bytes"]
        assert report["goal_holds"] == (report["ratio"] <= 1 / 8)
        # the full path holds at least the T x V fp32 logits; the chunked one far less
        assert full["peak_bytes"] >= report["full_logits_fp32_bytes"]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(paths) and "peak above baseline" in rows[0]


def test_model_flops_per_token_counts_every_weight_once():
    """4 FLOPs per frozen matmul weight (every parameter but the embedding and the norms) and 6 per LoRA weight:
    checked against the script's own parameter count, for the 8B shape and r=64."""
    sys.path.insert(0, str(TPUT.parent))
    try:
        import train_throughput as tp
    finally:
        sys.path.remove(str(TPUT.parent))
    dims = tp.SHAPES["8b"]
    h, layers = dims["hidden_size"], dims["num_hidden_layers"]
    matmul_weights = tp.parameter_count(dims) - dims["vocab_size"] * h - (2 * layers + 1) * h
    lora = 64 * layers * (2 * (h + h) + 2 * (h + 1024) + 3 * (h + dims["intermediate_size"]))
    assert tp.model_flops_per_token(dims, 64) == 4 * matmul_weights + 6 * lora
    # Llama 3.1 8B: 8.03e9 parameters, of which 7.50e9 are matmul weights (the embedding is 0.53e9); 0.17e9 LoRA
    assert 4 * 7.5e9 + 6 * 0.16e9 < tp.model_flops_per_token(dims, 64) < 4 * 7.51e9 + 6 * 0.17e9


# --- benchmarks/nf4_lora_linear.py: the 4-bit kernels vs PEFT + bitsandbytes (QLoRA), structure not speed ---

NF4_SCRIPT = REPO / "benchmarks" / "nf4_lora_linear.py"
NF4_METHODS = ["ours_nf4", "peft_qlora", "bnb_matmul", "bf16_lora"]


def test_nf4_lora_linear_smoke(tmp_path):
    """--smoke with TRITON_INTERPRET=1: our NF4 Triton kernels (interpreted) and the QLoRA path (PEFT's LoRA on a
    bitsandbytes Linear4bit, its CPU backend) both time one tiny q_proj step; figures agree with each other and
    both outputs are within bf16 rounding of float64 over their own dequantized weights."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "nf4.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(NF4_SCRIPT), "--smoke", "--layers", "q", "--warmup", "0", "--iters",
                           "1", "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["methods"]) == NF4_METHODS and report["baseline"] == "peft_qlora" and report["goal"] == 1.3
    for key in ("device", "torch", "triton", "bitsandbytes", "peft", "date", "timing", "command"):
        assert report["header"][key], key
    assert report["header"]["kernels"] == "Triton"  # the interpreter ran the kernels, not the PyTorch reference
    (row,) = report["rows"]
    m, n, k, r = row["M"], row["N"], row["K"], row["r"]
    assert (row["layer"], m, n, k, r) == ("q_proj", 64, 256, 256, 16)
    assert row["flop"] == 4 * m * n * k + 6 * m * r * (n + k)
    base = row["results"]["peft_qlora"]["ms"]
    for name in NF4_METHODS:
        res = row["results"][name]
        assert res["ms"] > 0 and math.isfinite(res["ms"]), (name, res)
        assert res["tflops"] == pytest.approx(row["flop"] / (res["ms"] * 1e-3) / 1e12)
        assert res["speedup_vs_peft_qlora"] == pytest.approx(base / res["ms"])
    for name in ("ours_nf4", "peft_qlora"):  # bf16 outputs: about 2^-9 relative is their rounding alone
        assert 0 < row["rel_err"][name] <= 1e-2, (name, row["rel_err"])
    up = report["summary"]["tiny"]["ours_vs_peft_qlora"]
    assert up == pytest.approx(row["results"]["ours_nf4"]["speedup_vs_peft_qlora"])
    assert report["summary"]["tiny"]["goal_1_3x"] is (up >= 1.3)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 and "PEFT LoRA on bnb Linear4bit (QLoRA)" in table[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA GPU")
def test_nf4_lora_linear_needs_cuda():
    proc = subprocess.run([sys.executable, str(NF4_SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert "needs a CUDA GPU" in lines[-1] and "--smoke" in lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("args,flag", [(["--bits", "16,3"], "--bits 16,3"), (["--bits", "x"], "--bits x"),
                                       (["--steps", "0"], "--steps 0")])
def test_real_checkpoint_bits_loss_bad_input(tmp_path, args, flag):
    """real_checkpoint.py --bits-loss refuses a precision it does not train (or no step) in one line, exit 2, before
    fetching or training anything."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_checkpoint.py"), "--bits-loss",
                           str(tmp_path / "out"), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert flag in last and "expected" in last
    assert not (tmp_path / "out").exists()
