"""`llama-ft quantize`: write a pre-quantized FP8 checkpoint, half the bytes to read at every load.

Layout: llama_ft/fp8/checkpoint.py (Hugging Face's fine-grained FP8 layout, scales beside the bytes).

Only the linear layers named by --target_modules (by default all seven LoRA targets) are
quantized; embeddings, norms and lm_head stay as they are. The quantization is exactly the one
`--quantize` applies on load (format.py), so training from this checkpoint equals training from
the bf16 one with --quantize. Works shard by shard (peak memory about one shard), written under
a temporary name, every file fsynced, and renamed at the end (fsutil.atomic_dir).

Disk space: the output size (1 byte per quantized weight plus its float32 block scales, the rest as
it is) is checked against the free space first; an ENOSPC that still happens is one
`llama-ft: error: OUTPUT: disk full ...` line with nothing left under the final name or a temporary
one. A killed run's `.OUT.tmp-<host>-<pid>-*` directory is removed by the next run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from llama_ft.errors import UserError, user_errors_exit
from llama_ft.flags import expand_targets
from llama_ft.fp8.checkpoint import SCALE_SUFFIX, is_target, prequantized_targets, quantization_config
from llama_ft.fp8.format import BLOCK, FP8
from llama_ft.fsutil import atomic_dir, disk_full_is_user_error, is_within, remove_stale_temps
from llama_ft.lora import LLAMA_LINEAR_NAMES
from llama_ft.shards import (
    CONFIG_NAME,
    INDEX_NAME,
    Checkpoint,
    copy_side_files,
    non_weight_bytes,
    open_checkpoint,
    rewrite_shards,
)


def output_bytes(ckpt: Checkpoint, targets: tuple[str, ...] | list[str]) -> int:
    """About the size of the FP8 checkpoint: a quantized weight is 1 byte per value plus a float32 scale per
    BLOCK x BLOCK block, every other tensor keeps its bytes; plus the non-weight files."""
    total = 0
    for name, info in ckpt.tensors.items():
        if not is_target(name, targets):
            total += info.nbytes
            continue
        total += math.prod(info.shape)
        if len(info.shape) == 2:
            total += -(-info.shape[0] // BLOCK) * -(-info.shape[1] // BLOCK) * 4
    return total + non_weight_bytes(ckpt.root)


def quantize_checkpoint(model: Path, output: Path, targets: tuple[str, ...] = LLAMA_LINEAR_NAMES,
                        overwrite: bool = False, progress: bool = True) -> dict:
    from llama_ft.fp8 import quantize_fp8

    t0 = time.perf_counter()
    model, output = Path(model), Path(output)
    ckpt = open_checkpoint(model, "--model")
    if prequantized_targets(ckpt, "--model") is not None:
        raise UserError(f"--model {model}: already quantized")
    if is_within(output, model):
        raise UserError(f"--output {output}: inside --model {model} (expected a separate directory)")
    if output.exists() and not output.is_dir():
        # --overwrite would swap a file for the new directory and leave the file under a temporary name
        raise UserError(f"--output {output}: exists and is not a directory")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"--output {output}: exists and is not empty (pass --overwrite)")
    found = {n.split(".")[-2] for n in ckpt.tensors if is_target(n, targets)}
    if set(targets) - found:
        raise UserError(f"--target_modules: {sorted(set(targets) - found)} match no weight of {model}")

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    quantized = 0

    def quantize_one(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal quantized
        if not is_target(name, targets):
            return {name: t}
        q, s = quantize_fp8(t.to(device))
        quantized += 1
        return {name: q.view(FP8).cpu(), name + SCALE_SUFFIX: s.cpu()}  # scales beside their weight

    needed = output_bytes(ckpt, targets)
    for leftover in remove_stale_temps(output):  # atomic_dir would remove them too; said here, not silently
        print(f"llama-ft quantize: removed {leftover} (the temporary output of a run that was killed)",
              file=sys.stderr)
    # atomic_dir checks the space and removes its temporary before a disk-full error becomes one line
    with disk_full_is_user_error(output, needed), atomic_dir(output, overwrite=True, needed=needed) as tmp:
        weight_map, total = rewrite_shards(ckpt, tmp, quantize_one, "quantizing shards", progress)
        config = dict(ckpt.config)
        config["quantization_config"] = quantization_config(ckpt, targets)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        copy_side_files(model, tmp)
    return {"output": str(output), "quantized": quantized, "bytes": total, "checkpoint_bytes": ckpt.total_bytes(),
            "seconds": round(time.perf_counter() - t0, 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft quantize",
                                description="Write an FP8 (e4m3, 128x128 block scales) copy of a checkpoint.")
    p.add_argument("--model", required=True, help="bf16/fp16/fp32 Hugging Face model directory")
    p.add_argument("--output", required=True, help="directory for the FP8 checkpoint")
    p.add_argument("--target_modules", nargs="+", default=list(LLAMA_LINEAR_NAMES),
                   help="linear layers to quantize (the LoRA targets you will train)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = tuple(expand_targets(args.target_modules))  # all|attention|mlp too
    r = quantize_checkpoint(Path(args.model), Path(args.output), targets, args.overwrite, not args.no_progress)
    print(f"llama-ft quantize: {r['quantized']} weights to FP8 in {r['output']} "
          f"({r['bytes'] / 2**20:.1f} MiB, was {r['checkpoint_bytes'] / 2**20:.1f} MiB, {r['seconds']:.1f} s)")
    return 0
