"""`llama-ft quantize`: write a pre-quantized checkpoint, FP8 (--bits 8, half the bytes to read at every load) or
NF4 (--bits 4, about a quarter).

Layouts: --bits 8: llama_ft/fp8/checkpoint.py (Hugging Face's fine-grained FP8 layout, scales beside the bytes);
--bits 4: llama_ft/nf4/checkpoint.py (the bnb-4bit layout transformers + bitsandbytes write and read: NF4,
blocks of 64, double-quantized absmax), so the output also loads with a plain
`AutoModelForCausalLM.from_pretrained(DIR)` where bitsandbytes is installed.

Only the linear layers named by --target_modules (by default all seven LoRA targets) are
quantized; embeddings, norms and lm_head stay as they are. The quantization is exactly the one
`--quantize` applies on load (format.py), so training from this checkpoint equals training from
the bf16 one with --quantize. Works shard by shard (peak memory about one shard), written under
a temporary name, every file fsynced, and renamed at the end (fsutil.atomic_dir).

Disk space: the output size (1 byte (--bits 8) or 1/2 + 1/64 byte (--bits 4) per quantized weight plus its
scales, the rest as it is) is checked against the free space first; an ENOSPC that still happens is one
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
from llama_ft.nf4 import checkpoint as nf4_checkpoint
from llama_ft.nf4.format import BLOCK as NF4_BLOCK
from llama_ft.nf4.format import NESTED_BLOCK, quantize_nf4_reference
from llama_ft.shards import (
    CONFIG_NAME,
    INDEX_NAME,
    Checkpoint,
    copy_side_files,
    non_weight_bytes,
    open_checkpoint,
    rewrite_shards,
)

BITS = (4, 8)


def output_bytes(ckpt: Checkpoint, targets: tuple[str, ...] | list[str], bits: int = 8) -> int:
    """About the size of the quantized checkpoint, every other tensor keeping its bytes, plus the non-weight files.

    bits 8: 1 byte per value plus a float32 scale per BLOCK x BLOCK block. bits 4: ceil(n / 2) bytes of codes,
    one absmax code byte per 64 values, a float32 per 256 of those, the two code books (16 + 256 float32) and
    the quant-state JSON (under 256 bytes).
    """
    total = 0
    for name, info in ckpt.tensors.items():
        if not is_target(name, targets):
            total += info.nbytes
            continue
        n = math.prod(info.shape)
        if bits == 4:
            nb = -(-n // NF4_BLOCK)
            total += -(-n // 2) + nb + 4 * -(-nb // NESTED_BLOCK) + 4 * (16 + 256) + 256
            continue
        total += n
        if len(info.shape) == 2:
            total += -(-info.shape[0] // BLOCK) * -(-info.shape[1] // BLOCK) * 4
    return total + non_weight_bytes(ckpt.root)


def _nf4_config(ckpt: Checkpoint, targets: tuple[str, ...]) -> dict:
    """config.json's quantization_config of the NF4 copy (nf4/checkpoint.py), compute dtype the source's."""
    dtype = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "bfloat16"
    linears = {n.rsplit(".", 1)[0] for n, i in ckpt.tensors.items() if n.endswith(".weight") and len(i.shape) == 2}
    kept = sorted(m for m in linears if m.split(".")[-1] not in targets)
    # transformers skips lm_head by itself unless it is handed a list; embeddings are never Linear
    plain = all(m.split(".")[-1] in ("lm_head", "embed_tokens") for m in kept)
    return nf4_checkpoint.quantization_config(str(dtype), None if plain else kept, targets)


def quantize_checkpoint(model: Path, output: Path, targets: tuple[str, ...] = LLAMA_LINEAR_NAMES,
                        overwrite: bool = False, progress: bool = True, bits: int = 8) -> dict:
    """Write the --bits 8 (FP8) or --bits 4 (bnb-4bit NF4) copy of `model` quantized on `targets` to `output`."""
    from llama_ft.fp8 import quantize_fp8

    t0 = time.perf_counter()
    if bits not in BITS:
        raise UserError(f"--bits {bits}: expected 4 (NF4, the bnb-4bit layout) or 8 (FP8 e4m3)")
    model, output = Path(model), Path(output)
    ckpt = open_checkpoint(model, "--model")
    if nf4_checkpoint.is_bnb(ckpt.config):
        raise UserError(f"--model {model}: already quantized (bitsandbytes, {model / CONFIG_NAME} "
                        "quantization_config); pass the bf16 checkpoint")
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
        quantized += 1
        if bits == 4:  # codes, absmax and the rest of bitsandbytes' state beside their weight
            packed, absmax = quantize_nf4_reference(t.to(device))
            return nf4_checkpoint.nf4_state_tensors(name, packed.cpu(), absmax.cpu(), tuple(t.shape), t.dtype)
        q, s = quantize_fp8(t.to(device))
        return {name: q.view(FP8).cpu(), name + SCALE_SUFFIX: s.cpu()}  # scales beside their weight

    needed = output_bytes(ckpt, targets, bits)
    for leftover in remove_stale_temps(output):  # atomic_dir would remove them too; said here, not silently
        print(f"llama-ft quantize: removed {leftover} (the temporary output of a run that was killed)",
              file=sys.stderr)
    # atomic_dir checks the space and removes its temporary before a disk-full error becomes one line
    with disk_full_is_user_error(output, needed), atomic_dir(output, overwrite=True, needed=needed) as tmp:
        weight_map, total = rewrite_shards(ckpt, tmp, quantize_one, "quantizing shards", progress)
        config = dict(ckpt.config)
        config["quantization_config"] = (_nf4_config(ckpt, targets) if bits == 4
                                         else quantization_config(ckpt, targets))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        copy_side_files(model, tmp)
    return {"output": str(output), "quantized": quantized, "bytes": total, "checkpoint_bytes": ckpt.total_bytes(),
            "seconds": round(time.perf_counter() - t0, 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft quantize",
                                description="Write an FP8 (e4m3, 128x128 block scales; --bits 8) or NF4 (bnb-4bit "
                                            "layout, blocks of 64, double-quantized absmax; --bits 4) copy of a "
                                            "checkpoint.")
    p.add_argument("--model", required=True, help="bf16/fp16/fp32 Hugging Face model directory")
    p.add_argument("--output", required=True, help="directory for the quantized checkpoint")
    p.add_argument("--bits", type=int, default=8,
                   help="8: FP8 e4m3 (llama-ft's layout); 4: NF4 in the bnb-4bit layout transformers and "
                        "bitsandbytes read (default 8)")
    p.add_argument("--target_modules", nargs="+", default=list(LLAMA_LINEAR_NAMES),
                   help="linear layers to quantize (the LoRA targets you will train)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = tuple(expand_targets(args.target_modules))  # all|attention|mlp too
    r = quantize_checkpoint(Path(args.model), Path(args.output), targets, args.overwrite, not args.no_progress,
                            args.bits)
    fmt = "NF4 (bnb-4bit)" if args.bits == 4 else "FP8"
    print(f"llama-ft quantize: {r['quantized']} weights to {fmt} in {r['output']} "
          f"({r['bytes'] / 2**20:.1f} MiB, was {r['checkpoint_bytes'] / 2**20:.1f} MiB, {r['seconds']:.1f} s)")
    return 0
