"""Training throughput on long-tailed data: llama-ft (unpacked, packed) vs HF Trainer + PEFT vs TRL SFTTrainer.

    python benchmarks/train_throughput.py --json tput.json                     # CPU: small Llama shape, 2 ranks, fp32
    python benchmarks/train_throughput.py --shape 8b --json tput-8b.json       # GPU: Llama 3.1 8B shape, all GPUs, bf16
    python benchmarks/train_throughput.py --smoke --json /tmp/smoke.json       # a minute-long check of the script
    python benchmarks/train_throughput.py --trl-python /tmp/bench/venv-trl/bin/python ...   # TRL from another env
    python benchmarks/train_throughput.py --shape 70b --methods ours_fp8 --nproc 1 --batch 1 --seq 2048 \
        --gradient-checkpointing --offload-ratio auto --steps 4 --json cap.json   # 70B shape, FP8, one GPU

TRL is not a llama-ft dependency; to add it without touching the project's environment (trl 1.16 was used):
    python3 -m venv /tmp/bench/venv-trl
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/bench/venv-trl/lib/python3.11/site-packages/main.pth
    /tmp/bench/venv-trl/bin/pip install --no-deps trl

One run trains the same model shape (random weights: `--init random` for llama-ft, `from_config` under
zero.Init for the peers), on the same tokenized examples, with the same ranks, batch flag, sequence
length, LoRA (r, alpha, dropout 0.05 on q,k,v,o,gate,up,down), optimizer and DeepSpeed ZeRO-3 config
(ds_configs/zero3.json with its "auto" fields filled by llama-ft's own `fill_ds_config`), for --steps
optimizer steps, once per method, one method at a time:

    ours_unpacked  `bash run-llama.sh` (deepspeed launcher, `python -m llama_ft.train`): right-padded
                   micro-batches of --batch examples, the chunked token-weighted loss
    ours_packed    the same with `--packing --max_seq_len SEQ`: --batch rows of up to SEQ tokens, whole
                   examples best-fit packed, position_ids restart per example, no padding inside a row
    ours_fp8       ours_packed with `--quantize --bits 8`: FP8 e4m3 frozen base weights, multiplied by the
                   Triton kernels on a GPU (the PyTorch reference on CPU). Only when --methods names it
    ours_nf4       ours_packed with `--quantize --bits 4`: NF4 frozen base weights (QLoRA's 4-bit format, blocks
                   of 64), decoded inside the Triton GEMMs on a GPU. Only when --methods names it
    hf             transformers Trainer + PEFT `get_peft_model` + the same ZeRO-3 dict through transformers'
                   own DeepSpeed integration (`TrainingArguments(deepspeed=dict)`), launched with torchrun,
                   DataCollatorForSeq2Seq (right padding), no length grouping (transformers 5:
                   train_sampling_strategy "random"): what users run today. On CPU ranks the Trainer needs
                   use_cpu=True (accelerate runs DeepSpeed only on an accelerator) and deepspeed.init_distributed()
                   first; the worker checks after training that every parameter is a ZeRO-3 one
    hf_qlora       the QLoRA path: HF Trainer + PEFT `get_peft_model` on a base whose seven linears are bitsandbytes
                   `Linear4bit` (nf4, double-quantized absmax, compute in the run's dtype: the modules
                   `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=
                   "nf4", bnb_4bit_use_double_quant=True))` builds; here built from_config with random weights and
                   quantized in place by bitsandbytes, as there is no checkpoint), DataCollatorForSeq2Seq, on the
                   device directly: NO DeepSpeed (bitsandbytes' 4-bit parameters are not ZeRO-3 partitioned;
                   QLoRA on one GPU runs without it), torchrun DDP when --nproc > 1. No
                   prepare_model_for_kbit_training (it casts embeddings, norms and head to fp32; llama-ft keeps
                   them in the run's dtype). Needs bitsandbytes. Only when --methods names it
    trl_packed     TRL `SFTTrainer(packing=True)` (its default "bfd" strategy, padding-free: the rows of a
                   micro-batch are concatenated into one sequence with position_ids), same ZeRO-3 dict, torchrun.
                   TRL is not a llama-ft dependency: it runs where `--trl-python` (default: this interpreter)
                   imports `trl`; otherwise the row says why not

The peers run as `python benchmarks/train_throughput.py --worker hf|trl --config FILE` on every rank; a
Trainer subclass records each micro-batch's tokens and a TrainerCallback each optimizer step's end time,
and each rank writes them as JSON. llama-ft's figures come from its own metrics.jsonl (logging every step:
the step's trained tokens and wall time), and the tokens of its micro-batches (padding included) from its
own deterministic batch stream (`llama_ft.data.MicroBatches`), checked against metrics.jsonl.

Data: --examples synthetic input-output rows written from --seed: lengths lognormal (median 150 tokens,
sigma 0.75, clipped to [16, min(1000, SEQ)]: like alpaca, long-tailed), 30-60% of each example's tokens
in the response (trained), texts built from words the tiny byte-level BPE tokenizer (llama-ft make-tiny, 384
tokens) encodes as one token each, so every example has exactly its drawn length. All methods get the same
examples: the ones llama-ft tokenizes (BOS + prompt, response + EOS, labels -100 on the prompt).

Measured per method over steps W+1..N (the first --warmup W steps excluded, the same for every method):
    trained tok/s   tokens with a label (label != -100 after the shift: the tokens the loss trains), all
                    ranks, divided by the wall time of those steps
    all tok/s       non-pad tokens (prompt + response), all ranks, per second
    step s          mean wall time of one optimizer step (rank 0: end of step to end of step)
    padding share   pad tokens / all tokens of the micro-batches (input_ids.numel())
    model TFLOP/s   model_flops_per_token x all tok/s: the matmul FLOPs of the weights (4 per frozen weight,
                    6 per LoRA weight, per token; no attention scores, no recompute), the same count for
                    every method, FP8 included (MFU = this / the device's dense bf16 peak)
    peak memory     per rank: peak host RSS of the rank's process (getrusage, whole run) on CPU;
                    torch.cuda.max_memory_allocated on GPU. Recorded at exit by a probe (a sitecustomize
                    module put on the ranks' PYTHONPATH), the same way for every method
Goals (issue): packed >= 2x unpacked trained tok/s on this data; ours (packed) >= 1.5x HF's (the unpacked ratio
is printed too); ours packed >= TRL packed. The figures are whatever is measured; nothing is tuned per method.

Shapes: tiny (hidden 64, 2 layers; --smoke), small (hidden 512, 4 layers, 8/2 heads, intermediate 1536, vocab 384:
the CPU run, fp32), 8b (Llama 3.1 8B: hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256;
needs CUDA, bf16), 70b (Llama 3.1 70B: hidden 8192, 80 layers, 64/8 heads, intermediate 28672; needs CUDA).
Output: a markdown table on stdout (progress and logs on stderr), --json everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import (
    PROBE_ENV,
    REPO,
    bench_env,
    deepspeed_launcher,
    exact_length_rows,
    failure_reason,
    free_port,
    install_probe,
    metrics_steps,
    package_version,
    print_report,
    read_probes,
    run_header,
    run_job,
    script_messages,
    write_jsonl,
    write_model_dir,
)

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=4096),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=131072, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, max_position_embeddings=131072, vocab_size=128256),
}
METHODS = {
    "ours_unpacked": "llama-ft, unpacked (right-padded)",
    "ours_packed": "llama-ft, packed (--packing)",
    "ours_fp8": "llama-ft, packed, FP8 base weights (--quantize)",
    "ours_nf4": "llama-ft, packed, NF4 base weights (--quantize --bits 4)",
    "hf": "HF Trainer + PEFT + ZeRO-3 (DataCollatorForSeq2Seq)",
    "hf_qlora": "HF Trainer + PEFT on bitsandbytes NF4 (QLoRA, no ZeRO-3)",
    "trl_packed": "TRL SFTTrainer, packing=True",
}
OURS = ("ours_unpacked", "ours_packed", "ours_fp8", "ours_nf4")
DEFAULT_METHODS = ("ours_unpacked", "ours_packed", "hf", "trl_packed")  # the quantized ones only when asked for
GPU_SHAPES = ("8b", "70b")
DEFAULTS = dict(steps=12, warmup=2, batch=4, seq=1024, grad_accum=1, lora_r=64, lora_alpha=16.0, timeout=1800)
SMOKE_DEFAULTS = dict(shape="tiny", steps=4, warmup=2, batch=2, seq=256, lora_r=8, lora_alpha=16.0, timeout=300)
LORA_DROPOUT = 0.05
LEARNING_RATE = 1e-4
WARMUP_RATIO = 0.03
MEDIAN_TOKENS, SIGMA, MIN_TOKENS, MAX_TOKENS = 150, 0.75, 16, 1000
TRAINED_SHARE = (0.3, 0.6)

class Unavailable(Exception):
    """A method that cannot run here; the message is the reason shown in its row."""


# under the name of the script that runs: dpo_vs_trl.py shares the checks, and its launches (made here) log as it
log, die = script_messages()


# ---------------------------------------------------------------------------------------------------------------
# model directory and data


def parameter_count(dims: dict[str, Any]) -> int:
    h, i, layers, v = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"], dims["vocab_size"]
    kv = dims["num_key_value_heads"] * (h // dims["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * per_layer + 2 * v * h + h


def write_dataset(path: Path, tokenizer: Any, n: int, seed: int, max_tokens: int) -> None:
    """`n` input-output rows (module doc): example i has exactly its drawn number of tokens under llama-ft's
    tokenization (BOS + input, output + EOS); checked by tokenizing every text."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = np.clip(np.rint(rng.lognormal(math.log(MEDIAN_TOKENS), SIGMA, n)), MIN_TOKENS, max_tokens).astype(int)
    share = rng.uniform(*TRAINED_SHARE, n)
    target = np.clip(np.rint(total * share), 2, total - 2).astype(int)
    source = total - target
    write_jsonl(path, exact_length_rows(tokenizer, source.tolist(), target.tolist(), rng))


