"""GGUF files (llama.cpp's format) -> a Hugging Face safetensors directory llama-ft can train on.

    llama-ft convert-gguf MODEL.gguf OUT_DIR [--dtype bfloat16]

transformers reads the GGUF (`from_pretrained(dir, gguf_file=name, quantization_config=GgufConfig(
dequantize=True))`): every quantized block (Q4_1, Q8_0, ...) is expanded to floats, so the result is a plain
LlamaForCausalLM whose weights are the GGUF's values rounded to `dtype`. A quantized GGUF is a degraded copy
of its original: convert the original safetensors when you have them. The tokenizer, with its chat template,
comes from the same file. The directory is written under a temporary name and renamed when complete.

Needs the `gguf` package (`pip install gguf`, or `pip install llama-ft[gguf]`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_ft.errors import UserError, user_errors_exit
from llama_ft.fsutil import atomic_dir

DTYPES = ("bfloat16", "float16", "float32")


def gguf_files(path: str | Path) -> list[Path]:
    """The GGUF file `path` names, or the .gguf files of a directory without a config.json (what a user
    points --model_name_or_path at when they have a llama.cpp download); [] otherwise."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return [p]
    if p.is_dir() and not (p / "config.json").exists():
        return sorted(p.glob("*.gguf"))
    return []


def check_not_gguf(path: str | Path, flag: str = "--model_name_or_path") -> None:
    """UserError saying how to convert, when `path` is a GGUF file (or a folder of them) instead of an HF
    safetensors directory."""
    found = gguf_files(path)
    if found:
        raise UserError(f"{flag} {path}: a GGUF file ({found[0].name}), not a Hugging Face safetensors directory; "
                        f"convert it first: llama-ft convert-gguf {found[0]} OUT_DIR (needs pip install gguf), "
                        "then pass OUT_DIR")


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "bfloat16", overwrite: bool = False,
                 max_shard_size: str = "5GB") -> Path:
    """Write the model and tokenizer of `gguf_file` as an HF directory `out_dir` (module doc). Returns it."""
    import importlib.util

    src = Path(gguf_file)
    if not src.is_file():
        raise UserError(f"{gguf_file}: file not found (expected a .gguf model file)")
    if importlib.util.find_spec("gguf") is None:
        raise UserError("convert-gguf needs the gguf package: pip install gguf")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists (pass --overwrite to replace it)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    try:
        # dequantize=True: without it the weights stay packed and save_pretrained refuses to write them
        model = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.float32, trust_remote_code=False,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a malformed file fails in the gguf reader as struct, value, key errors...
        raise UserError(f"{src}: transformers cannot read this GGUF ({' '.join(str(e).split())[:300]})") from None
    model.config.name_or_path = str(src)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.to(getattr(torch, dtype)).save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft convert-gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("gguf_file", help="the .gguf model file")
    p.add_argument("output_dir", help="the Hugging Face directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the written weights")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (save_pretrained's)")
    p.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    return p


@user_errors_exit(prog="llama-ft convert-gguf")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(convert_gguf(args.gguf_file, args.output_dir, args.dtype, args.overwrite, args.max_shard_size))
    return 0
