"""Streaming LoRA merge: fold a PEFT adapter into a fresh Hugging Face checkpoint, one shard at a time.

The math (PEFT's LoRA, `fan_in_fan_out=False`, i.e. `nn.Linear` weights stored (out, in)):

    W  : (out, in)   base weight, bf16/fp16/fp32 in the base checkpoint
    A  : (r, in)     `<module>.lora_A.weight`
    B  : (out, r)    `<module>.lora_B.weight`
    s  = alpha / r            (or alpha / sqrt(r) with use_rslora)
    W' = round_to_dtype( fp32(W) + s * fp32(B) @ fp32(A) )

r and alpha are per module when the adapter config has `rank_pattern` / `alpha_pattern`
(resolved exactly as PEFT does, see `_pattern_value`). The product is done in float32 row block
by row block (`addmm_`), so the float32 scratch stays a few hundred MB whatever the weight size.

Streaming: the base checkpoint is read shard by shard; each output shard keeps the base shard's
file name and tensor set, is written with `safetensors.torch.save_file` and dropped before the
next shard is read. Peak memory is about one shard + the adapter tensors + one fp32 row block:
the whole model is never held. Everything (shards, index, config, tokenizer and other
non-weight files) is written into `atomic_dir(output)`, so a failure leaves nothing under the
final name, and every file is fsynced before the rename.

Disk space: the output's size is known from the headers (each tensor at its output dtype, plus the
side files) and checked against the free space before any shard is read; if the disk still fills up
(another writer, a quota), the ENOSPC becomes one `llama-ft: error: OUTPUT: disk full ...` line and
the temporary directory is removed. A run killed outright leaves its `.OUT.tmp-<host>-<pid>-*`
directory behind; the next run for the same --output removes it (fsutil.remove_stale_temps).

Everything a user can get wrong (paths, adapter format, keys that do not fit the base) is
checked from the safetensors headers and the (small) adapter file *before* any shard is read.

    apply_ds_adapters.py --base BASE_DIR --adapter ADAPTER_DIR --output OUT_DIR [--dtype bfloat16]
    (Snowflake spellings: --model-name, --ckpt-path, --output-dir)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from llama_ft.errors import UserError, user_errors_exit
from llama_ft.fsutil import atomic_dir, disk_full_is_user_error, is_within, remove_stale_temps
from llama_ft.shards import (
    CONFIG_NAME,
    INDEX_NAME,
    ST_DTYPES,
    Checkpoint,
    copy_side_files,
    non_weight_bytes,
    open_checkpoint,
    rewrite_shards,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MERGEABLE = {torch.bfloat16, torch.float16, torch.float32}


# `base_model.model.<module>.lora_A.weight` as PEFT's save_pretrained writes it (adapter name stripped);
# the prefix and an adapter name before `.weight` are tolerated for raw state dicts.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

# float32 scratch per row block, in elements (16 Mi elements = 64 MiB)
BLOCK_ELEMENTS = 1 << 24


@dataclass
class LoraPair:
    """One targeted linear layer: base weight name, A (r, in), B (out, r) and the scale s."""

    weight: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key` rule: the first pattern key that matches the end of the module name
    at a dot boundary (`re.match(rf"(.*\\.)?({key})$", module)`) gives the value; else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets(target_modules, module: str) -> bool:
    """Does PEFT's `target_modules` (list of name suffixes, regex string, or "all-linear") select `module`?"""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return not module.endswith("lm_head")
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def load_lora_config(adapter: Path):
    """Parse and check `adapter_config.json` with peft's `LoraConfig`; UserError for what we cannot merge."""
    from peft import LoraConfig

    cfg_path = adapter / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise UserError(f"--adapter {adapter}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter directory)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: field 'peft_type' is {raw.get('peft_type')!r} (only LORA adapters can be merged)")
    try:
        cfg = LoraConfig.from_pretrained(str(adapter))
    except Exception as e:  # peft raises TypeError/ValueError for bad fields
        raise UserError(f"{cfg_path}: not a valid LoRA config ({' '.join(str(e).split())})") from e

    def bad(field: str, why: str) -> UserError:
        return UserError(f"{cfg_path}: field '{field}' is {getattr(cfg, field, None)!r} ({why})")

    # peft takes wrong JSON types as they come; the merge's arithmetic then failed with TypeError tracebacks (fuzzer)
    def count(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not count(cfg.r):
        raise bad("r", "expected an integer > 0")
    if not number(cfg.lora_alpha):
        raise bad("lora_alpha", "expected a number")
    tm = cfg.target_modules
    if not (tm is None or isinstance(tm, str) or (isinstance(tm, (list, set, tuple))
                                                   and all(isinstance(t, str) for t in tm))):
        raise bad("target_modules", "expected a list of module names, a regex string or null")
    if isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as e:
            raise bad("target_modules", f"not a valid regex: {e}") from None
    for field, ok in (("rank_pattern", count), ("alpha_pattern", number)):
        patterns = getattr(cfg, field, None) or {}
        if not isinstance(patterns, dict) or not all(isinstance(k, str) and ok(v) for k, v in patterns.items()):
            raise bad(field, "expected {module pattern: " + ("rank}" if field == "rank_pattern" else "alpha}"))
        for k in patterns:
            try:
                re.compile(k)
            except re.error as e:
                raise bad(field, f"{k!r} is not a valid regex: {e}") from None
    if getattr(cfg, "use_dora", False):
        raise bad("use_dora", "DoRA adapters are not supported by this merge; expected false")
    if cfg.bias != "none":
        raise bad("bias", 'trained biases are not supported; expected "none"')
    if getattr(cfg, "lora_bias", False):
        raise bad("lora_bias", "lora_B biases are not supported; expected false")
    if cfg.fan_in_fan_out:
        raise bad("fan_in_fan_out", "Llama uses nn.Linear (out, in) weights; expected false")
    if cfg.modules_to_save:
        raise bad("modules_to_save", "fully trained modules are not supported; expected null")
    if getattr(cfg, "layer_replication", None):
        raise bad("layer_replication", "expected null")
    if getattr(cfg, "target_parameters", None):
        raise bad("target_parameters", "only target_modules adapters are supported; expected null")
    if getattr(cfg, "use_qalora", False) or getattr(cfg, "alora_invocation_tokens", None):
        raise UserError(f"{cfg_path}: QA-LoRA / aLoRA adapters cannot be merged into plain weights")
    if getattr(cfg, "trainable_token_indices", None):
        raise bad("trainable_token_indices", "expected null")
    return cfg


def load_adapter(adapter: Path, ckpt: Checkpoint) -> tuple[dict[str, LoraPair], object]:
    """Read the adapter and check it against the base's headers.

    Returns ({base weight name: LoraPair}, LoraConfig). Raises UserError for: a missing directory or
    file, a key that is not lora_A/lora_B, an unpaired A or B, target modules absent from the base,
    a key whose base weight does not exist, a base weight that is not a bf16/fp16/fp32 matrix, and
    A/B shapes that do not fit W or the configured rank.
    """
    if not adapter.is_dir():
        raise UserError(f"--adapter {adapter}: not a directory (expected a PEFT LoRA adapter directory)")
    cfg = load_lora_config(adapter)
    wpath = adapter / ADAPTER_WEIGHTS
    if not wpath.is_file():
        why = "found adapter_model.bin, which" if (adapter / "adapter_model.bin").exists() else ".bin adapters"
        raise UserError(
            f"--adapter {adapter}: no {ADAPTER_WEIGHTS} ({why} is not read because it needs pickle; "
            "save the adapter with safetensors)"
        )
    try:
        tensors = load_file(str(wpath))
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise UserError(f"{wpath}: cannot read safetensors file ({' '.join(str(e).split())})") from e
    if not tensors:
        raise UserError(f"{wpath}: holds no tensors (expected lora_A/lora_B weights)")

    modules = {n[: -len(".weight")] for n in ckpt.tensors if n.endswith(".weight")}
    targeted = [m for m in modules if _targets(cfg.target_modules, m)]
    if cfg.target_modules is not None and not targeted:
        tm = sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list)) else cfg.target_modules
        raise UserError(
            f"{adapter / ADAPTER_CONFIG}: none of target_modules {tm} exist in --base {ckpt.root} "
            "(adapter trained for another model?)"
        )

    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise UserError(f"{wpath}: tensor {key!r} is not a LoRA lora_A/lora_B weight (cannot merge it)")
        halves.setdefault(m["module"], {})[m["ab"]] = (key, t)

    pairs: dict[str, LoraPair] = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            have, need = next(iter(ab)), "B" if "A" in ab else "A"
            raise UserError(f"{wpath}: {ab[have][0]!r} has no matching lora_{need} tensor")
        (ka, a), (_, b) = ab["A"], ab["B"]
        weight = f"{module}.weight"
        info = ckpt.tensors.get(weight)
        if info is None:
            raise UserError(
                f"{wpath}: tensor {ka!r} targets {weight!r}, which is not in --base {ckpt.root} "
                "(missing target module: adapter trained for another model?)"
            )
        if ST_DTYPES.get(info.dtype) not in MERGEABLE or len(info.shape) != 2:
            raise UserError(
                f"{ckpt.root / info.shard}: base weight {weight!r} is {info.dtype} {list(info.shape)} "
                "(expected a bf16/fp16/fp32 matrix to merge into)"
            )
        out_f, in_f = info.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise UserError(
                f"{wpath}: shape mismatch for {weight!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                f"do not fit base weight {list(info.shape)} (expected A [r, {in_f}], B [{out_f}, r])"
            )
        r = _pattern_value(cfg.rank_pattern, module, cfg.r)
        alpha = _pattern_value(cfg.alpha_pattern, module, cfg.lora_alpha)
        if a.shape[0] != r:
            raise UserError(
                f"{wpath}: shape mismatch for {ka!r}: rank {a.shape[0]} but adapter_config.json gives r={r} for it"
            )
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        if not abs(scale) <= torch.finfo(torch.float32).max:  # the fp32 merge could not take it (fuzzer)
            raise UserError(f"{adapter / ADAPTER_CONFIG}: lora_alpha {alpha!r} / r {r!r} gives the scale {scale!r} "
                            f"for {weight!r}, beyond float32")
        pairs[weight] = LoraPair(weight=weight, a=a, b=b, scale=float(scale))
    return pairs, cfg


