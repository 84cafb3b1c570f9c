"""The memory planner against real CPU training runs: predicted (`llama-ft plan --device cpu`) vs measured peak RSS.

    python benchmarks/plan_vs_measured.py --json plan-vs-measured.json        # tiny and 1B shapes, bf16/FP8, +-ckpt
    python benchmarks/plan_vs_measured.py --shapes tiny --bases bf16 --json /tmp/tiny.json   # a few minutes
    python benchmarks/plan_vs_measured.py --baseline                          # measure the CPU rank baseline

Each run is `bash run-llama.sh` on 2 CPU ranks (DeepSpeed ZeRO-3, ds_configs/zero3.json), --max_steps steps on
the bundled alpaca data packed into rows of --seq tokens (--packing --max_seq_len SEQ --train_on_source: the
micro-batches have the length the plan assumes and every position is trained, so the planner's worst case is
the case run). Shapes:
    tiny   the embedded tiny Llama (llama-ft make-tiny: hidden 64, 2 layers), its checkpoint loaded
    1b     the Llama-3.2-1B shape (benchmarks/load.py SHAPES: hidden 2048, 16 layers, 32/8 heads, vocab 128256,
           tied embeddings), `--init random` (random weights built in the partitions: no checkpoint to write)
Bases: bf16 (frozen weights in bf16) and fp8 (--quantize); nf4 (--bits 4) on request. Gradient checkpointing off
and on.

Measured, per rank: the peak RSS of the rank process over its whole life (getrusage at exit, recorded by the
probe of bench_common.py on the ranks' PYTHONPATH), and the partition bytes the run reports
(train_results.json) against the plan's. Predicted: `llama-ft plan` with the same flags, --device cpu, the
per-rank total (every term in host memory, plus llama_ft/plan/planner.py CPU_RANK_BASELINE_BYTES). Error =
(predicted - measured) / measured, measured = the larger rank. Goal (DESIGN.md): within 15% on CPU.

--baseline measures what CPU_RANK_BASELINE_BYTES states: (1) torchrun runs 2 ranks of this script's worker,
which imports the recipe (torch, transformers, datasets, deepspeed), starts the gloo process group, builds a
one-layer model under zero.Init and runs a ZeRO-3 engine step, printing its peak RSS after the imports and at
the end; (2) the tiny run above, whose peak minus the plan's model terms (< 20 MiB) is a whole rank's baseline
(data pipeline, tokenizer, checkpoint saving and the loss plot included): the constant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import (
    PROBE_SOURCE,
    REPO,
    bench_env,
    free_port,
    read_probes,
    run_job,
    script_messages,
    stdout_to_stderr,
)

GiB = 2**30
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)  # benchmarks/load.py SHAPES["1b"]
SHAPE_DEFAULTS = {"tiny": dict(seq=256, batch=4, lora_r=16), "1b": dict(seq=512, batch=1, lora_r=64)}
NPROC = 2


log, die = script_messages("plan_vs_measured")


def host_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("/proc/meminfo has no MemTotal")


# ---------------------------------------------------------------------------------------------------------------
# model directories


def model_dir(shape: str, scratch: Path) -> tuple[Path, str]:
    """(model directory, --init) of a shape: the embedded tiny checkpoint, or config.json + tokenizer for 1b."""
    if shape == "tiny":
        from llama_ft.tiny import make_tiny_llama

        return make_tiny_llama(scratch / "tiny-llama"), "checkpoint"
    out = scratch / "llama-1b-shape"
    if not (out / "config.json").is_file():
        from transformers import LlamaConfig

        from llama_ft.tiny import build_tokenizer

        tok = build_tokenizer()
        config = LlamaConfig(**ONE_B, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype="bfloat16")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out, "random"


# ---------------------------------------------------------------------------------------------------------------
# one run


def training_flags(run: dict[str, Any], init: str, args: argparse.Namespace) -> list[str]:
    return ["--max_steps", str(args.steps), "--save_steps", str(args.steps), "--logging_steps", "1",
            "--eval_dataset_size", "0", "--per_device_train_batch_size", str(run["batch"]),
            "--gradient_accumulation_steps", "1", "--packing", "--max_seq_len", str(run["seq"]), "--train_on_source",
            "--lora_r", str(run["lora_r"]), "--lora_alpha", "16", "--lora_dropout", "0.05",
            "--gradient_checkpointing", str(run["checkpointing"]).lower(), "--quantize",
            str(run["base"] != "bf16").lower(), *(["--bits", "4"] if run["base"] == "nf4" else []),
            "--bf16", str(args.dtype == "bf16").lower(), "--init", init,
            "--learning_rate", "1e-4", "--overwrite_output_dir"]


def predict(model: Path, flags: list[str], host_gb: float) -> dict[str, Any]:
    """The plan of the run (--device cpu: per rank, every term in host memory)."""
    from llama_ft.plan.command import make_plan

    argv = ["--device", "cpu", "--nodes", "1", "--gpus_per_node", str(NPROC), "--host_memory_gb", f"{host_gb:.2f}",
            "--", "--model_name_or_path", str(model), "--deepspeed", "ds_configs/zero3.json", *flags]
    return make_plan(argv)[0]


def run_env(scratch: Path, probe_dir: Path, probe_out: Path, model: Path, output: Path) -> dict[str, str]:
    """bench_env's environment of benchmark ranks (no OMP setting: the ranks' own), without the planner's memory
    overrides, for one run-llama.sh job of NPROC ranks."""
    env = bench_env(REPO, scratch, probe_dir, probe_out, None)
    for k in ("LLAMA_FT_GPU_MEMORY_GB", "LLAMA_FT_HOST_MEMORY_GB"):
        env.pop(k, None)
    env.update(MODEL=str(model), OUTPUT_DIR=str(output), NPROC=str(NPROC), PYTHON=sys.executable,
               DEEPSPEED=str(Path(sys.executable).parent / "deepspeed"), MASTER_PORT=str(free_port()))
    return env


def measure(run: dict[str, Any], args: argparse.Namespace, probe_dir: Path, host_gb: float) -> dict[str, Any]:
    model, init = model_dir(run["shape"], args.dir)
    flags = training_flags(run, init, args)
    plan = predict(model, flags, host_gb)
    run_dir = args.dir / "runs" / run["name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    probe_out = run_dir / "probe"
    probe_out.mkdir(parents=True)
    env = run_env(args.dir, probe_dir, probe_out, model, run_dir / "output")
    cmd = ["bash", str(REPO / "run-llama.sh"), *flags]
    log(f"{run['name']}: {' '.join(cmd[:2])} {' '.join(flags)}")
    t0 = time.time()
    rc, _ = run_job(cmd, env, run_dir / "log.txt", args.timeout, run_dir)  # kills every rank at the timeout
    if rc != 0:
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{run['name']}: exit {rc}: {' | '.join(tail)} (log: {run_dir / 'log.txt'})")
    probes = read_probes(probe_out, NPROC)
    results = json.loads((run_dir / "output" / "train_results.json").read_text())
    loads = [json.loads((run_dir / "output" / f"load_report_rank{r}.json").read_text()) for r in range(NPROC)]
    measured = max(p["peak_rss_bytes"] for p in probes)
    predicted = plan["per_gpu"]["total_bytes"]
    held = results["partition_bytes_rank0"]
    return {**run, "flags": flags, "model_dir": str(model), "wall_s": time.time() - t0,
            "predicted_bytes": predicted, "measured_peak_rss_bytes": measured,
            "peak_rss_bytes_per_rank": [p["peak_rss_bytes"] for p in probes],
            "build_peak_rss_bytes_per_rank": [ld.get("peak_rss_bytes") for ld in loads],
            "error_pct": 100 * (predicted - measured) / measured,
            "implied_baseline_bytes": measured - (predicted - plan["per_gpu"]["process_baseline_bytes"]),
            "partitions_predicted_bytes": plan["per_gpu"]["base_partitions_bytes"] + plan["per_gpu"]["lora_bytes"],
            "partitions_recorded_bytes": held["frozen_linear"] + held["frozen_other"] + held["lora"],
            "plan": {k: plan[k] for k in ("per_gpu", "per_host", "peak_at", "moments", "inputs")}}


def runs_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for shape in args.shapes:
        for base in args.bases:
            for ckpt in args.checkpointing:
                d = SHAPE_DEFAULTS[shape]
                seq, batch = args.seq or d["seq"], args.batch or d["batch"]
                name = f"{shape}-{base}-{'ckpt' if ckpt else 'nockpt'}"
                out.append({"name": name, "shape": shape, "base": base, "checkpointing": ckpt, "seq": seq,
                            "batch": batch, "lora_r": args.lora_r or d["lora_r"], "dtype": args.dtype})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | predicted GiB/rank | measured peak RSS GiB (rank 0, 1) | error | partition bytes predicted / "
             "recorded |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | - | failed: {r['error'][:120]} | - | - |")
            continue
        per_rank = ", ".join(f"{b / GiB:.3f}" for b in r["peak_rss_bytes_per_rank"])
        lines.append(f"| {r['name']} | {r['predicted_bytes'] / GiB:.3f} | {per_rank} | {r['error_pct']:+.1f}% | "
                     f"{r['partitions_predicted_bytes']:,} / {r['partitions_recorded_bytes']:,} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the baseline worker (--baseline): imports + process group + ZeRO-3 engine, no model to speak of


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def baseline_worker(out_dir: Path) -> None:
    import deepspeed
    import torch

    import llama_ft.train.recipe  # noqa: F401 - what a rank imports: torch, transformers, datasets, deepspeed, ...

    after_imports = rss_now()
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=300))
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10**9}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = torch.nn.Linear(64, 64, bias=False)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    loss = engine(torch.randn(2, 64, dtype=torch.bfloat16)).float().sum()
    engine.backward(loss)
    engine.step()
    rank = int(os.environ["RANK"])
    (out_dir / f"baseline_rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "after_imports_bytes": after_imports, "after_engine_step_bytes": rss_now()}))


def measure_baseline(args: argparse.Namespace, probe_dir: Path, host_gb: float) -> dict[str, Any]:
    out = args.dir / "baseline"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = run_env(args.dir, probe_dir, out, REPO, out)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--master_port",
           str(free_port()), str(Path(__file__).resolve()), "--baseline-worker", str(out)]
    rc = run_job(cmd, env, out / "log.txt", args.timeout, out)
    if rc != 0:
        raise RuntimeError(f"baseline worker: exit {rc} (log: {out / 'log.txt'})")
    workers = [json.loads((out / f"baseline_rank{r}.json").read_text()) for r in range(NPROC)]
    tiny = measure({"name": "tiny-bf16-nockpt-baseline", "shape": "tiny", "base": "bf16", "checkpointing": False,
                    **SHAPE_DEFAULTS["tiny"], "dtype": args.dtype}, args, probe_dir, host_gb)
    return {"worker": workers, "tiny_run": tiny,
            "after_imports_bytes": max(w["after_imports_bytes"] for w in workers),
            "after_engine_step_bytes": max(w["after_engine_step_bytes"] for w in workers),
            "rank_baseline_bytes": tiny["implied_baseline_bytes"]}


# ---------------------------------------------------------------------------------------------------------------


def header() -> dict[str, Any]:
    import deepspeed
    import torch
    import transformers

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPE_DEFAULTS), default=["tiny", "1b"])
    ap.add_argument("--bases", nargs="+", choices=["bf16", "fp8", "nf4"], default=["bf16", "fp8"],
                    help="frozen base weights: bf16, fp8 (--quantize), nf4 (--bits 4)")
    ap.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"],
                    help="gradient checkpointing settings to run (default: off on)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per run (the peak is reached in the first)")
    ap.add_argument("--seq", type=int, help="tokens per packed row (default: tiny 256, 1b 512)")
    ap.add_argument("--batch", type=int, help="rows per micro-batch (default: tiny 4, 1b 1)")
    ap.add_argument("--lora_r", type=int, help="LoRA rank (default: tiny 16, 1b 64)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="training dtype (fp32: ~4x faster on "
                                                                             "CPUs without bf16 units)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llama-ft-planbench"), help="scratch directory")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    ap.add_argument("--json", type=Path, help="write everything here")
    ap.add_argument("--baseline", action="store_true", help="measure the CPU rank baseline instead")
    ap.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.checkpointing = [v == "on" for v in args.checkpointing]
    if args.steps < 1 or (args.seq is not None and args.seq < 16) or (args.batch is not None and args.batch < 1):
        die("--steps >= 1, --seq >= 16 and --batch >= 1 expected")
    if args.json is not None and not args.json.parent.is_dir():
        die(f"--json {args.json}: directory {args.json.parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_worker is not None:
        baseline_worker(args.baseline_worker)
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    probe_dir = args.dir / "probe-site"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE_SOURCE)
    host_gb = host_memory_gb()
    with stdout_to_stderr():  # stdout carries only the result; DeepSpeed's logger and op builds go to stderr
        report: dict[str, Any] = {"header": header()}
        if args.baseline:
            report["baseline"] = measure_baseline(args, probe_dir, host_gb)
        else:
            report["runs"] = []
            for run in runs_of(args):
                try:
                    report["runs"].append(measure(run, args, probe_dir, host_gb))
                except RuntimeError as e:
                    log(str(e))
                    report["runs"].append({**run, "error": str(e)})
    if args.baseline:
        b = report["baseline"]
        print(f"after imports {b['after_imports_bytes'] / GiB:.3f} GiB, after a ZeRO-3 engine step "
              f"{b['after_engine_step_bytes'] / GiB:.3f} GiB; a whole rank of the tiny run, less the plan's model "
              f"terms: {b['rank_baseline_bytes'] / GiB:.3f} GiB (CPU_RANK_BASELINE_BYTES)")
    else:
        print(table(report["runs"]))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if all("error" not in r for r in report.get("runs", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
