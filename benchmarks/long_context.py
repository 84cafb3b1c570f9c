"""Long context (issue 13): peak memory per rank and step time vs sequence length, with and without Ulysses
sequence parallelism (SP=1 on 1 rank, SP=2 on 2 ranks), the tiled MLP, the tiled loss and activation offload;
and the longest sequence that stays under a per-rank memory budget.

    python benchmarks/long_context.py --json longctx.json                 # CPU: small Llama shape, fp32, 2 cores
    python benchmarks/long_context.py --shape 8b --json longctx-8b.json   # GPU: Llama 3.1 8B shape, bf16
    python benchmarks/long_context.py --smoke --json /tmp/smoke.json      # a check of the script, about a minute

One measurement = one `bash run-llama.sh` launch (DeepSpeed ZeRO-3, ds_configs/zero3.json, `--init random` on a
generated config-only model: random weights built straight into the partitions, no checkpoint), NPROC = the SP
size (so every rank of a run belongs to the one sequence-parallel group), training --steps optimizer steps on
one sequence per step: per-device batch 1, no accumulation, and examples of EXACTLY the length L being measured
(synthetic input-output rows of single-token words, BOS + input + output + EOS = L tokens, checked by tokenizing
them), `--train_on_source` so all L - 1 positions with a next token are trained (the loss's worst case). LoRA
r=--lora_r on q,k,v,o,gate,up,down, dropout 0 (the tiled MLP needs it), sdpa attention, `--force` (the
pre-launch memory plan does not veto a run: the measurement decides).

Gradient checkpointing is ON in every configuration, since activation offload needs it; the baseline is
therefore "checkpointing, nothing else". Configurations (--configs):

    sp1            SP=1, loss in one chunk (--loss_chunk_size L: the whole sequence's logits at once)
    sp1_loss       SP=1, tiled loss (--loss_chunk_size --chunk, default 1024 tokens)
    sp1_loss_mlp   SP=1, tiled loss + tiled MLP (--tiled_mlp: DeepSpeed TiledMLP, ~hidden_size tokens a slice)
    sp1_all        SP=1, tiled loss + tiled MLP + activation offload (--activation_offload: save_on_cpu of the
                   checkpoints)
    sp2            SP=2 (--sequence_parallel_size 2, Ulysses: each rank holds L/2 of the sequence), one chunk
    sp2_all        SP=2 with the tiled loss, tiled MLP and activation offload

Measured per run:
    peak memory    per rank: on CPU the peak RSS of the rank's process over its whole life (VmHWM, from
                   getrusage at exit: the probe of bench_common.py on the ranks' PYTHONPATH, as in
                   plan_vs_measured.py and train_throughput.py), so it includes the process's baseline (torch,
                   transformers, DeepSpeed, the model build: about 0.6 GiB here); on GPU
                   torch.cuda.max_memory_allocated of the rank, recorded by the same probe
    step time      the mean wall time of optimizer steps 2..--steps (step 1 is the warm-up), from the run's own
                   metrics.jsonl (--logging_steps 1: each logging window is one step)
    tokens/s       L / step time: tokens of the sequence per second, for the whole SP group

On CPU ranks host memory IS the device memory: activation offload copies the checkpoints from "device" to
"host" memory of the same process, so it saves nothing there and its rows show only its cost (time, and the
copies' own transient memory). Its saving is a GPU measurement.

The budget search (--budget_gb, per rank): per configuration, L = --min_len, 2 --min_len, 4 --min_len, ... up to
--max_len, stopping at the first L whose measured peak (the larger rank) passes the budget, or whose run dies of
memory (a CUDA out-of-memory error, or a rank SIGKILLed: the kernel's OOM killer); then --bisect steps between
the longest L under the budget and the first over it (midpoints rounded to 256 tokens). Reported: the longest
L measured under the budget, the first over it, and what stopped the search (budget, --max_len, failure). The
table's lengths are the ones the search visited, so a configuration that passed the budget early has no figures
at the longer lengths.

Shapes: tiny (hidden 64, 2 layers, 4/2 heads, vocab 2048; --smoke), small (hidden 256, intermediate 896, 2
layers, 4/2 heads of 64, vocab 8192: the vocabulary / hidden ratio of Llama 3.1 8B, 32, so the loss's share of
activation memory is Llama's; the CPU default, fp32, as bf16 matmuls are slow on these CPUs), 8b (Llama 3.1 8B:
hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256; needs CUDA, bf16). max_position_embeddings
is set to max(131072, --max_len) in the generated config (rope positions past Llama's 131072 only matter for
the numbers the random model computes, not for memory or time).

Output: a markdown table on stdout (progress and the runs' logs on stderr / in --dir), --json everything.
Exit 0 when every run ran (a run over the budget or out of memory is a result), 1 when one failed otherwise,
2 on bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_common import (
    REPO,
    bench_env,
    deepspeed_launcher,
    exact_length_rows,
    failure_reason,
    free_port,
    install_probe,
    metrics_steps,
    read_probes,
    remove_shm_buffers,
    run_header,
    run_job,
    script_messages,
    stdout_to_stderr,
    write_json,
    write_jsonl,
    write_model_dir,
)

GiB = 2**30
LLAMA_POSITIONS = 131072
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "small": dict(hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=8192),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


@dataclass(frozen=True)
class Config:
    sp: int
    tiled_loss: bool
    tiled_mlp: bool
    offload: bool
    label: str


CONFIGS: dict[str, Config] = {
    "sp1": Config(1, False, False, False, "SP=1, checkpointing only"),
    "sp1_loss": Config(1, True, False, False, "SP=1, + tiled loss"),
    "sp1_loss_mlp": Config(1, True, True, False, "SP=1, + tiled loss + tiled MLP"),
    "sp1_all": Config(1, True, True, True, "SP=1, + tiled loss + tiled MLP + offload"),
    "sp2": Config(2, False, False, False, "SP=2, checkpointing only"),
    "sp2_all": Config(2, True, True, True, "SP=2, + tiled loss + tiled MLP + offload"),
}
# Per mode: CPU (small shape), GPU (8b), --smoke (tiny). budget_gb None on GPU: the device's memory.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": dict(shape="small", min_len=1024, max_len=8192, budget_gb=1.2, steps=3, bisect=0, chunk=1024,
                lora_r=16, timeout=1200.0, configs=",".join(CONFIGS)),
    "gpu": dict(shape="8b", min_len=16384, max_len=524288, budget_gb=None, steps=3, bisect=2, chunk=1024,
                lora_r=16, timeout=3600.0, configs=",".join(CONFIGS)),
    "smoke": dict(shape="tiny", min_len=256, max_len=512, budget_gb=6.0, steps=2, bisect=0, chunk=64, lora_r=8,
                  timeout=300.0, configs="sp2_all"),
}
EXAMPLES = 2  # rows of length L in each data file (batch 1, one per step; the stream wraps around)
BISECT_GRAIN = 256
OOM_PATTERNS = (r"CUDA out of memory", r"OutOfMemoryError", r"return code = -9\b", r"exits with return code = -9",
                r"Killed\b")


log, die = script_messages("long_context")  # die: bad input, one line, exit code 2


# ---------------------------------------------------------------------------------------------------------------
# one run


def data_file(args: argparse.Namespace, tokenizer: Any, length: int) -> Path:
    """EXAMPLES input-output rows of exactly `length` tokens each (half prompt, half response)."""
    import numpy as np

    path = args.dir / f"data-L{length}.jsonl"
    if not path.exists():
        source = length // 2
        rows = exact_length_rows(tokenizer, [source] * EXAMPLES, [length - source] * EXAMPLES,
                                 np.random.default_rng(length))
        write_jsonl(path, rows)
    return path


def training_flags(args: argparse.Namespace, config: Config, length: int) -> list[str]:
    flags = ["--dataset_format", "input-output", "--source_max_len", str(length), "--target_max_len", str(length),
             "--max_seq_len", str(length), "--train_on_source", "--per_device_train_batch_size", "1",
             "--gradient_accumulation_steps", "1", "--max_steps", str(args.steps), "--save_steps", str(args.steps),
             "--logging_steps", "1", "--eval_dataset_size", "0", "--bf16", str(args.cuda).lower(),
             "--gradient_checkpointing", "true", "--lora_r", str(args.lora_r), "--lora_alpha", "16",
             "--lora_dropout", "0", "--learning_rate", "1e-4", "--warmup_ratio", "0", "--attn_implementation",
             "sdpa", "--init", "random", "--overwrite_output_dir", "--force",
             "--loss_chunk_size", str(args.chunk if config.tiled_loss else length)]
    if config.sp > 1:
        flags += ["--sequence_parallel_size", str(config.sp)]
    if config.tiled_mlp:
        flags.append("--tiled_mlp")
    if config.offload:
        flags.append("--activation_offload")
    return flags


def died_of_memory(rc: int, log_path: Path) -> bool:
    text = log_path.read_text(errors="replace")
    return rc in (-9, 137) or any(re.search(p, text) for p in OOM_PATTERNS)


def measure(name: str, length: int, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """One launch: `name` at `length` tokens. The row has status ok, oom (died of memory) or failed."""
    config = CONFIGS[name]
    run_dir = args.dir / "runs" / f"{name}-L{length}"
    shutil.rmtree(run_dir, ignore_errors=True)
    probe_out = run_dir / "probe"
    probe_out.mkdir(parents=True)
    env = bench_env(REPO, args.dir, ctx["probe_dir"], probe_out,
                    None if args.cuda else max(1, (os.cpu_count() or 2) // config.sp))
    port = free_port()
    env.update(MODEL=str(ctx["model_dir"]), DATA=str(data_file(args, ctx["tokenizer"], length)),
               OUTPUT_DIR=str(run_dir / "output"), NPROC=str(config.sp), PYTHON=sys.executable,
               DEEPSPEED=deepspeed_launcher(args.dir), MASTER_PORT=str(port))
    flags = training_flags(args, config, length)
    cmd = ["bash", str(REPO / "run-llama.sh"), *flags]
    shown = " ".join(f"{k}={env[k]}" for k in ("MODEL", "DATA", "NPROC", "OMP_NUM_THREADS") if k in env)
    row: dict[str, Any] = {"config": name, "label": config.label, "sp": config.sp, "nproc": config.sp,
                           "seq_len": length, "command": f"{shown} bash run-llama.sh {' '.join(flags)}",
                           "log": str(run_dir / "log.txt")}
    log(f"{name} L={length}: {row['command']}")
    rc, wall = run_job(cmd, env, run_dir / "log.txt", args.timeout, cwd=run_dir)
    remove_shm_buffers(port)  # DeepSpeed's CPU all-reduce buffers of this job, 64 MiB each in RAM
    row["wall_s"] = wall
    if rc != 0:
        oom = rc != 124 and died_of_memory(rc, run_dir / "log.txt")
        row.update(status="oom" if oom else "failed", error=failure_reason(rc, run_dir / "log.txt", args.timeout),
                   under_budget=False)
        log(f"{name} L={length}: {row['status']}: {row['error']}")
        return row
    steps = metrics_steps(run_dir / "output" / "metrics.jsonl", args.steps)
    probes = read_probes(probe_out, config.sp)
    key = "cuda_max_allocated_bytes" if args.cuda else "peak_rss_bytes"
    peaks = [int(p[key]) for p in probes]
    loads = [json.loads((run_dir / "output" / f"load_report_rank{r}.json").read_text()) for r in range(config.sp)]
    measured = [s["time_s"] for s in steps[1:]]
    step_time = sum(measured) / len(measured)
    row.update(status="ok", peak_memory_kind=key, peak_bytes_per_rank=peaks, peak_bytes=max(peaks),
               peak_rss_bytes_per_rank=[int(p["peak_rss_bytes"]) for p in probes],
               build_peak_rss_bytes_per_rank=[ld.get("peak_rss_bytes") for ld in loads],
               step_times_s=[s["time_s"] for s in steps], step_time_s=step_time, tokens_per_s=length / step_time,
               trained_tokens_per_step=[s["trained_tokens"] for s in steps],
               under_budget=max(peaks) <= args.budget_gb * GiB)
    log(f"{name} L={length}: peak {', '.join(f'{b / GiB:.2f}' for b in peaks)} GiB, step {step_time:.2f} s")
    return row


# ---------------------------------------------------------------------------------------------------------------
# the search


def search(name: str, args: argparse.Namespace, ctx: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of one configuration (doubling from --min_len, then --bisect steps) and its budget result."""
    config = CONFIGS[name]
    if args.cuda and config.sp > args.gpus:
        why = f"needs {config.sp} GPUs, {args.gpus} here"
        log(f"{name}: unavailable: {why}")
        return [], {"config": name, "unavailable": why}
    rows: list[dict[str, Any]] = []
    under: int | None = None
    over: int | None = None
    stopped = "max_len"
    length = args.min_len
    while length <= args.max_len:
        row = measure(name, length, args, ctx)
        rows.append(row)
        if row["status"] == "failed":
            stopped = "failure"
            break
        if not row["under_budget"]:
            over, stopped = length, "budget"
            break
        under = length
        length *= 2
    for _ in range(args.bisect):
        if under is None or over is None or over - under <= BISECT_GRAIN:
            break
        mid = (under + over) // 2 // BISECT_GRAIN * BISECT_GRAIN
        if mid <= under:
            break
        row = measure(name, mid, args, ctx)
        rows.append(row)
        if row["status"] == "failed":
            stopped = "failure"
            break
        if row["under_budget"]:
            under = mid
        else:
            over = mid
    at = {r["seq_len"]: r for r in rows}
    result = {"config": name, "longest_under_budget": under, "first_over_budget": over, "stopped_by": stopped,
              "lengths_run": sorted(at),
              "peak_bytes_at_longest": at[under]["peak_bytes"] if under is not None else None,
              "peak_bytes_at_first_over": at[over].get("peak_bytes") if over is not None else None}
    return rows, result