def merge_weight(w: torch.Tensor, pair: LoraPair, dtype: torch.dtype) -> torch.Tensor:
    """W' = (fp32(W) + s * fp32(B) @ fp32(A)) rounded to `dtype`, in row blocks to bound the fp32 scratch."""
    a = pair.a.to(torch.float32)
    b = pair.b.to(torch.float32)
    out = torch.empty(w.shape, dtype=dtype)
    rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    for i in range(0, w.shape[0], rows):
        block = w[i : i + rows].to(torch.float32, copy=True)  # never modify the base tensor in place
        block.addmm_(b[i : i + rows], a, alpha=pair.scale)
        out[i : i + rows] = block.to(dtype)
    return out


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def output_bytes(ckpt: Checkpoint, target_dtype: torch.dtype | None) -> int:
    """About the size of the merged checkpoint: every tensor at its output dtype (as merge_one casts it),
    plus the non-weight files. Shard headers (a few KB each) are left out."""
    total = 0
    for info in ckpt.tensors.values():
        dt = ST_DTYPES.get(info.dtype)
        if target_dtype is not None and dt is not None and dt.is_floating_point:
            total += math.prod(info.shape) * target_dtype.itemsize
        else:
            total += info.nbytes
    return total + non_weight_bytes(ckpt.root)


