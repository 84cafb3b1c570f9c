"""DPO throughput: llama-ft `--objective dpo` vs TRL DPOTrainer + PEFT + ZeRO-3 on the same pairs (issue 21, item 6).

    python benchmarks/dpo_vs_trl.py --rounds 3 --json dpo.json         # CPU: small Llama shape, 2 ranks, fp32
    python benchmarks/dpo_vs_trl.py --shape 8b --json dpo-8b.json      # GPU: Llama 3.1 8B shape, all GPUs, bf16
    python benchmarks/dpo_vs_trl.py --smoke --json /tmp/smoke.json     # a minute-long check of the script
    python benchmarks/dpo_vs_trl.py --trl-python PYTHON ...            # TRL from another environment

One run trains the same model shape (random weights: `--init random` for llama-ft, `from_config` under zero.Init
for TRL), on the same pairs, with the same ranks, per-device batch of pairs, LoRA (r, alpha on
q,k,v,o,gate,up,down, dropout 0: TRL's DPOConfig switches dropout off by default, disable_dropout=True),
optimizer and learning-rate schedule, DeepSpeed ZeRO-3 config (ds_configs/zero3.json, "auto" fields filled by
llama-ft's `fill_ds_config` over the same flags), DPO loss (sigmoid, --beta), gradient checkpointing on for both
or off for both, for --steps optimizer steps, one method after the other:

    ours   `bash run-llama.sh --objective dpo --dataset_format chat` (deepspeed launcher): B pairs make one batch
           of 2B right-padded rows; a reference forward with the adapters off (no grad), then the policy forward
           and backward; log-probabilities from the chunked head over the response tokens only
    ours_packed   the same with --packing: one row per rank per micro-batch of whole pairs, each side its own
           sequence; --max_seq_len sized so that a row (2 x --max_seq_len tokens) holds about --batch pairs of
           the data's mean length, and at least the longest side (nothing is cut): pack_lengths
    ours_shared   --packing --dpo_shared_prompt: the same rows with each pair as [prompt | chosen | rejected], the
           prompt once (data/shared_prompt.py); --max_seq_len sized the same way for that layout's lengths
    trl    TRL's DPOTrainer(peft_config=LoRA, ref_model=None: its reference is the same PEFT model with the adapter
           disabled, as ours), the same ZeRO-3 dict through transformers' DeepSpeed integration, torchrun:
           benchmarks/train_throughput.py's `--worker dpo`, which records each micro-batch's tokens and each
           optimizer step's end time on every rank

Data: --pairs synthetic pairs in TRL's conversational form (explicit prompt: one user message, one assistant
message per side), the same file for both; each method renders it with the tokenizer's chat template (the tiny
byte-level BPE tokenizer's Llama 3.1 template; tests/test_dpo_vs_trl.py shows both make the same tokens with it).
Texts are words the tokenizer encodes as one token each; word counts lognormal, sigma 0.6: prompt median 100,
chosen and rejected median 150 each, drawn independently (alpaca-to-UltraFeedback lengths). By default there are
exactly as many pairs as the run trains (steps x accumulation x batch x ranks), so each method trains every pair
once; where both samplers agree (TRL's is the HF Trainer's seeded RandomSampler), the micro-batches are the same
token for token, which the report checks.

Measured per method over steps W+1..N (the first --warmup W steps left out, the same for both):
    pairs/s         preference pairs trained, all ranks, per second of wall time of those steps
    tokens/s        non-pad tokens of both sides, all ranks, per second
    step s          mean wall time of one optimizer step (rank 0)
    padding share   pad tokens / all tokens of the micro-batches
    model TFLOP/s   FLOPs of the weight matmuls per non-pad token: 6 per frozen weight (reference forward, policy
                    forward, input gradient), 6 per LoRA weight; the same count for both (MFU = this / peak)
    peak memory     per rank: peak host RSS of the rank's process on CPU, torch.cuda.max_memory_allocated on GPU
                    (recorded at exit by bench_common's probe, the same way for both)
Goals (issue 21): ours >= 1.3x TRL's pairs/s, and less peak memory than TRL on every rank (each llama-ft method is
held to them). The packed methods train about --batch pairs per micro-batch, not exactly; pairs/s counts the pairs
each step trained (metrics.jsonl, checked against the method's own batch stream). Per round, each llama-ft
method's pairs/s over TRL's in the same round is reported too: the figure to read on a shared machine.

--rounds R runs each method R times, alternating which goes first; the table shows each method's round with the
median pairs/s and lists every round's. Because both train the same micro-batches, the report also gives the
median over every measured step of every round of TRL's step time / ours for the same micro-batch: on a shared
machine a burst of other work slows a few steps of one method, which moves a mean more than this median.

Shapes are train_throughput.py's: tiny (--smoke), small (hidden 512, 4 layers: the CPU run, fp32), 8b, 70b (CUDA,
bf16). Output: a markdown table on stdout (progress and logs on stderr), --json everything.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench_common import (
    install_probe,
    metrics_steps,
    print_report,
    single_token_words,
    write_jsonl,
)
from train_throughput import (
    LEARNING_RATE,
    WARMUP_RATIO,
    check_shared,
    die,
    goal_lines,
    head_lines,
    launch_ours,
    launch_peer,
    measure_methods,
    memory_column,
    method_rows,
    model_flops_per_token,
    peaks_cell,
    peer_config,
    percentile,
    run_config,
    shared_args,
    start_run,
    summarize,
)

METHODS = {"ours": "llama-ft --objective dpo", "ours_packed": "llama-ft --objective dpo --packing",
           "ours_shared": "llama-ft --objective dpo --packing --dpo_shared_prompt",
           "trl": "TRL DPOTrainer + PEFT + ZeRO-3"}
OURS = ("ours", "ours_packed", "ours_shared")
PACKED = {"ours_packed": False, "ours_shared": True}  # method -> shared prompt
DEFAULTS = dict(shape="small", steps=10, warmup=2, batch=4, lora_r=64, lora_alpha=16.0, timeout=1800.0,
                prompt_words=100, response_words=150)
SMOKE = dict(DEFAULTS, shape="tiny", steps=3, warmup=1, batch=2, lora_r=8, timeout=300.0, prompt_words=20,
             response_words=30)
SIGMA, MAX_PROMPT_WORDS, MAX_RESPONSE_WORDS = 0.6, 400, 600
GOAL_PAIRS_PER_S = 1.3


# ---------------------------------------------------------------------------------------------------------------
# data


def write_pairs(path: Path, tokenizer: Any, n: int, seed: int, prompt_words: int, response_words: int) -> None:
    """`n` conversational pairs (module doc): lognormal word counts, single-token words drawn from `seed`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = single_token_words(tokenizer)

    def text(median: int, most: int) -> str:
        k = int(np.clip(np.rint(rng.lognormal(math.log(median), SIGMA)), 4, most))
        return " ".join(words[i] for i in rng.integers(0, len(words), k))

    rows = [{"prompt": [{"role": "user", "content": text(prompt_words, MAX_PROMPT_WORDS)}],
             **{side: [{"role": "assistant", "content": text(response_words, MAX_RESPONSE_WORDS)}]
                for side in ("chosen", "rejected")}} for _ in range(n)]
    write_jsonl(path, rows)


