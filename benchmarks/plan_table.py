"""Tables of `llama-ft plan` verdicts for Llama 3.1 8B/70B/405B (no runs: the planner's arithmetic only).

    python benchmarks/plan_table.py            # docs/memory.md: verdicts on common machines, bf16 and FP8
    python benchmarks/plan_table.py --bits     # BENCHMARKS.md: bits 16 / 8 / 4 x r 16 / 64 x 2048 / 8192 tokens
    python benchmarks/plan_table.py --peers    # BENCHMARKS.md: our plan at the settings peers published figures for

Default table (docs/memory.md states it): LoRA r=64 on all seven linears, packed rows of 4096 tokens, one row per
micro-batch, gradient checkpointing, sdpa, bf16 training, ds_configs/zero3.json, GPU memory as nvidia-smi
reports it (H100 80GB: 81559 MiB, H200: 143771 MiB); host memory is not checked, the column says what a node
needs at the offload ratio shown.

--bits: every Llama 3.1 size with bf16 (16), FP8 (8: --quantize) and NF4 (4: --bits 4) base weights, LoRA r 16 and
64 on all seven linears, one packed row of 2048 or 8192 tokens per micro-batch, gradient checkpointing, sdpa;
8 GPUs (and 1 GPU for 8B and 70B). A 48 GB card is planned as an L40S (45.0 GiB as nvidia-smi reports it: the
smaller of the 48 GB cards; an RTX A6000 has 48.0), an 80 GB card as an H100 80GB (79.6 GiB) (llama_ft/gpus.py).
Where a run does not fit without offload, the smallest --offload_ratio that fits and the host memory it needs.

--peers: the settings beside each peer's published figure, as far as the peer states them (BENCHMARKS.md gives
the sources); the longest sequence is searched on the planner at --max_seq_len steps of 256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama_ft.plan.command import make_plan  # noqa: E402

GiB = 2**30
MACHINES = {"1 x 8 H100 80GB": (1, 8, 81559 / 1024), "2 x 8 H100 80GB": (2, 8, 81559 / 1024),
            "1 H200 141GB": (1, 1, 143771 / 1024)}
MODELS = [("8b", False), ("70b", False), ("70b", True), ("405b", False), ("405b", True)]
FLAGS = ["--lora_r", "64", "--packing", "--max_seq_len", "4096", "--per_device_train_batch_size", "1",
         "--gradient_checkpointing"]

BITS = {16: [], 8: ["--quantize"], 4: ["--bits", "4"]}
BASE = {16: "bf16", 8: "FP8", 4: "NF4"}
CARDS = {"48 GB (L40S, 45.0 GiB)": "l40s", "80 GB (H100, 79.6 GiB)": "h100"}


def row(model: str, fp8: bool, machine: str) -> str:
    nodes, gpus, gb = MACHINES[machine]
    argv = [model, "--nodes", str(nodes), "--gpus_per_node", str(gpus), "--gpu_memory_gb", f"{gb:.2f}", *FLAGS,
            *(["--quantize"] if fp8 else [])]
    at_zero, _ = make_plan(argv)
    p, _ = make_plan([*argv, "--offload_ratio", "auto"])
    base = "FP8" if fp8 else "bf16"
    best = p["min_offload_ratio"]
    if best is None:
        bad = p["cannot_fit"]
        return (f"| {model.upper()} | {base} | {machine} | {at_zero['per_gpu']['total_bytes'] / GiB:.1f} | no | "
                f"does not fit at any ratio ({bad['term'].removesuffix('_bytes')} "
                f"{bad['term_bytes'] / GiB:.1f} GiB; {bad['total_bytes'] / GiB:.1f} GiB per GPU at 1.0) | - | - |")
    return (f"| {model.upper()} | {base} | {machine} | {at_zero['per_gpu']['total_bytes'] / GiB:.1f} | "
            f"{'yes' if at_zero['fits'] else 'no'} | {best:.2f} ({p['per_gpu']['total_bytes'] / GiB:.1f} GiB) | "
            f"{p['per_host']['total_bytes'] / GiB:.0f} | {p['step_time_lower_bound_s']:.2f} |")


def card_cell(argv: list[str], gpu: str) -> str:
    """On one kind of card: `fits`, the smallest --offload_ratio that fits with the host GiB it needs, or `no`
    with the term that does not fit at any ratio."""
    p, _ = make_plan([*argv, "--gpu", gpu, "--offload_ratio", "auto"])
    best = p["min_offload_ratio"]
    if best is None:
        bad = p["cannot_fit"]
        return f"no ({bad['term'].removesuffix('_bytes')} {bad['term_bytes'] / GiB:.1f} GiB at ratio 1.0)"
    if best == 0:
        return "fits"
    return f"offload {best:.2f} (host {p['per_host']['total_bytes'] / GiB:.0f} GiB)"


def bits_row(model: str, gpus: int, bits: int, r: int, seq: int) -> str:
    argv = [model, "--gpus_per_node", str(gpus), "--lora_r", str(r), "--packing", "--max_seq_len", str(seq),
            "--per_device_train_batch_size", "1", "--gradient_checkpointing", *BITS[bits]]
    at_zero, _ = make_plan([*argv, "--gpu", "h100"])
    cells = [card_cell(argv, gpu) for gpu in CARDS.values()]
    gib = at_zero["per_gpu"]["total_bytes"] / GiB
    return f"| {model.upper()} | {BASE[bits]} | {gpus} | {r} | {seq} | {gib:.1f} | {' | '.join(cells)} |"


def bits_table() -> None:
    print(f"| model | base | GPUs | r | tokens | GiB per GPU, no offload | {' | '.join(CARDS)} |")
    print("|---|---|---:|---:|---:|---:|" + "---|" * len(CARDS))
    for model in ("8b", "70b", "405b"):
        for gpus in (8, 1) if model != "405b" else (8,):
            for bits in BITS:
                for r in (16, 64):
                    for seq in (2048, 8192):
                        print(bits_row(model, gpus, bits, r, seq))


def longest_sequence(argv: list[str], gpu_gib: float, step: int = 256, top: int = 131072) -> int:
    """The longest --max_seq_len (a multiple of `step`) whose plan fits `gpu_gib` without offload (0: none)."""
    def fits(seq: int) -> bool:
        return make_plan([*argv, "--max_seq_len", str(seq), "--gpu_memory_gb", str(gpu_gib)])[0]["fits"]

    lo, hi = 0, top // step  # fits(lo * step) holds (or lo is 0); the answer is below hi + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * step):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def gib_of(argv: list[str]) -> float:
    return make_plan([*argv, "--gpu_memory_gb", "1000"])[0]["per_gpu"]["total_bytes"] / GiB


def peers_table() -> None:
    print("| peer setting (their figure: see the table beside) | our plan | GiB per GPU |")
    print("|---|---|---:|")
    # torchtune's README table: 405B QLoRA, 8 x A100, batch 2 packed to 2048 tokens; its 405B config: rank 16 on
    # q, v, output and the MLP, activation checkpointing
    tt = ["405b", "--bits", "4", "--gpus_per_node", "8", "--lora_r", "16", "--lora_target_modules", "q_proj", "v_proj",
          "o_proj", "gate_proj", "up_proj", "down_proj", "--packing", "--max_seq_len", "2048",
          "--per_device_train_batch_size", "2", "--gradient_checkpointing"]
    print(f"| torchtune: 405B QLoRA, 8 x A100 80GB, r 16 on q,v,o + MLP, batch 2 x 2048 packed, checkpointing | "
          f"`llama-ft plan {' '.join(tt)}` | {gib_of(tt):.1f} |")
    # axolotl's examples/llama-3/qlora-fsdp-405b.yaml: r 16 on all linears, 2048 packed, micro-batch 1, checkpointing
    ax = ["405b", "--bits", "4", "--gpus_per_node", "8", "--lora_r", "16", "--packing", "--max_seq_len", "2048",
          "--per_device_train_batch_size", "1", "--gradient_checkpointing"]
    print(f"| axolotl: 405B QLoRA + FSDP example, r 16 on all linears, micro-batch 1 x 2048 packed, checkpointing "
          f"(8 GPUs assumed; the example names none) | `llama-ft plan {' '.join(ax)}` | {gib_of(ax):.1f} |")
    # Unsloth's Llama 3.3 70B post: QLoRA rank 32 on all seven linears, batch 1, one padded sequence, one GPU
    us = ["70b", "--bits", "4", "--gpus_per_node", "1", "--lora_r", "32", "--dataset_format", "chat",
          "--per_device_train_batch_size", "1", "--gradient_checkpointing"]
    for seq in (2048, 8192):
        print(f"| Unsloth: 70B QLoRA on one GPU, r 32 on all seven linears, batch 1 | "
              f"`llama-ft plan {' '.join(us)} --max_seq_len {seq}` | {gib_of([*us, '--max_seq_len', str(seq)]):.1f} |")
    for card, gib in (("48 GB (RTX A6000, 48.0 GiB)", 48.0), ("80 GB (A100 80GB, 80.0 GiB)", 80.0)):
        for extra, how in (([], "checkpoints on the GPU"), (["--activation_offload"], "--activation_offload")):
            seq = longest_sequence([*us, *extra], gib)
            found = f"longest --max_seq_len: {seq:,} tokens" if seq else \
                f"none: {gib_of([*us, *extra, '--max_seq_len', '256']):.1f} GiB per GPU at 256 tokens"
            print(f"| Unsloth: 70B QLoRA, longest sequence on one {card} | the same, {how}, no weight offload | "
                  f"{found} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", action="store_true", help="the bits 16 / 8 / 4 table (BENCHMARKS.md)")
    g.add_argument("--peers", action="store_true", help="our plan at the peers' published settings (BENCHMARKS.md)")
    args = p.parse_args(argv)
    if args.bits:
        bits_table()
        return 0
    if args.peers:
        peers_table()
        return 0
    print("| model | base weights | machine | GiB per GPU, no offload | fits | smallest --offload_ratio (GiB per GPU "
          "then) | GiB per host then | PCIe s/step at least |")
    print("|---|---|---|---:|---|---|---:|---:|")
    for model, fp8 in MODELS:
        for machine in MACHINES:
            print(row(model, fp8, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