# ---------------------------------------------------------------------------------------------------------------
# output


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return "out of memory" if row["status"] == "oom" else "failed"
    peaks = " / ".join(f"{b / GiB:.2f}" for b in row["peak_bytes_per_rank"])
    over = "" if row["under_budget"] else " (over)"
    return f"{peaks} GiB{over}, {row['step_time_s']:.2f} s"


def markdown(report: dict[str, Any]) -> str:
    h, c = report["header"], report["config"]
    d = c["dims"]
    mem = "torch.cuda.max_memory_allocated" if c["cuda"] else "peak RSS (VmHWM) of the rank's process"
    lengths = sorted({r["seq_len"] for r in report["rows"]})
    out = [f"Long context: {h['device']}; {h['date']}; torch {h['torch']}, deepspeed {h['deepspeed']}, "
           f"transformers {h['transformers']}",
           f"`{h['command']}`",
           f"shape {c['shape']} (hidden {d['hidden_size']}, {d['num_hidden_layers']} layers, "
           f"{d['num_attention_heads']}/{d['num_key_value_heads']} heads, intermediate {d['intermediate_size']}, "
           f"vocab {d['vocab_size']}), {c['dtype']}, LoRA r={c['lora_r']} on q,k,v,o,gate,up,down, ZeRO-3, one "
           f"sequence of L tokens per step, every position trained; gradient checkpointing ON in every "
           f"configuration (activation offload needs it); tiled loss = {c['chunk']}-token chunks, otherwise one "
           f"chunk of L; {c['steps']} steps, step time = mean of steps 2..{c['steps']}",
           f"cell: peak memory per rank GiB ({mem}; rank 0 / rank 1 for SP=2), step time; budget "
           f"{c['budget_gb']:g} GiB per rank; '-': not run (the search had stopped)",
           "",
           "| configuration | ranks | " + " | ".join(f"L={n:,}" for n in lengths) + " |",
           "|---|--:|" + "--:|" * len(lengths)]
    for name in c["configs"]:
        res = report["budget"][name]
        if "unavailable" in res:
            out.append(f"| {CONFIGS[name].label} | {CONFIGS[name].sp} | unavailable: {res['unavailable']} |")
            continue
        at = {r["seq_len"]: r for r in report["rows"] if r["config"] == name}
        out.append(f"| {CONFIGS[name].label} | {CONFIGS[name].sp} | " +
                   " | ".join(cell(at.get(n)) for n in lengths) + " |")
    out += ["", f"| configuration | longest L under {c['budget_gb']:g} GiB per rank | its peak GiB | first L over | "
                "its peak GiB | search stopped by |", "|---|--:|--:|--:|--:|---|"]
    for name in c["configs"]:
        res = report["budget"][name]
        if "unavailable" in res:
            continue

        def gib(b: int | None) -> str:
            return "-" if b is None else f"{b / GiB:.2f}"

        longest = "none" if res["longest_under_budget"] is None else f"{res['longest_under_budget']:,}"
        if res["stopped_by"] == "max_len" and res["longest_under_budget"] is not None:
            longest = f">= {longest} (--max_len)"
        first = "-" if res["first_over_budget"] is None else f"{res['first_over_budget']:,}"
        out.append(f"| {CONFIGS[name].label} | {longest} | {gib(res['peak_bytes_at_longest'])} | {first} | "
                   f"{gib(res['peak_bytes_at_first_over'])} | {res['stopped_by']} |")
    failed = [r for r in report["rows"] if r["status"] == "failed"]
    if failed:
        out += [""] + [f"- {r['config']} L={r['seq_len']} failed: {r['error']}" for r in failed]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# arguments and main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="model shape; default small on CPU, 8b on GPU, tiny "
                                                           "with --smoke")
    ap.add_argument("--configs", help=f"comma list of {','.join(CONFIGS)}; default all (--smoke: sp2_all)")
    ap.add_argument("--min_len", type=int, help="first sequence length; default 1024 on CPU, 16384 on GPU")
    ap.add_argument("--max_len", type=int, help="longest sequence length tried; default 8192 on CPU, 524288 on GPU")
    ap.add_argument("--budget_gb", type=float, help="memory budget per rank, GiB; default 1.2 on CPU, the GPU's "
                                                    "memory on GPU")
    ap.add_argument("--bisect", type=int, help="bisection steps after the doubling; default 0 on CPU, 2 on GPU")
    ap.add_argument("--steps", type=int, help="optimizer steps per run, the first a warm-up; default 3")
    ap.add_argument("--chunk", type=int, help="--loss_chunk_size of the tiled loss; default 1024")
    ap.add_argument("--lora_r", type=int, help="LoRA rank; default 16")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llama-ft-longctx"), help="scratch directory")
    ap.add_argument("--timeout", type=float, help="seconds per run before it is killed; default 1200 (GPU 3600)")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, lengths 256 and 512, sp2_all: a check")
    args = ap.parse_args(argv)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Defaults for the mode (needs torch: CUDA or not), then every bad value as one line, before any work."""
    import torch

    args.cuda = torch.cuda.is_available()
    if args.shape == "8b" and not args.cuda:
        die("--shape 8b needs a CUDA GPU (none found); on CPU use --shape small (the default) or --smoke")
    mode = "smoke" if args.smoke else "gpu" if args.cuda else "cpu"
    for key, value in DEFAULTS[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shape == "8b" and args.smoke:
        die("--shape 8b with --smoke: the smoke run uses the tiny shape")
    args.gpus = torch.cuda.device_count() if args.cuda else 0
    if args.budget_gb is None:
        args.budget_gb = torch.cuda.get_device_properties(0).total_memory / GiB
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        die(f"--configs {args.configs!r}: expected a comma list of {', '.join(CONFIGS)}")
    args.configs = [n for n in CONFIGS if n in names]
    if args.min_len < 64:
        die(f"--min_len {args.min_len}: expected a length >= 64 tokens")
    if args.max_len < args.min_len:
        die(f"--max_len {args.max_len}: expected a length >= --min_len {args.min_len}")
    if not (args.budget_gb > 0 and math.isfinite(args.budget_gb)):
        die(f"--budget_gb {args.budget_gb}: expected a number of GiB > 0")
    if not args.cuda:  # the search runs until a rank passes the budget: two such ranks must fit this machine
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
        if 2 * args.budget_gb > 0.6 * total:
            die(f"--budget_gb {args.budget_gb:g}: expected at most {0.3 * total:.1f} GiB per rank on this "
                f"{total:.0f} GiB machine (2 ranks may pass it before the search stops)")
    if args.steps < 2:
        die(f"--steps {args.steps}: expected >= 2 (the first step is a warm-up, not measured)")
    if args.bisect < 0:
        die(f"--bisect {args.bisect}: expected a number of steps >= 0")
    if args.chunk < 1:
        die(f"--chunk {args.chunk}: expected a number of tokens >= 1")
    if args.lora_r < 1:
        die(f"--lora_r {args.lora_r}: expected an integer >= 1")
    if args.timeout <= 0:
        die(f"--timeout {args.timeout:g}: expected a number of seconds > 0")
    if args.json is not None and not args.json.parent.is_dir():
        die(f"--json {args.json}: directory {args.json.parent} does not exist")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark (module doc); returns the report, written to --json too."""
    args.dir = args.dir.resolve()
    args.dir.mkdir(parents=True, exist_ok=True)
    head = run_header(args.cuda)
    log(f"{head['device']}, shape {args.shape}, configurations {','.join(args.configs)}, L {args.min_len}.."
        f"{args.max_len}, budget {args.budget_gb:g} GiB per rank, scratch {args.dir}")

    from llama_ft.data import load_tokenizer

    dims = {**SHAPES[args.shape], "max_position_embeddings": max(LLAMA_POSITIONS, args.max_len)}
    model_dir = args.dir / f"model-{args.shape}"
    dims = write_model_dir(model_dir, dims, "bfloat16" if args.cuda else "float32")
    ctx = {"model_dir": model_dir, "tokenizer": load_tokenizer(str(model_dir)),
           "probe_dir": install_probe(args.dir / "probe-site")}
    rows: list[dict[str, Any]] = []
    budget: dict[str, dict[str, Any]] = {}
    for name in args.configs:
        got, budget[name] = search(name, args, ctx)
        rows += got
    config = {"shape": args.shape, "dims": dims, "cuda": args.cuda, "dtype": "bf16" if args.cuda else "fp32",
              "configs": args.configs, "config_flags": {n: vars(CONFIGS[n]) for n in args.configs},
              "min_len": args.min_len, "max_len": args.max_len, "budget_gb": args.budget_gb, "bisect": args.bisect,
              "steps": args.steps, "warmup_steps": 1, "chunk": args.chunk, "lora_r": args.lora_r,
              "gradient_checkpointing": True, "batch_per_sp_group": 1,
              "peak_memory": "cuda_max_allocated_bytes" if args.cuda else "peak_rss_bytes"}
    report = {"header": head, "config": config, "rows": rows, "budget": budget}
    if args.json:
        write_json(args.json, report)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    with stdout_to_stderr():
        report = run(args)
    print(markdown(report), flush=True)
    return 1 if any(r["status"] == "failed" for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
