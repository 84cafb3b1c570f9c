"""`llama-ft generate`: a completion from a base model with trained adapters, or from a merged model.

    llama-ft generate --model_name_or_path BASE --adapter OUTPUT_DIR --prompt "..."
    llama-ft generate --model_name_or_path MERGED --messages '[{"role": "user", "content": "Hi"}]'

The sanity check a fine-tuning recipe ends with. transformers loads the model and generates; peft's
PeftModel puts the adapters on it; nothing here decodes by hand. The prompt is tokenized the way training
tokenized a source (`tokenizer(text)`: BOS added by the tokenizer); `--messages` (a JSON list of role/content
objects, inline or a file) goes through the chat template with the assistant header appended. The tokenizer
(and so the chat template) is the adapter directory's when it has one (training saves it there with the
template it trained with), else the model's. Only the completion is printed, on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llama_ft.checkpoint.gguf import check_not_gguf
from llama_ft.errors import UserError, user_errors_exit

ROLES = ("system", "user", "assistant", "tool")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llama-ft generate", description="Generate a completion with trained LoRA adapters.")
    p.add_argument("--model_name_or_path", required=True, help="the base model directory (or a merged one)")
    p.add_argument("--adapter", help="a PEFT adapter directory (llama-ft train's --output_dir); none for a merged "
                                     "model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text, exactly as the model should see it")
    src.add_argument("--messages", help="a JSON list of {\"role\", \"content\"} objects, or a .json file holding "
                                        "one; rendered with the chat template")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="default: bfloat16 on a GPU, float32 on CPU")
    return p


def parse_messages(value: str) -> list[dict[str, str]]:
    """--messages: inline JSON or a file; a non-empty list of {"role": one of ROLES, "content": str}."""
    path = Path(value)
    where = "--messages"
    text = value
    if not value.lstrip().startswith("[") and path.is_file():
        where, text = f"--messages {path}", path.read_text()
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON (line {e.lineno}: {e.msg}); expected a list of "
                        "{\"role\", \"content\"} objects") from None
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty JSON list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(f"{where}: item {i} is {json.dumps(m)[:80]}; expected {{\"role\": one of "
                            f"{', '.join(ROLES)}, \"content\": a string}}")
    return messages


def tokenizer_dir(model_dir: str, adapter: str | None) -> str:
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        return adapter
    return model_dir


def load(model_dir: str, adapter: str | None, dtype: Any, device: Any):
    """(model in eval mode on `device`, tokenizer: the adapter directory's when it has one, else the model's)."""
    from llama_ft.data import load_tokenizer

    model = load_model(model_dir, adapter, dtype, device)
    return model, load_tokenizer(tokenizer_dir(model_dir, adapter))


def load_model(model_dir: str, adapter: str | None, dtype: Any, device: Any):
    """The model in eval mode on `device`, with the PEFT adapters on when given; a bitsandbytes checkpoint (bnb-4bit:
    `llama-ft quantize --bits 4`, the Hub's *-bnb-4bit) through bitsandbytes. UserError for a missing model, a
    directory that is not an adapter, adapters that do not fit the base, or bitsandbytes missing for such a base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llama_ft.data.readers import one_line

    check_not_gguf(model_dir)
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model_name_or_path {model_dir}: no config.json there (expected a model directory)")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter}: no adapter_config.json there (expected the --output_dir of "
                        "llama-ft train, or another PEFT adapter directory)")
    bnb = is_bitsandbytes_checkpoint(model_dir)
    if bnb:
        require_bitsandbytes(model_dir)
    try:  # a quantized model is placed by device_map while loading (transformers' way for them), not moved after
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False,
                                                     **({"device_map": whole_on(device)} if bnb else {}))
    except ImportError as e:  # transformers' own check (bitsandbytes or accelerate missing or too old)
        if not bnb:
            raise
        raise UserError(f"{BNB_NEEDED.format(model_dir=model_dir)} ({one_line(e)[:300]})") from None
    if adapter is not None:
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, target modules missing
            raise UserError(f"--adapter {adapter}: does not fit the base {model_dir} ({one_line(e)[:300]})") from None
    return (model if bnb else model.to(device)).eval()


BNB_NEEDED = ("--model_name_or_path {model_dir}: a bitsandbytes-quantized checkpoint (config.json "
              "quantization_config); transformers loads it with bitsandbytes: pip install bitsandbytes")


def whole_on(device: Any) -> dict[str, int | str]:
    """transformers' device_map for the whole model on `device`: a GPU by its index, else the device type."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": device.type}


def is_bitsandbytes_checkpoint(model_dir: str) -> bool:
    """config.json's quantization_config says bitsandbytes (4-bit NF4 as `llama-ft quantize --bits 4` and the Hub's
    *-bnb-4bit repositories write, or 8-bit). An unreadable config.json is transformers' to report."""
    from llama_ft.nf4.checkpoint import is_bnb

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_bnb(config)


def require_bitsandbytes(model_dir: str) -> None:
    """One line, not transformers' traceback, where bitsandbytes (not a dependency of llama-ft: the product never
    runs its kernels) is not importable."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(BNB_NEEDED.format(model_dir=model_dir)) from None


def prompt_ids(tokenizer: Any, prompt: str | None, messages: list[dict[str, str]] | None):
    """(1, T) input ids: the prompt as training tokenizes a source, or the messages through the chat template
    with the assistant header appended."""
    if messages is None:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not tokenizer.chat_template:
        raise UserError("--messages: the tokenizer has no chat template (train with --dataset_format chat, or use "
                        "--prompt)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def generation_kwargs(tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    """transformers' generate arguments: greedy at temperature 0, else sampling with temperature and top_p."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "use_cache": True}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


@user_errors_exit(prog="llama-ft generate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: expected an integer >= 1")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: expected a value >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p}: expected a value in (0, 1]")
    messages = parse_messages(args.messages) if args.messages is not None else None

    import torch
    from transformers import set_seed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = load(args.model_name_or_path, args.adapter, dtype, device)
    ids = prompt_ids(tokenizer, args.prompt, messages).to(device)
    set_seed(args.seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             **generation_kwargs(tokenizer, args.max_new_tokens, args.temperature, args.top_p))
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