def data_summary(path: Path, examples: Any) -> dict[str, Any]:
    """Token counts of llama-ft's tokenized pairs (the same tokens TRL makes with this template), and the share of
    them the shared-prompt layout keeps (the prompt once per pair)."""
    from llama_ft.data.shared_prompt import shared_prefix_lengths

    sides = [len(ids) for side in ("chosen", "rejected") for ids in examples[f"{side}_input_ids"]]
    shared = sum(sides) - sum(shared_prefix_lengths(examples))
    trained = sum(sum(1 for y in lb[1:] if y != -100) for side in ("chosen", "rejected")
                  for lb in examples[f"{side}_labels"])
    return {"file": str(path), "pairs": len(examples), "side_median": statistics.median(sides),
            "side_p90": percentile(sides, 90), "side_max": max(sides), "trained_share": trained / sum(sides),
            "shared_prompt_share": shared / sum(sides)}


# ---------------------------------------------------------------------------------------------------------------
# the two runs


def dpo_flags(args: argparse.Namespace, method: str = "ours", pack_len: int | None = None) -> list[str]:
    """llama-ft's training flags (after run-llama.sh's defaults, which they override); TRL's config is filled from
    the same ones (train_throughput.peer_config). The packed methods train one row of up to 2 x `pack_len` tokens
    per rank per micro-batch (pack_lengths)."""
    packed = ["--packing", "--max_seq_len", str(pack_len)] if method in PACKED else []
    if PACKED.get(method):
        packed.append("--dpo_shared_prompt")
    return [*packed, "--dataset_format", "chat", "--objective", "dpo", "--dpo_beta", str(args.beta),
            "--per_device_train_batch_size", str(1 if method in PACKED else args.batch),
            "--gradient_accumulation_steps", str(args.grad_accum),
            "--max_steps", str(args.steps), "--save_steps", str(args.steps), "--logging_steps", "1",
            "--eval_dataset_size", "0", "--bf16", str(args.bf16).lower(), "--gradient_checkpointing",
            str(args.gradient_checkpointing).lower(), "--lora_r", str(args.lora_r), "--lora_alpha",
            str(args.lora_alpha), "--lora_dropout", "0", "--learning_rate", str(LEARNING_RATE),
            "--lr_scheduler_type", "linear", "--warmup_ratio", str(WARMUP_RATIO), "--max_grad_norm", "0.3",
            "--attn_implementation", args.attn, "--init", "random", "--seed", str(args.seed), "--overwrite_output_dir"]


