"""The FP8 checkpoint layout `llama-ft quantize` writes and the loaders read.

Hugging Face's fine-grained FP8 layout (as DeepSeek-V3 ships and transformers' FineGrainedFP8 reads),
with the block scales beside the bytes in the same shard:

    <module>.weight            F8_E4M3 (N, K)                         e4m3 values q
    <module>.weight_scale_inv  F32 (ceil(N/128), ceil(K/128))         s, with W ~= q * s per 128x128 block
    config.json  "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                 "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                 "modules_to_not_convert": [...], "llama_ft_target_modules": [...]}
"""

from __future__ import annotations

from llama_ft.errors import UserError
from llama_ft.fp8.format import BLOCK
from llama_ft.shards import CONFIG_NAME, Checkpoint

SCALE_SUFFIX = "_scale_inv"


def is_target(name: str, targets: tuple[str, ...] | list[str]) -> bool:
    """`name` is the weight of a linear layer whose last path component is in `targets`."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in targets


def quantization_config(ckpt: Checkpoint, targets: tuple[str, ...] | list[str]) -> dict:
    """The config.json entry of an FP8 copy of `ckpt` quantized on `targets` (`ckpt` is the source, or the FP8
    copy itself: the scale tensors beside quantized weights are not modules left unconverted)."""
    kept = {n.rsplit(".", 1)[0] for n in ckpt.tensors if not is_target(n, targets) and not n.endswith(SCALE_SUFFIX)}
    return {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic",
        "modules_to_not_convert": sorted(kept),
        "llama_ft_target_modules": list(targets),
    }


def prequantized_targets(ckpt: Checkpoint, flag: str = "--model_name_or_path") -> list[str] | None:
    """The module names quantized in a checkpoint `llama-ft quantize` wrote; None for a plain one.

    Raises UserError when the checkpoint says it is FP8 in a layout that is not ours.
    """
    qc = ckpt.config.get("quantization_config")
    if not qc:
        return None
    where = f"{ckpt.root / CONFIG_NAME}: quantization_config"
    if qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3":
        raise UserError(f"{where} is {qc.get('quant_method')!r}/{qc.get('fmt')!r}, expected fp8/e4m3 "
                        "(a checkpoint written by llama-ft quantize, or a plain bf16 one)")
    if list(qc.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        raise UserError(f"{where}: weight_block_size {qc.get('weight_block_size')}, expected [{BLOCK}, {BLOCK}]")
    targets = qc.get("llama_ft_target_modules")
    if not isinstance(targets, list) or not targets:
        raise UserError(f"{where}: no llama_ft_target_modules (expected a checkpoint written by llama-ft quantize)")
    return targets


def check_prequantized(ckpt: Checkpoint, targets: list[str]) -> None:
    """Every quantized weight is F8_E4M3 with an F32 scale tensor of the block-grid shape."""
    for name, info in ckpt.tensors.items():
        if not is_target(name, targets):
            continue
        path = ckpt.root / info.shard
        if info.dtype != "F8_E4M3":
            raise UserError(f"{path}: tensor {name!r} is {info.dtype}, expected F8_E4M3 (pre-quantized checkpoint)")
        s = ckpt.tensors.get(name + SCALE_SUFFIX)
        n, k = info.shape
        want = (-(-n // BLOCK), -(-k // BLOCK))
        if s is None or s.dtype != "F32" or tuple(s.shape) != want:
            raise UserError(f"{path}: scale {name + SCALE_SUFFIX!r} missing or not F32 {list(want)} "
                            f"(block size {BLOCK}x{BLOCK} layout)")