def percentile(values: list[int], q: float) -> float:
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))])


# ---------------------------------------------------------------------------------------------------------------
# launching jobs


def base_env(args: argparse.Namespace, probe_dir: Path, probe_out: Path) -> dict[str, str]:
    omp = None if args.cuda else max(1, (os.cpu_count() or 2) // args.nproc)
    return bench_env(REPO, args.dir, probe_dir, probe_out, omp)


# ---------------------------------------------------------------------------------------------------------------
# llama-ft runs


def ours_flags(args: argparse.Namespace, method: str) -> list[str]:
    """Training flags of a llama-ft run (after run-llama.sh's defaults: they override them); for a peer's method,
    the flags its ZeRO-3 config is filled from (no packing, FP8 or offload: the peers have none of them)."""
    flags = ["--dataset_format", "input-output", "--source_max_len", str(args.seq), "--target_max_len", str(args.seq),
             "--max_seq_len", str(args.seq), "--per_device_train_batch_size", str(args.batch),
             "--gradient_accumulation_steps", str(args.grad_accum), "--max_steps", str(args.steps),
             "--save_steps", str(args.steps), "--logging_steps", "1", "--eval_dataset_size", "0",
             "--bf16", str(args.bf16).lower(), "--gradient_checkpointing", str(args.gradient_checkpointing).lower(),
             "--lora_r", str(args.lora_r), "--lora_alpha", str(args.lora_alpha), "--lora_dropout", str(LORA_DROPOUT),
             "--learning_rate", str(LEARNING_RATE), "--lr_scheduler_type", "linear", "--warmup_ratio",
             str(WARMUP_RATIO), "--max_grad_norm", "0.3", "--attn_implementation", args.attn, "--init", "random",
             "--seed", str(args.seed), "--overwrite_output_dir"]
    if method in ("ours_packed", "ours_fp8", "ours_nf4"):
        flags.append("--packing")
    if method == "ours_fp8":
        flags += ["--quantize", "--bits", "8"]
    if method == "ours_nf4":
        flags += ["--quantize", "--bits", "4"]
    if method in OURS and args.offload_ratio is not None:
        flags += ["--offload", "--offload_ratio", args.offload_ratio]
    return flags


def ours_batches(examples: Any, args: argparse.Namespace, pad_id: int, packed: bool) -> list[dict[str, int]]:
    """Per optimizer step, summed over ranks and accumulation: tokens (input_ids.numel()), non-pad and trained
    tokens of the micro-batches llama-ft trains on (its own deterministic stream, data/batches.py)."""
    from llama_ft.data import MicroBatches
    from llama_ft.train.loss import trained_count

    streams = [MicroBatches(examples, args.nproc, r, args.batch, args.seed, pad_id,
                            pack_len=args.seq if packed else None) for r in range(args.nproc)]
    steps = []
    for _ in range(args.steps):
        s = {"tokens": 0, "nonpad": 0, "trained": 0}
        for stream in streams:
            for _ in range(args.grad_accum):
                b = next(stream)
                s["tokens"] += b["input_ids"].numel()
                s["nonpad"] += int(b["attention_mask"].sum())
                s["trained"] += trained_count(b["labels"])
        steps.append(s)
    return steps


def launch_ours(method: str, args: argparse.Namespace, ctx: dict[str, Any], flags: list[str]) -> dict[str, Any]:
    """`bash run-llama.sh FLAGS` on args.nproc ranks with ctx's model and data, in args.dir/runs/METHOD;
    {"output" (its OUTPUT_DIR), "probes", "wall_s", "train_flags", "command"}; RuntimeError if it fails."""
    run_dir = args.dir / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)
    probe_out = run_dir / "probe"
    probe_out.mkdir(parents=True)
    env = base_env(args, ctx["probe_dir"], probe_out)
    env.update(MODEL=str(ctx["model_dir"]), DATA=str(ctx["data_file"]), OUTPUT_DIR=str(run_dir / "output"),
               NPROC=str(args.nproc), PYTHON=sys.executable, DEEPSPEED=deepspeed_launcher(args.dir),
               MASTER_PORT=str(free_port()))
    cmd = ["bash", str(REPO / "run-llama.sh"), *flags]
    log(f"{method}: {' '.join(cmd[:2])} {' '.join(cmd[2:])}")
    rc, wall = run_job(cmd, env, run_dir / "log.txt", args.timeout, cwd=run_dir)
    if rc != 0:
        raise RuntimeError(failure_reason(rc, run_dir / "log.txt", args.timeout))
    return {"output": run_dir / "output", "probes": read_probes(probe_out, args.nproc), "wall_s": wall,
            "train_flags": flags, "command": f"{env_prefix(env)} bash run-llama.sh {' '.join(cmd[2:])}"}