def run_ours(method: str, args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """llama-ft's run; per step its logged wall time and pairs, and the tokens of its own batch stream."""
    pack_len = ctx["pack_len"].get(method)
    run = launch_ours(method, args, ctx, dpo_flags(args, method, pack_len))
    rows = metrics_steps(run.pop("output") / "metrics.jsonl", args.steps, count="pairs")
    batches = stream_batches(ctx["examples"], args, ctx["pad_id"], pack_len, PACKED.get(method, False))
    for r, b in zip(rows, batches, strict=True):
        if r["pairs"] != b["pairs"]:
            raise RuntimeError(f"step {r['step']}: metrics.jsonl counts {r['pairs']} pairs, its stream {b['pairs']}")
    return {"steps": [{"time_s": r["time_s"], **b} for r, b in zip(rows, batches, strict=True)], **run}


def stream_batches(examples: Any, args: argparse.Namespace, pad_id: int, pack_len: int | None,
                   shared: bool) -> list[dict[str, int]]:
    """Per optimizer step, summed over ranks and accumulation: pairs, tokens (input_ids.numel()), non-pad and
    trained tokens of the micro-batches llama-ft trains (its own deterministic stream, data/batches.py)."""
    from llama_ft.data import MicroBatches
    from llama_ft.train.loss import trained_count

    rows = 1 if pack_len else args.batch
    streams = [MicroBatches(examples, args.nproc, r, rows, args.seed, pad_id, pack_len=pack_len,
                            shared_prompt=shared) for r in range(args.nproc)]
    steps = []
    for _ in range(args.steps):
        s = {"pairs": 0, "tokens": 0, "nonpad": 0, "trained": 0}
        for stream in streams:
            for _ in range(args.grad_accum):
                b = next(stream)
                s["pairs"] += int(b["pairs"])
                s["tokens"] += b["input_ids"].numel()
                s["nonpad"] += int(b["attention_mask"].sum())
                s["trained"] += trained_count(b["labels"])
        steps.append(s)
    return steps


def pack_lengths(examples: Any, batch: int) -> dict[str, int]:
    """--max_seq_len of each packed method: a row holds 2 x that many tokens, sized so that one row holds `batch`
    pairs of that layout's mean length (both sides; the prompt once with the shared prompt), as the unpacked
    micro-batch holds `batch` pairs; at least the longest side, so that nothing is cut."""
    from llama_ft.data.batches import example_lengths
    from llama_ft.data.shared_prompt import shared_prefix_lengths

    both = example_lengths(examples)
    longest = max(len(ids) for side in ("chosen", "rejected") for ids in examples[f"{side}_input_ids"])
    layouts = {"ours_packed": both, "ours_shared": [n - p for n, p in zip(both, shared_prefix_lengths(examples),
                                                                          strict=True)]}
    return {m: max(longest, math.ceil(batch * statistics.fmean(lengths) / 2)) for m, lengths in layouts.items()}


def run_trl(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    return launch_peer("trl", "dpo", args.trl_python, args, ctx,
                       lambda run_dir: peer_config("trl", args, ctx, run_dir, flags=dpo_flags(args)),
                       trl_trainer="DPOTrainer")


def dpo_flops_per_token(dims: dict[str, Any], lora_r: int) -> int:
    """SFT's count (train_throughput.model_flops_per_token: 4 per frozen weight, 6 per LoRA weight) plus the
    reference forward: 2 more per frozen weight (the adapters are off there)."""
    return model_flops_per_token(dims, lora_r) + model_flops_per_token(dims, 0) // 2


def figures(raw: dict[str, Any], args: argparse.Namespace, flops: int) -> dict[str, Any]:
    """train_throughput.summarize's figures of the measured steps, plus pairs/s."""
    res = summarize(raw, args, flops)
    steps = raw["steps"][args.warmup:]
    res["pairs_per_s"] = sum(s["pairs"] for s in steps) / sum(s["time_s"] for s in steps)
    return res


# ---------------------------------------------------------------------------------------------------------------
# report


def median_round(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A method's figures over the rounds: those of the round with the median pairs/s (the lower of the two
    middle ones for an even count), plus every round's pairs/s; a round that failed or did not run decides."""
    missing = [r for r in records if "pairs_per_s" not in r]
    if missing:
        return missing[0]
    ordered = sorted(records, key=lambda r: r["pairs_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_pairs_per_s": [r["pairs_per_s"] for r in records]}


def compare(methods: dict[str, dict[str, Any]], rounds: list[dict[str, dict[str, Any]]], warmup: int) -> dict[str, Any]:
    """Per llama-ft method: the goals' ratios (of the methods' median rounds) and the median over rounds of its
    pairs/s / TRL's in the same round (both ran back to back, interleaved with the others). For the unpacked
    method, which trains the same micro-batches as TRL: whether they are the same token for token, and the median
    over every measured step of every round of TRL's step time / ours for the same micro-batch (a paired figure
    that a burst of other load on the machine moves less than it moves a mean)."""
    trl = methods["trl"]
    out: dict[str, Any] = {"same_batches": None, "step_time_ratio_median": None, "goals": [], "per_method": {}}
    if "pairs_per_s" not in trl:
        return out
    for name in OURS:
        ours = methods[name]
        if "pairs_per_s" not in ours:
            continue
        ratio = ours["pairs_per_s"] / trl["pairs_per_s"]
        per_round = [r[name]["pairs_per_s"] / r["trl"]["pairs_per_s"] for r in rounds
                     if "pairs_per_s" in r[name] and "pairs_per_s" in r["trl"]]
        memory = [a / b for a, b in zip(ours["peak_memory_bytes_per_rank"], trl["peak_memory_bytes_per_rank"],
                                        strict=True)]
        out["per_method"][name] = {"pairs_per_s_ratio": ratio, "round_ratios": per_round,
                                   "round_ratio_median": statistics.median(per_round), "memory_ratio_per_rank": memory}
        label = METHODS[name]
        out["goals"] += [{"goal": f"{label} >= {GOAL_PAIRS_PER_S}x TRL's pairs/s", "ratio": ratio,
                          "holds": ratio >= GOAL_PAIRS_PER_S},
                         {"goal": f"{label}: peak memory below TRL's on every rank", "ratio": max(memory),
                          "holds": max(memory) < 1}]
    ours = methods["ours"]
    if "pairs_per_s" in ours:
        paired = [t["time_s"] / o["time_s"] for r in rounds if "steps" in r["ours"] and "steps" in r["trl"]
                  for o, t in zip(r["ours"]["steps"][warmup:], r["trl"]["steps"][warmup:], strict=True)]
        keys = ("pairs", "tokens", "nonpad", "trained")
        out["same_batches"] = [[s[k] for k in keys] for s in ours["steps"]] == [[s[k] for k in keys]
                                                                                for s in trl["steps"]]
        out["step_time_ratio_median"] = statistics.median(paired) if paired else None
    return out


def markdown(report: dict[str, Any]) -> str:
    c, d = report["config"], report["data"]
    out = [*head_lines("DPO throughput", report, f"sigmoid loss, beta {c['beta']:g}, {c['batch']} pairs per rank "
                                                 "per micro-batch"),
           f"data: {d['pairs']} synthetic pairs, tokens per side (prompt + response, chat template) median "
           f"{d['side_median']:.0f}, p90 {d['side_p90']:.0f}, max {d['side_max']:.0f}; "
           f"{100 * d['trained_share']:.0f}% of them trained (response)",
           "",
           f"| method | pairs/s | vs TRL | tokens/s | step s | model TFLOP/s | padding share | {memory_column(c)} |",
           "|---|--:|--:|--:|--:|--:|--:|--:|"]
    trl = report["methods"]["trl"].get("pairs_per_s")

    def cells(res: dict[str, Any]) -> list[str]:
        return [f"{res['pairs_per_s']:.2f}", f"{res['pairs_per_s'] / trl:.2f}x" if trl else "",
                f"{res['tokens_per_s']:,.0f}", f"{res['step_time_s']:.2f}", f"{res['model_tflops_per_s']:.3g}",
                f"{res['padding_share']:.3f}", peaks_cell(res)]

    out += method_rows(report["methods"], METHODS, "pairs_per_s", cells, 8)
    cmp = report["compare"]
    out += ["", *goal_lines(cmp["goals"])]
    if cmp["same_batches"] is not None:
        out.append(f"- {METHODS['ours']} and TRL: {'the same' if cmp['same_batches'] else 'different'} micro-batches, "
                   f"token for token; TRL's step time / ours, same micro-batch, median over the measured steps of "
                   f"{c['rounds']} round(s): {cmp['step_time_ratio_median']:.2f}")
    for name, m in cmp["per_method"].items():
        out.append(f"- {METHODS[name]} / TRL, pairs/s in the same round: "
                   + ", ".join(f"{x:.2f}x" for x in m["round_ratios"]) + f" (median {m['round_ratio_median']:.2f}x)")
    if c["rounds"] > 1:
        out += [f"- pairs/s of each round ({label}): " + ", ".join(f"{x:.2f}" for x in res["rounds_pairs_per_s"])
                for label, res in ((METHODS[m], report["methods"][m]) for m in METHODS)
                if "rounds_pairs_per_s" in res]
    if c.get("pack_len"):
        out.append("- packed methods: one row per rank per micro-batch, --max_seq_len "
                   + ", ".join(f"{v} ({k})" for k, v in c["pack_len"].items())
                   + f" (a row holds 2x that: about {c['batch']} pairs); the shared-prompt layout keeps "
                   f"{100 * d['shared_prompt_share']:.0f}% of the pairs' tokens")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# arguments and main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_args(ap, DEFAULTS, "preference pairs (2 rows each)", "/tmp/llama-ft-dpobench")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}; default all")
    ap.add_argument("--pairs", type=int, help="synthetic pairs; default: as many as the run trains")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each method, alternating which goes first; the "
                                                          "table shows each method's median round; default 1")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta; default 0.1")
    ap.add_argument("--prompt-words", type=int, help=f"median prompt words; default {DEFAULTS['prompt_words']}")
    ap.add_argument("--response-words", type=int, help=f"median words of a response; default "
                                                       f"{DEFAULTS['response_words']}")
    args = ap.parse_args(argv)
    check_shared(args, SMOKE if args.smoke else DEFAULTS, ("beta", "prompt_words", "response_words", "rounds"))
    if args.pairs is not None and args.pairs < 1:
        die(f"--pairs {args.pairs}: expected a number > 0")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names or any(m not in METHODS for m in names):
        die(f"--methods {args.methods!r}: expected a comma list of {', '.join(METHODS)}")
    args.methods = [m for m in METHODS if m in names]
    return args


def main(argv: list[str] | None = None) -> int:
    return print_report(run, markdown, parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark (module doc); returns the report (print_report writes it to --json)."""
    head, model_dir, dims = start_run(args)

    from llama_ft.data import DataOptions, load_tokenizer, pad_token_id, prepare_examples

    tokenizer = load_tokenizer(str(model_dir))
    n = args.pairs or args.steps * args.grad_accum * args.batch * args.nproc
    data_file = args.dir / f"pairs-seed{args.seed}-n{n}-p{args.prompt_words}-r{args.response_words}.jsonl"
    if not data_file.exists():
        write_pairs(data_file, tokenizer, n, args.seed, args.prompt_words, args.response_words)
    os.environ["LLAMA_FT_CACHE"] = str(args.dir / "cache")  # the ranks then find the pairs tokenized
    examples, _ = prepare_examples(DataOptions(dataset=str(data_file), dataset_format="chat", objective="dpo"),
                                   tokenizer)
    ctx = {"model_dir": model_dir, "data_file": data_file, "examples_file": data_file, "examples": examples,
           "pad_id": pad_token_id(tokenizer), "dims": dims, "probe_dir": install_probe(args.dir / "probe-site")}
    ctx["pack_len"] = pack_lengths(examples, args.batch)
    flops = dpo_flops_per_token(dims, args.lora_r)

    # rounds alternate the order (ours first, then TRL first, ...) so that a slow stretch of a shared machine does
    # not always fall on the same method
    rounds = [measure_methods(list(METHODS)[::1 if k % 2 == 0 else -1], args, head,
                              lambda name: run_ours(name, args, ctx) if name in OURS else run_trl(args, ctx),
                              lambda raw: figures(raw, args, flops), "pairs_per_s") for k in range(args.rounds)]
    methods = {name: median_round([r[name] for r in rounds]) for name in METHODS}
    config = {**run_config(args, dims, model_dir, flops, 0.0), "beta": args.beta, "rounds": args.rounds,
              "prompt_words": args.prompt_words, "response_words": args.response_words, "pack_len": ctx["pack_len"]}
    return {"header": head, "config": config, "data": data_summary(data_file, examples), "method_labels": METHODS,
            "methods": methods, "compare": compare(methods, rounds, args.warmup)}


if __name__ == "__main__":
    sys.exit(main())