def _check_output(base: Path, adapter: Path, output: Path, overwrite: bool) -> None:
    if is_within(output, base):
        raise UserError(f"--output {output}: is inside --base {base} (choose a directory outside the base model)")
    if is_within(base, output):
        raise UserError(f"--output {output}: contains --base {base} (choose a directory that does not hold it)")
    if is_within(adapter, output):
        raise UserError(f"--output {output}: is or contains --adapter {adapter} (choose a new directory)")
    if output.exists():
        if not output.is_dir():
            raise UserError(f"--output {output}: exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise UserError(f"--output {output}: exists and is not empty (pass --overwrite to replace it)")



def check_unquantized_base(ckpt) -> None:
    """The merge folds s B A into the base's own weights: a pre-quantized base (FP8 by `llama-ft quantize`, NF4
    by bitsandbytes) has no weights to fold into. QLoRA practice merges onto the bf16 weights; one line says so."""
    qc = ckpt.config.get("quantization_config")
    if isinstance(qc, dict) and qc:
        kind = {"bitsandbytes": "bitsandbytes (4-bit or 8-bit)", "fp8": "FP8"}.get(qc.get("quant_method"),
                                                                                 repr(qc.get("quant_method")))
        raise UserError(f"--base {ckpt.root}: a {kind} quantized checkpoint (config.json quantization_config); "
                        "the merge needs the bf16 base the adapters were trained from (the unquantized weights, "
                        "as QLoRA merges)")

def merge_adapters(
    base: Path,
    adapter: Path,
    output: Path,
    overwrite: bool = False,
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """Merge the PEFT LoRA adapter in `adapter` into the checkpoint `base`, writing a new checkpoint to `output`.

    dtype: None keeps each tensor's dtype; "bfloat16"/"float16"/"float32" casts every floating tensor
    (and sets config.json's dtype). Returns {"output", "tensors_merged", "shards_written", "seconds",
    "peak_rss_bytes"}; peak_rss_bytes is the process's peak RSS (includes whatever ran before).
    """
    t0 = time.perf_counter()
    base, adapter, output = Path(base), Path(adapter), Path(output)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    target_dtype = DTYPES[dtype] if dtype else None

    ckpt = open_checkpoint(base, "--base")
    check_unquantized_base(ckpt)
    pairs, _ = load_adapter(adapter, ckpt)
    _check_output(base, adapter, output, overwrite)

    sharded = (base / INDEX_NAME).exists()
    merged = 0

    def merge_one(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        nonlocal merged
        keep = target_dtype if (target_dtype is not None and t.is_floating_point()) else t.dtype
        pair = pairs.get(name)
        if pair is not None:
            merged += 1
            return {name: merge_weight(t, pair, keep)}
        return {name: t.to(keep) if keep != t.dtype else t}

    # An existing empty --output is replaced (it was checked above). The space check and the ENOSPC mapping
    # come from the output size; atomic_dir removes its temporary before the disk-full error is raised.
    needed = output_bytes(ckpt, target_dtype)
    for leftover in remove_stale_temps(output):  # atomic_dir would remove them too; said here, not silently
        print(f"llama-ft merge: removed {leftover} (the temporary output of a run that was killed)", file=sys.stderr)
    with disk_full_is_user_error(output, needed), atomic_dir(output, overwrite=True, needed=needed) as tmp:
        weight_map, total_size = rewrite_shards(ckpt, tmp, merge_one, "merging shards", progress)
        if sharded:
            metadata = dict(ckpt.index_metadata)
            metadata["total_size"] = total_size
            index = {"metadata": metadata, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if dtype is None:
            shutil.copy2(base / CONFIG_NAME, tmp / CONFIG_NAME)  # byte-identical
        else:
            config = dict(ckpt.config)
            for k in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
                config[k] = dtype
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(base, tmp)

    return {
        "output": str(output),
        "tensors_merged": merged,
        "shards_written": len(ckpt.shards),
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def build_parser() -> argparse.ArgumentParser:
    """Flags of `apply_ds_adapters.py` / `llama-ft merge` (Snowflake's spellings are aliases)."""
    p = argparse.ArgumentParser(
        prog="llama-ft merge",
        description="Fold a PEFT LoRA adapter into a Hugging Face safetensors checkpoint, one shard at a time.",
    )
    p.add_argument(
        "--base",
        "--model-name",
        dest="base",
        required=True,
        type=Path,
        help="base model directory (HF safetensors: config.json + shards + index)",
    )
    p.add_argument(
        "--adapter",
        "--ckpt-path",
        dest="adapter",
        required=True,
        type=Path,
        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
    )
    p.add_argument(
        "--output",
        "--output-dir",
        dest="output",
        required=True,
        type=Path,
        help="directory for the merged checkpoint (written atomically)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="dtype of the merged floating tensors (default: keep the base's)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parse flags, merge, print a one-line summary. UserErrors exit 2 with one line."""
    args = build_parser().parse_args(argv)
    s = merge_adapters(
        args.base, args.adapter, args.output, overwrite=args.overwrite, dtype=args.dtype, progress=args.progress
    )
    print(
        f"llama-ft merge: merged {s['tensors_merged']} LoRA weights into {s['output']} "
        f"({s['shards_written']} shards, {s['seconds']:.1f} s, peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB)"
    )
    return 0