def run_ours(method: str, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    packed = method in ("ours_packed", "ours_fp8", "ours_nf4")
    run = launch_ours(method, args, ctx, ours_flags(args, method))
    rows = metrics_steps(run.pop("output") / "metrics.jsonl", args.steps)
    batches = ours_batches(ctx["examples"], args, ctx["pad_id"], packed)
    steps = []
    for r, b in zip(rows, batches, strict=True):
        window = r["time_s"]  # the recipe's own logging window: one step
        nonpad_logged = r["tokens_per_s"] * window
        if r["trained_tokens"] != b["trained"] or abs(nonpad_logged - b["nonpad"]) > 1e-6 * b["nonpad"] + 1:
            raise RuntimeError(f"step {r['step']}: metrics.jsonl counts {r['trained_tokens']} trained / "
                               f"{nonpad_logged:.0f} tokens, the batch stream {b['trained']} / {b['nonpad']}")
        steps.append({"time_s": window, **b})
    return {"steps": steps, **run}


def env_prefix(env: dict[str, str]) -> str:
    keys = ("MODEL", "DATA", "OUTPUT_DIR", "NPROC", "OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")
    return " ".join(f"{k}={env[k]}" for k in keys if k in env)


# ---------------------------------------------------------------------------------------------------------------
# HF / TRL runs (the parent side)


def peer_config(method: str, args: argparse.Namespace, ctx: dict[str, Any], run_dir: Path,
                flags: list[str] | None = None) -> dict[str, Any]:
    """Everything a --worker needs: the filled ZeRO-3 dict (llama-ft's fill_ds_config over the same flags: those of
    `method`'s llama-ft counterpart, or `flags`)."""
    from llama_ft.config import fill_ds_config, load_ds_config, parse_train_args

    flags = ours_flags(args, method) if flags is None else flags
    cfg = parse_train_args(["--model_name_or_path", str(ctx["model_dir"]), "--dataset", str(ctx["data_file"]),
                            "--output_dir", str(run_dir / "ds-config-check"), "--deepspeed",
                            str(REPO / "ds_configs" / "zero3.json"), *flags])
    ds = fill_ds_config(load_ds_config(cfg.deepspeed), cfg, args.nproc, ctx["dims"]["hidden_size"], args.cuda)
    return {"method": method, "model_dir": str(ctx["model_dir"]), "examples": str(ctx["examples_file"]),
            "output_dir": str(run_dir / "output"), "stats_dir": str(run_dir / "stats"), "ds_config": ds,
            "batch": args.batch, "grad_accum": args.grad_accum, "steps": args.steps,
            "seq": getattr(args, "seq", None),  # TRL SFT's packed length; dpo_vs_trl.py has none (no cut)
            "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "attn": args.attn,
            "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "learning_rate": cfg.learning_rate, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
            "adam_beta1": cfg.adam_beta1, "adam_beta2": cfg.adam_beta2, "adam_epsilon": cfg.adam_epsilon,
            "warmup_steps": math.ceil(cfg.warmup_ratio * args.steps), "seed": args.seed, "cuda": args.cuda,
            "dpo_beta": cfg.dpo_beta}


def trl_unavailable(python: str, env: dict[str, str], trainer: str = "SFTTrainer") -> str | None:
    """Why TRL's `trainer` cannot run with `python`, or None."""
    try:
        probe = subprocess.run([python, "-c", f"import trl, sys; from trl import {trainer}; "
                                "sys.stdout.write(trl.__version__)"], env=env, capture_output=True, text=True,
                               timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"--trl-python {python}: cannot run it ({type(e).__name__}: {e})"
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
    if "No module named 'trl'" in last:
        return f"trl is not installed for {python} (pip install trl, or --trl-python PYTHON)"
    return f"trl does not import with {python}: {last[:200]}"


def run_peer(method: str, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    trl = method == "trl_packed"
    if method == "hf_qlora":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise Unavailable("bitsandbytes is not installed (pip install bitsandbytes)")

    def config(run_dir: Path) -> dict[str, Any]:
        # hf_qlora: the hf flags (its ZeRO-3 dict is written but not used: qlora runs without DeepSpeed)
        return {**peer_config("hf" if method == "hf_qlora" else method, args, ctx, run_dir),
                "method": method, "qlora": method == "hf_qlora",
                "qlora_linears": len(LINEARS) * ctx["dims"]["num_hidden_layers"]}

    return launch_peer(method, "trl" if trl else "hf", args.trl_python if trl else sys.executable, args, ctx,
                       config, trl_trainer="SFTTrainer" if trl else "")


def launch_peer(method: str, kind: str, python: str, args: argparse.Namespace, ctx: dict[str, Any],
                make_config: Any, trl_trainer: str = "") -> dict[str, Any]:
    """`kind`'s --worker (this file) on args.nproc torchrun ranks with `python`, in args.dir/runs/METHOD;
    `make_config(run_dir)` gives its config. Per optimizer step: rank 0's wall time and the micro-batch counts
    summed over ranks. Unavailable (the row's reason) where `trl_trainer` does not import or the job fails."""
    run_dir = args.dir / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)
    probe_out = run_dir / "probe"
    probe_out.mkdir(parents=True)
    env = base_env(args, ctx["probe_dir"], probe_out)
    if trl_trainer:
        why = trl_unavailable(python, {k: v for k, v in env.items() if k != PROBE_ENV}, trl_trainer)
        if why:
            raise Unavailable(why)
    conf = make_config(run_dir)
    (run_dir / "stats").mkdir()
    (run_dir / "worker.json").write_text(json.dumps(conf, indent=1))
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker", kind, "--config",
           str(run_dir / "worker.json")]
    log(f"{method}: {' '.join(cmd)}")
    rc, wall = run_job(cmd, env, run_dir / "log.txt", args.timeout, cwd=run_dir)
    if rc != 0:
        raise Unavailable(failure_reason(rc, run_dir / "log.txt", args.timeout))
    ranks = [json.loads((run_dir / "stats" / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    steps = []
    for k in range(args.steps):
        per_rank = [rk["steps"][k] for rk in ranks]
        steps.append({"time_s": per_rank[0]["time_s"], **{key: sum(p[key] for p in per_rank)
                                                          for key in per_rank[0] if key != "time_s"}})
    return {"steps": steps, "probes": read_probes(probe_out, args.nproc), "wall_s": wall,
            "versions": ranks[0].get("versions", {}),
            "command": f"{env_prefix(env)} {' '.join(cmd)}".strip()}


# ---------------------------------------------------------------------------------------------------------------
# the worker (every rank of the hf / trl runs)


def worker(kind: str, config_path: str) -> None:
    """One rank of the HF Trainer (kind "hf"), TRL SFTTrainer (kind "trl") or TRL DPOTrainer (kind "dpo",
    benchmarks/dpo_vs_trl.py) run; writes stats/rank{R}.json."""
    import datasets
    import peft
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback

    conf = json.loads(Path(config_path).read_text())
    cuda = torch.cuda.is_available()
    if not cuda:
        # CPU ranks: accelerate runs DeepSpeed only on an accelerator, so the Trainer goes the use_cpu way (gloo);
        # DeepSpeed's own comm must then be initialized first, or zero.Init and its config see one rank.
        import deepspeed

        deepspeed.init_distributed()
    transformers.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    rows = [json.loads(ln) for ln in Path(conf["examples"]).read_text().splitlines()]
    common = dict(output_dir=conf["output_dir"], per_device_train_batch_size=conf["batch"],
                  gradient_accumulation_steps=conf["grad_accum"], max_steps=conf["steps"],
                  learning_rate=conf["learning_rate"], weight_decay=conf["weight_decay"],
                  adam_beta1=conf["adam_beta1"], adam_beta2=conf["adam_beta2"], adam_epsilon=conf["adam_epsilon"],
                  max_grad_norm=conf["max_grad_norm"], lr_scheduler_type="linear", warmup_steps=conf["warmup_steps"],
                  logging_steps=1, save_strategy="no", report_to="none", bf16=conf["bf16"], fp16=False,
                  deepspeed=None if conf.get("qlora") else conf["ds_config"], train_sampling_strategy="random",
                  dataloader_num_workers=0,
                  gradient_checkpointing=conf["gradient_checkpointing"], seed=conf["seed"], disable_tqdm=True,
                  use_cpu=not cuda)  # CPU ranks: accelerate's gloo process group (its DeepSpeed path needs a GPU)
    lora = peft.LoraConfig(r=conf["lora_r"], lora_alpha=conf["lora_alpha"], lora_dropout=conf["lora_dropout"],
                           target_modules=LINEARS, bias="none", task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(conf["model_dir"])
    versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    if kind == "hf":
        from transformers import DataCollatorForSeq2Seq, TrainingArguments

        targs = TrainingArguments(**common, remove_unused_columns=False)  # before the model: ZeRO-3 is on
        base = Trainer
        dataset = datasets.Dataset.from_list([{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
        extra: dict[str, Any] = dict(data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                                           label_pad_token_id=-100))
    elif kind == "trl":
        import trl
        from trl import SFTConfig, SFTTrainer

        versions["trl"] = trl.__version__
        targs = SFTConfig(**common, packing=True, max_length=conf["seq"])
        base = SFTTrainer
        dataset = datasets.Dataset.from_list(rows)  # input_ids + labels: TRL keeps the labels, packs them (bfd)
        extra = dict(peft_config=lora)
    else:
        import trl
        from trl import DPOConfig, DPOTrainer

        versions["trl"] = trl.__version__
        # llama-ft's --objective dpo: the sigmoid loss, its beta, no cut (TRL's default max_length 1024 would cut)
        targs = DPOConfig(**common, beta=conf["dpo_beta"], loss_type=["sigmoid"], max_length=None)
        base = DPOTrainer
        dataset = datasets.Dataset.from_list(rows)  # conversational pairs: TRL applies the chat template
        extra = dict(peft_config=lora)
    dtype = torch.bfloat16 if conf["bf16"] else torch.float32
    config = AutoConfig.from_pretrained(conf["model_dir"])
    if conf.get("qlora"):
        model = qlora_base(config, dtype, conf["attn"], cuda)
        versions["bitsandbytes"] = __import__("bitsandbytes").__version__
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=conf["attn"])  # zero.Init
    model.config.use_cache = False
    if kind == "hf":
        model = peft.get_peft_model(model, lora)
    micro: list[dict[str, int]] = []
    ends: list[float] = []

    class Counting(base):  # type: ignore[valid-type, misc]
        """Records the tokens of every micro-batch the rank trains on, as the model gets it."""

        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            counts = {"tokens": ids.numel(), "nonpad": int(mask.sum()) if mask is not None else ids.numel()}
            if kind == "dpo":  # rows [chosen.., rejected..]; the completion mask marks the tokens scored
                counts.update(trained=int(inputs["completion_mask"][:, 1:].sum()), pairs=ids.shape[0] // 2)
            else:
                counts["trained"] = int((inputs["labels"][:, 1:] != -100).sum())
            micro.append(counts)
            return super().training_step(model, inputs, *rest, **kw)

    class StepTimes(TrainerCallback):
        """The end time of every optimizer step (after the optimizer's update), and the start of training."""

        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    trainer = Counting(model=model, args=targs, train_dataset=dataset, processing_class=tokenizer,
                       callbacks=[StepTimes()], **extra)
    trainer.train()
    partitioned = [hasattr(p, "ds_id") for p in trainer.model.parameters()]
    if conf.get("qlora"):  # the QLoRA path: every targeted linear is bitsandbytes' 4-bit layer, nothing ZeRO-3
        if any(partitioned) or qlora_linears(trainer.model) != conf["qlora_linears"]:
            raise RuntimeError(f"QLoRA base: {qlora_linears(trainer.model)} Linear4bit layers (expected "
                               f"{conf['qlora_linears']}), {partitioned.count(True)} ZeRO-3 parameters (expected 0)")
    elif not all(partitioned):  # the comparison is ZeRO-3 against ZeRO-3
        raise RuntimeError(f"{partitioned.count(False)} of {len(partitioned)} parameters are not ZeRO-3 parameters")
    ga = conf["grad_accum"]
    if len(ends) != conf["steps"] + 1 or len(micro) != ga * conf["steps"]:
        raise RuntimeError(f"recorded {len(ends) - 1} steps and {len(micro)} micro-batches, expected "
                           f"{conf['steps']} and {ga * conf['steps']}")
    steps = [{"time_s": ends[k + 1] - ends[k], **{key: sum(m[key] for m in micro[k * ga:(k + 1) * ga])
                                                  for key in micro[0]}}
             for k in range(conf["steps"])]
    rank = int(os.environ.get("RANK", 0))
    out = Path(conf["stats_dir"]) / f"rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "steps": steps, "versions": versions}))


def qlora_base(config: Any, dtype: Any, attn: str, cuda: bool) -> Any:
    """A Llama of `config` (random weights) whose seven linears of every layer are bitsandbytes Linear4bit: nf4,
    double-quantized absmax (compress_statistics), blocks of 64, compute in `dtype`, uint8 storage -- the modules
    transformers builds for BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype); lm_head stays as it is (transformers skips it
    too). Built on the GPU when there is one; bitsandbytes quantizes each weight as it moves to the device."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in LINEARS:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64, quant_storage=torch.uint8)
                setattr(parent, name, q.to(device))  # quantizes here
                del lin
    if cuda:
        torch.cuda.empty_cache()
    return model


def qlora_linears(model: Any) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# summary and table


def summarize(raw: dict[str, Any], args: argparse.Namespace, flops_per_token: int) -> dict[str, Any]:
    """Figures over the measured steps (warmup + 1 .. steps) of one method's raw per-step records; model TFLOP/s
    counts `flops_per_token` (model_flops_per_token) for every non-pad token."""
    steps = raw["steps"][args.warmup:]
    t = sum(s["time_s"] for s in steps)
    tokens, nonpad, trained = (sum(s[k] for s in steps) for k in ("tokens", "nonpad", "trained"))
    mem_key = "cuda_max_allocated_bytes" if args.cuda else "peak_rss_bytes"
    peaks = [p.get(mem_key, 0) for p in raw["probes"]]
    return {
        "measured_steps": [args.warmup + 1, args.steps],
        "trained_tokens_per_s": trained / t, "tokens_per_s": nonpad / t, "step_time_s": t / len(steps),
        "padding_share": (tokens - nonpad) / tokens, "trained_share": trained / nonpad,
        "tokens_per_step": tokens / len(steps), "nonpad_tokens_per_step": nonpad / len(steps),
        "trained_tokens_per_step": trained / len(steps), "peak_memory_kind": mem_key,
        "peak_memory_bytes_per_rank": peaks, "peak_memory_bytes": max(peaks),
        "peak_rss_bytes_per_rank": [p["peak_rss_bytes"] for p in raw["probes"]],
        "cuda_max_reserved_bytes_per_rank": [p.get("cuda_max_reserved_bytes") for p in raw["probes"]],
        "model_tflops_per_s": flops_per_token * nonpad / t / 1e12,
        "wall_s": raw["wall_s"], "command": raw["command"], "train_flags": raw.get("train_flags"),
        "steps": raw["steps"],
    }


def model_flops_per_token(dims: dict[str, Any], lora_r: int) -> int:
    """Matmul FLOPs of one trained token, the same for every method: 4 per frozen weight (forward, and the input
    gradient; no weight gradient) of the seven linears and the LM head, 6 per LoRA weight (forward, input and
    weight gradients). Not counted: attention's token-by-token products (about 5% at the 8B shape and 1,024
    tokens), the embedding lookup, and the forward recomputed by gradient checkpointing (MFU, not HFU)."""
    h, i, layers, v = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"], dims["vocab_size"]
    kv = dims["num_key_value_heads"] * (h // dims["num_attention_heads"])
    linears = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (out, in): q k v o gate up down
    frozen = layers * sum(n * k for n, k in linears) + v * h
    lora = layers * sum(lora_r * (n + k) for n, k in linears)
    return 4 * frozen + 6 * lora


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def tps(name: str) -> float | None:
        m = results.get(name, {})
        return m["trained_tokens_per_s"] if "trained_tokens_per_s" in m else None

    def ratio(a: str, b: str) -> float | None:
        x, y = tps(a), tps(b)
        return x / y if x is not None and y else None

    return {"packed_vs_unpacked": ratio("ours_packed", "ours_unpacked"),
            "ours_packed_vs_hf": ratio("ours_packed", "hf"), "ours_unpacked_vs_hf": ratio("ours_unpacked", "hf"),
            "ours_packed_vs_trl_packed": ratio("ours_packed", "trl_packed"),
            "ours_fp8_vs_packed": ratio("ours_fp8", "ours_packed"), "ours_fp8_vs_hf": ratio("ours_fp8", "hf"),
            "ours_nf4_vs_packed": ratio("ours_nf4", "ours_packed"),
            "ours_nf4_vs_hf_qlora": ratio("ours_nf4", "hf_qlora")}


GOALS = [("packed_vs_unpacked", 2.0, "llama-ft packed >= 2x unpacked trained tok/s"),
         ("ours_packed_vs_hf", 1.5, "llama-ft (packed) >= 1.5x HF Trainer trained tok/s"),
         ("ours_packed_vs_trl_packed", 1.0, "llama-ft packed >= TRL packed trained tok/s")]


def goals(r: dict[str, float | None]) -> list[dict[str, Any]]:
    return [{"goal": text, "ratio": r[key], "target": target,
             "holds": None if r[key] is None else r[key] >= target} for key, target, text in GOALS]


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def head_lines(title: str, report: dict[str, Any], batch: str) -> list[str]:
    """A report's first lines: what ran where, with which versions; the command; the model shape, dtype, LoRA,
    ZeRO-3, what a batch (`batch`) holds, accumulation, checkpointing, attention and the steps measured."""
    h, c, d = report["header"], report["config"], report["config"]["dims"]
    return [f"{title}: {h['device']}; {c['nproc']} ranks; {h['date']}; torch {h['torch']}, deepspeed "
            f"{h['deepspeed']}, transformers {h['transformers']}, peft {h['peft']}, trl {h['trl']}",
            f"`{h['command']}`",
            f"shape {c['shape']} (hidden {d['hidden_size']}, {d['num_hidden_layers']} layers, "
            f"{d['num_attention_heads']}/{d['num_key_value_heads']} heads, intermediate {d['intermediate_size']}, "
            f"vocab {d['vocab_size']}, {c['params'] / 1e6:.1f}M params), {c['dtype']}, LoRA r={c['lora_r']} "
            f"alpha={c['lora_alpha']:g} dropout {c['lora_dropout']:g} on q,k,v,o,gate,up,down, ZeRO-3, {batch}, "
            f"accumulation {c['grad_accum']}, gradient checkpointing {'on' if c['gradient_checkpointing'] else 'off'}, "
            f"attention {c['attn']}; {c['steps']} steps, measured {c['warmup'] + 1}..{c['steps']}"]


def memory_column(config: dict[str, Any]) -> str:
    """The peak memory column's title: host RSS on CPU ranks, torch's allocator peak on GPUs."""
    return "peak GPU mem / rank GiB (max_memory_allocated)" if config["cuda"] else "peak RSS / rank GiB"


def peaks_cell(res: dict[str, Any]) -> str:
    """A method's peak memory per rank, GiB."""
    return ", ".join(f"{b / 2**30:.2f}" for b in res["peak_memory_bytes_per_rank"])


def method_rows(methods: dict[str, dict[str, Any]], labels: dict[str, str], figure: str, cells: Any,
                columns: int) -> list[str]:
    """A table row per method, its label then `cells(figures)`; a method without `figure` (not run, failed) gets
    n/a or failed and a numbered note, listed below the table."""
    rows, notes = [], []
    for name, label in labels.items():
        res = methods[name]
        if figure in res:
            rows.append(f"| {label} | " + " | ".join(cells(res)) + " |")
            continue
        notes.append(res.get("unavailable") or res.get("failed") or "?")
        rows.append(f"| {label} | {'failed' if 'failed' in res else 'n/a'} [{len(notes)}] |" + " |" * (columns - 2))
    return rows + (["", *(f"[{i}] {n}" for i, n in enumerate(notes, 1))] if notes else [])


def goal_lines(goals: list[dict[str, Any]]) -> list[str]:
    return [f"- {g['goal']}: not measured" if g["ratio"] is None else
            f"- {g['goal']}: {g['ratio']:.2f}x, {'holds' if g['holds'] else 'does not hold'}" for g in goals]


def markdown(report: dict[str, Any]) -> str:
    c, d = report["config"], report["data"]
    out = [*head_lines("Training throughput", report, f"batch {c['batch']} per rank (examples unpacked, rows of "
                                                      f"<= {c['seq']} tokens packed)"),
           f"data: {d['examples']} synthetic input-output examples, tokens per example median {d['median']:.0f}, "
           f"p90 {d['p90']:.0f}, p99 {d['p99']:.0f}, max {d['max']:.0f}; {100 * d['trained_share']:.0f}% trained",
           "",
           f"| method | trained tok/s | vs HF | all tok/s | step s | model TFLOP/s | tokens / step (all ranks) | "
           f"padding share | {memory_column(c)} |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    hf = report["methods"]["hf"].get("trained_tokens_per_s")

    def cells(res: dict[str, Any]) -> list[str]:
        return [fmt_int(res["trained_tokens_per_s"]), f"{res['trained_tokens_per_s'] / hf:.2f}x" if hf else "",
                fmt_int(res["tokens_per_s"]), f"{res['step_time_s']:.2f}", f"{res['model_tflops_per_s']:.3g}",
                fmt_int(res["tokens_per_step"]), f"{res['padding_share']:.3f}", peaks_cell(res)]

    out += method_rows(report["methods"], METHODS, "trained_tokens_per_s", cells, 9)
    out += ["", *goal_lines(report["goals"])]
    r = report["ratios"]
    if r["ours_unpacked_vs_hf"] is not None:
        same = report["hf_batches_equal_ours_unpacked"]
        out.append(f"- (llama-ft unpacked vs HF Trainer, both padded: {r['ours_unpacked_vs_hf']:.2f}x; "
                   f"{'the same' if same else 'different'} micro-batches, token for token)")
    if r.get("ours_nf4_vs_hf_qlora") is not None:
        out.append(f"- 4-bit base: llama-ft NF4 (packed) vs HF Trainer + PEFT + bitsandbytes QLoRA (padded): "
                   f"{r['ours_nf4_vs_hf_qlora']:.2f}x trained tok/s")
    return "\n".join(out)


def header(args: argparse.Namespace) -> dict[str, Any]:
    return {**run_header(args.cuda), "peft": package_version("peft"), "trl": "n/a"}


# ---------------------------------------------------------------------------------------------------------------
# arguments and main


def shared_args(ap: argparse.ArgumentParser, defaults: dict[str, Any], batch: str, scratch: str) -> None:
    """The options this script and dpo_vs_trl.py share, same names and meaning (`batch`: what --batch counts)."""
    ap.add_argument("--shape", choices=sorted(SHAPES), help="model shape; default small (tiny with --smoke)")
    ap.add_argument("--steps", type=int, help=f"optimizer steps per method; default {defaults['steps']}")
    ap.add_argument("--warmup", type=int, help=f"first steps left out of the figures; default {defaults['warmup']}")
    ap.add_argument("--batch", type=int, help=f"per-rank batch: {batch}; default {defaults['batch']}")
    ap.add_argument("--grad-accum", type=int, help="gradient accumulation steps; default 1")
    ap.add_argument("--nproc", type=int, help="ranks; default: all GPUs, or 2 CPU ranks")
    ap.add_argument("--seed", type=int, default=42, help="data and training seed; default 42")
    ap.add_argument("--lora-r", type=int, help=f"LoRA rank; default {defaults['lora_r']}")
    ap.add_argument("--lora-alpha", type=float, help=f"LoRA alpha; default {defaults['lora_alpha']:g}")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="for every method; default off")
    ap.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                    help="attention implementation for every method; default sdpa")
    ap.add_argument("--dir", type=Path, default=Path(scratch), help="scratch directory")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter whose environment has trl")
    ap.add_argument("--timeout", type=float, help="seconds per method before it is killed")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few short steps: a check of the script")


def check_shared(args: argparse.Namespace, defaults: dict[str, Any], positive: tuple[str, ...] = ()) -> None:
    """Fill the shared options' defaults (`defaults`, the smoke ones with --smoke) and refuse bad values (exit 2);
    `positive`: more options that must be > 0."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.grad_accum is None:
        args.grad_accum = 1
    for key in ("steps", "batch", "grad_accum", "lora_r", "timeout", *positive):
        if getattr(args, key) <= 0:
            die(f"--{key.replace('_', '-')} {getattr(args, key)}: expected a number > 0")
    if args.lora_alpha <= 0:
        die(f"--lora-alpha {args.lora_alpha}: expected a number > 0")
    if not 0 <= args.warmup < args.steps:
        die(f"--warmup {args.warmup}: expected 0 <= warmup < --steps {args.steps} (at least one measured step)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_args(ap, DEFAULTS, "examples unpacked, rows packed", "/tmp/llama-ft-trainbench")
    ap.add_argument("--seq", type=int, help=f"--max_seq_len / packed row length; default {DEFAULTS['seq']}")
    ap.add_argument("--methods", help=f"comma list of {','.join(METHODS)}; default all")
    ap.add_argument("--examples", type=int, help="synthetic examples; default: enough for one packed pass")
    ap.add_argument("--offload-ratio", metavar="R|auto",
                    help="llama-ft runs only: --offload --offload_ratio R (auto: the planner's smallest that fits)")
    ap.add_argument("--worker", choices=["hf", "trl", "dpo"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    check_shared(args, {**DEFAULTS, **(SMOKE_DEFAULTS if args.smoke else {"shape": "small"})}, ("seq",))
    if args.seq < 2 * MIN_TOKENS:
        die(f"--seq {args.seq}: expected at least {2 * MIN_TOKENS} tokens")
    if args.seq > SHAPES[args.shape]["max_position_embeddings"]:
        die(f"--seq {args.seq}: above the {args.shape} shape's max_position_embeddings "
            f"{SHAPES[args.shape]['max_position_embeddings']}")
    if args.offload_ratio is not None and args.offload_ratio != "auto":
        try:
            ok = 0 <= float(args.offload_ratio) <= 1
        except ValueError:
            ok = False
        if not ok:
            die(f"--offload-ratio {args.offload_ratio}: expected a fraction in [0, 1] or 'auto'")
    names = [m.strip() for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        die(f"--methods {args.methods!r}: expected a comma list of {', '.join(METHODS)}")
    args.methods = [m for m in METHODS if m in names]
    if args.examples is not None and args.examples < 1:
        die(f"--examples {args.examples}: expected a number > 0")
    return args


def device_setup(args: argparse.Namespace) -> None:
    """CUDA or CPU, ranks, dtype; refuses (exit 2) what cannot run here."""
    import torch

    args.cuda = torch.cuda.is_available()
    if args.shape in GPU_SHAPES and not args.cuda:
        die(f"--shape {args.shape} needs a CUDA GPU (none found); on CPU use --shape small (or --smoke)")
    if args.attn == "flash_attention_2" and not args.cuda:
        die("--attn flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
    gpus = torch.cuda.device_count() if args.cuda else 0
    if args.nproc is None:
        args.nproc = gpus or 2
    if args.nproc <= 0 or (args.cuda and args.nproc > gpus):
        die(f"--nproc {args.nproc}: expected 1..{gpus or 'any'} ranks")
    args.bf16 = args.cuda  # fp32 on CPU: bf16 matmuls are slow on CPUs without AMX


def examples_needed(args: argparse.Namespace) -> int:
    """Enough examples that the packed runs need about one pass (and never fewer than 1000)."""
    mean = MEDIAN_TOKENS * math.exp(SIGMA**2 / 2)
    rows = args.steps * args.grad_accum * args.batch * args.nproc
    return max(1000, math.ceil(1.2 * rows * args.seq / mean))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if not args.config:
            die("--worker needs --config")
        worker(args.worker, args.config)
        return 0
    return print_report(run, markdown, args)


def start_run(args: argparse.Namespace) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Device, ranks and dtype (device_setup), the scratch directory, the model directory of --shape (random
    weights: config + tokenizer); (the report's header, that directory, the shape's dims)."""
    device_setup(args)
    args.dir = args.dir.resolve()
    args.dir.mkdir(parents=True, exist_ok=True)
    head = header(args)
    log(f"{head['device']}, shape {args.shape}, {args.nproc} ranks, scratch {args.dir}")
    model_dir = args.dir / f"model-{args.shape}"
    dims = write_model_dir(model_dir, SHAPES[args.shape], "bfloat16" if args.bf16 else "float32")
    return head, model_dir, dims


def run_config(args: argparse.Namespace, dims: dict[str, Any], model_dir: Path, flops: int,
               lora_dropout: float) -> dict[str, Any]:
    """The report's "config": what every method of the run shares."""
    return {"shape": args.shape, "dims": dims, "params": parameter_count(dims), "nproc": args.nproc,
            "cuda": args.cuda, "dtype": "bf16" if args.bf16 else "fp32", "batch": args.batch,
            "grad_accum": args.grad_accum, "steps": args.steps, "warmup": args.warmup, "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha, "lora_dropout": lora_dropout,
            "gradient_checkpointing": args.gradient_checkpointing, "attn": args.attn, "methods": args.methods,
            "model_dir": str(model_dir), "model_flops_per_token": flops}


def measure_methods(names: Any, args: argparse.Namespace, head: dict[str, Any], run_method: Any, figures: Any,
                    figure: str) -> dict[str, dict[str, Any]]:
    """Each method of `names` in turn: `figures(run_method(name))`, or why it did not run ("unavailable": not in
    args.methods, or a peer that cannot run here) or failed (ours failing is a result too; the exit code says so).
    The workers' TRL version goes into `head`; `figure` is the figure logged."""
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in args.methods:
            methods[name] = {"unavailable": "not run (--methods)"}
            continue
        try:
            raw = run_method(name)
            methods[name] = figures(raw)
            if raw.get("versions", {}).get("trl"):
                head["trl"] = raw["versions"]["trl"]
            log(f"{name}: {methods[name][figure]:,.2f} {figure}")
        except Unavailable as e:
            methods[name] = {"unavailable": str(e)}
            log(f"{name}: unavailable: {e}")
        except Exception as e:  # noqa: BLE001 - ours failing is a result too; the exit code says so
            methods[name] = {"failed": f"{type(e).__name__}: {e}"}
            log(f"{name}: FAILED: {e}")
    return methods


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark (module doc); returns the report (print_report writes it to --json)."""
    head, model_dir, dims = start_run(args)

    from llama_ft.data import DataOptions, load_tokenizer, pad_token_id, prepare_examples

    flops_per_token = model_flops_per_token(dims, args.lora_r)
    tokenizer = load_tokenizer(str(model_dir))
    n = args.examples or examples_needed(args)
    data_file = args.dir / f"data-seed{args.seed}-n{n}-max{min(MAX_TOKENS, args.seq)}.jsonl"
    if not data_file.exists():
        write_dataset(data_file, tokenizer, n, args.seed, min(MAX_TOKENS, args.seq))
    os.environ["LLAMA_FT_CACHE"] = str(args.dir / "cache")  # the ranks then find the examples tokenized
    examples, _ = prepare_examples(DataOptions(dataset=str(data_file), dataset_format="input-output",
                                               source_max_len=args.seq, target_max_len=args.seq,
                                               max_seq_len=args.seq), tokenizer)
    examples_file = args.dir / f"examples-{data_file.stem}.jsonl"
    ids, labels = examples["input_ids"], examples["labels"]
    examples_file.write_text("".join(json.dumps({"input_ids": i, "labels": lb}) + "\n"
                                     for i, lb in zip(ids, labels, strict=True)))
    lengths = [len(i) for i in ids]
    trained = sum(sum(1 for x in lb[1:] if x != -100) for lb in labels)
    data = {"file": str(data_file), "examples": len(lengths), "median": statistics.median(lengths),
            "p90": percentile(lengths, 90), "p99": percentile(lengths, 99), "max": max(lengths),
            "mean": statistics.fmean(lengths), "trained_share": trained / sum(lengths)}
    probe_dir = install_probe(args.dir / "probe-site")
    ctx = {"model_dir": model_dir, "data_file": data_file, "examples_file": examples_file, "examples": examples,
           "pad_id": pad_token_id(tokenizer), "dims": dims, "probe_dir": probe_dir}

    methods = measure_methods(
        METHODS, args, head, lambda name: run_ours(name, args, ctx) if name in OURS else run_peer(name, args, ctx),
        lambda raw: summarize(raw, args, flops_per_token), "trained_tokens_per_s")
    r = ratios(methods)
    same = None
    if "steps" in methods["hf"] and "steps" in methods["ours_unpacked"]:
        def counts(name: str) -> list[tuple[int, int, int]]:
            return [(s["tokens"], s["nonpad"], s["trained"]) for s in methods[name]["steps"]]

        same = counts("hf") == counts("ours_unpacked")  # the same examples in the same micro-batches?
    config = {**run_config(args, dims, model_dir, flops_per_token, LORA_DROPOUT), "seq": args.seq,
              "offload_ratio": args.offload_ratio}
    return {"header": head, "config": config, "data": data, "method_labels": METHODS, "methods": methods,
            "ratios": r, "goals": goals(r), "hf_batches_equal_ours_unpacked": same}


if __name__ == "__main__":
    sys.exit(main())
