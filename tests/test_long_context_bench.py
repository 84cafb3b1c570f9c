"""benchmarks/long_context.py: the budget search against scripted measurements (no launch), bad input as one line,
and a --smoke run (SP=2 on 2 CPU ranks with every memory piece, two lengths) whose JSON must hang together. Times and
memory figures are not checked against goals here: they are the benchmark's output, not a test's."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from proc import run_job
from test_benchmark_scripts import _bench_env, _positive

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "long_context.py"
sys.path.append(str(SCRIPT.parent))
import long_context  # noqa: E402  - the benchmark module itself, for its search

GiB = 2**30


# --- the search, with measure() replaced by a table of peaks ---


def _search(monkeypatch, peaks_gib: dict[int, float | str], bisect: int = 0, config: str = "sp1", gpus: int = 0,
            cuda: bool = False):
    calls: list[int] = []

    def fake_measure(name, length, args, ctx):
        calls.append(length)
        peak = peaks_gib[length]
        if isinstance(peak, str):  # "oom" or "failed"
            return {"config": name, "seq_len": length, "status": peak, "under_budget": False, "error": peak}
        b = int(peak * GiB)
        return {"config": name, "seq_len": length, "status": "ok", "peak_bytes": b, "peak_bytes_per_rank": [b],
                "under_budget": b <= args.budget_gb * GiB}

    monkeypatch.setattr(long_context, "measure", fake_measure)
    args = argparse.Namespace(min_len=1024, max_len=16384, budget_gb=2.0, bisect=bisect, cuda=cuda, gpus=gpus)
    rows, result = long_context.search(config, args, {})
    assert [r["seq_len"] for r in rows] == calls
    return calls, result


def test_search_doubles_until_the_budget_is_passed(monkeypatch):
    calls, res = _search(monkeypatch, {1024: 1.0, 2048: 1.5, 4096: 2.5, 8192: 3.0})
    assert calls == [1024, 2048, 4096]  # stops at the first length over the budget
    assert res["longest_under_budget"] == 2048 and res["first_over_budget"] == 4096 and res["stopped_by"] == "budget"
    assert res["peak_bytes_at_longest"] == int(1.5 * GiB) and res["peak_bytes_at_first_over"] == int(2.5 * GiB)


def test_search_bisects_between_the_last_under_and_the_first_over(monkeypatch):
    peaks = {1024: 1.0, 2048: 1.5, 4096: 2.5, 3072: 1.9, 3584: 2.1, 3328: 2.0}
    calls, res = _search(monkeypatch, peaks, bisect=5)
    assert calls == [1024, 2048, 4096, 3072, 3584, 3328]  # then 256 tokens apart: the bisection's grain
    assert res["longest_under_budget"] == 3328 and res["first_over_budget"] == 3584 and res["stopped_by"] == "budget"
    calls, res = _search(monkeypatch, peaks, bisect=1)
    assert calls == [1024, 2048, 4096, 3072] and res["longest_under_budget"] == 3072


def test_search_stops_at_max_len_and_on_failure(monkeypatch):
    calls, res = _search(monkeypatch, {1024: 1.0, 2048: 1.0, 4096: 1.0, 8192: 1.0, 16384: 1.0}, bisect=2)
    assert calls == [1024, 2048, 4096, 8192, 16384]
    assert res["longest_under_budget"] == 16384 and res["first_over_budget"] is None and res["stopped_by"] == "max_len"
    calls, res = _search(monkeypatch, {1024: 1.0, 2048: "oom"})  # died of memory: over the budget, not a failure
    assert res["first_over_budget"] == 2048 and res["stopped_by"] == "budget"
    assert res["peak_bytes_at_first_over"] is None
    calls, res = _search(monkeypatch, {1024: 1.0, 2048: "failed"})
    assert calls == [1024, 2048] and res["stopped_by"] == "failure" and res["first_over_budget"] is None
    calls, res = _search(monkeypatch, {1024: 3.0})
    assert res["longest_under_budget"] is None and res["first_over_budget"] == 1024


def test_search_says_why_sp2_cannot_run_on_one_gpu(monkeypatch):
    calls, res = _search(monkeypatch, {}, config="sp2", cuda=True, gpus=1)
    assert calls == [] and res["unavailable"] == "needs 2 GPUs, 1 here"


# --- bad input ---


@pytest.mark.parametrize("args,expect", [
    (["--steps", "1"], "--steps 1"),
    (["--budget_gb", "0"], "--budget_gb 0"),
    (["--budget_gb", "1000"], "--budget_gb 1000"),
    (["--min_len", "4096", "--max_len", "1024"], "--max_len 1024"),
    (["--configs", "sp1,sp3"], "--configs"),
    (["--bisect", "-1"], "--bisect -1"),
    (["--chunk", "0"], "--chunk 0"),
])
def test_bad_input_is_one_line(tmp_path, args, expect):
    if torch.cuda.is_available() and "1000" in args:
        pytest.skip("the host-memory cap applies to CPU ranks only")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--dir", str(tmp_path / "w"), "--json",
                           str(tmp_path / "r.json")], cwd=REPO, env=_bench_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("long_context.py: error: ") and expect in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA GPU")
def test_8b_needs_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "8b", "--dir", str(tmp_path / "w")], cwd=REPO,
                          env=_bench_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--shape 8b needs a CUDA GPU" in lines[0]
    assert not list(tmp_path.iterdir())


# --- the smoke run ---


@pytest.mark.slow
def test_long_context_smoke(tmp_path):
    """--smoke at one length (--max_len 256; the search over lengths is tested above with scripted peaks): one SP=2
    run with every memory piece, whose row, budget verdict and table must hang together."""
    out = tmp_path / "longctx.json"
    proc = run_job([sys.executable, str(SCRIPT), "--smoke", "--max_len", "256", "--dir", str(tmp_path / "work"),
                    "--json", str(out)], timeout=600, cwd=REPO, env=_bench_env())  # kills the ranks too on a timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    head, cfg, rows, budget = report["header"], report["config"], report["rows"], report["budget"]
    for key in ("device", "date", "torch", "deepspeed", "transformers", "command"):
        assert head[key], key
    assert cfg["shape"] == "tiny" and cfg["configs"] == ["sp2_all"] and cfg["gradient_checkpointing"] is True
    assert cfg["steps"] >= 2 and cfg["warmup_steps"] == 1
    limit = cfg["budget_gb"] * GiB

    assert rows and {r["config"] for r in rows} == set(cfg["configs"])
    for r in rows:
        assert r["status"] == "ok", r
        sp = cfg["config_flags"][r["config"]]["sp"]
        assert r["nproc"] == r["sp"] == sp == 2  # an SP=2 row is a 2-rank run and reports both ranks
        assert len(r["peak_bytes_per_rank"]) == len(r["peak_rss_bytes_per_rank"]) == sp
        assert all(_positive(b) for b in r["peak_bytes_per_rank"] + r["peak_rss_bytes_per_rank"])
        assert r["peak_bytes"] == max(r["peak_bytes_per_rank"])
        assert all(b > 0.2 * GiB for b in r["peak_rss_bytes_per_rank"])  # a real rank: torch + DeepSpeed alone
        assert len(r["step_times_s"]) == cfg["steps"] and all(_positive(t) for t in r["step_times_s"])
        assert r["step_time_s"] == pytest.approx(sum(r["step_times_s"][1:]) / (cfg["steps"] - 1))
        assert r["tokens_per_s"] == pytest.approx(r["seq_len"] / r["step_time_s"])
        # one sequence of exactly L tokens per step, every position with a next token trained (all ranks together)
        assert r["trained_tokens_per_step"] == [r["seq_len"] - 1] * cfg["steps"]
        assert r["under_budget"] == (r["peak_bytes"] <= limit)
        assert "--sequence_parallel_size 2" in r["command"] and "--tiled_mlp" in r["command"]
        assert "--activation_offload" in r["command"] and "--gradient_checkpointing true" in r["command"]

    assert set(budget) == set(cfg["configs"])
    for name, res in budget.items():
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: r["seq_len"])
        assert res["lengths_run"] == [r["seq_len"] for r in mine] == [cfg["min_len"]] == [256]
        over = [r["seq_len"] for r in mine if not r["under_budget"]]
        first_over = min(over) if over else None
        under = [r for r in mine if r["under_budget"] and (first_over is None or r["seq_len"] < first_over)]
        assert res["first_over_budget"] == first_over
        assert res["longest_under_budget"] == (max(r["seq_len"] for r in under) if under else None)
        if under:
            at = {r["seq_len"]: r for r in mine}
            assert res["peak_bytes_at_longest"] == at[res["longest_under_budget"]]["peak_bytes"] <= limit
        assert res["stopped_by"] == ("budget" if first_over else "max_len")

    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert any(ln.startswith("| SP=2, + tiled loss + tiled MLP + offload | 2 |") for ln in table)
    assert "| configuration | ranks | L=256 |" in table
    assert head["torch"] in proc.stdout.splitlines()[0] and head["command"] in proc.stdout
