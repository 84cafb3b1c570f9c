"""`llama-ft eval`: did the fine-tune work? Loss and greedy exact match on held-out data.

    llama-ft eval --model_name_or_path BASE [--adapter_dir OUTPUT_DIR] --dataset heldout.jsonl
                  [--dataset_format chat] [--metric loss exact_match] [--json report.json]

The model is a base, a base + PEFT adapters (the --output_dir of `llama-ft train`, or any PEFT LoRA
directory), or a merged directory; transformers loads it and peft puts the adapters on (llama_ft/generate.py).
The examples come from the training data pipeline (data/pipeline.py: same formats, chat template, labels, cache),
and the numbers are training's (train/evaluate.py):

    loss          nats per trained token over every example (train/loss.py's definition)
    exact_match   the share of answers whose greedy completion equals the reference (train/evaluate.py)

With `--json FILE` it writes {"loss", "exact_match", "examples", "answers", "matches", "trained_tokens", ...}
and the generations beside it, one JSON line per answer, in FILE's stem + ".generations.jsonl".

Several ranks (`torchrun --nproc_per_node N -m llama_ft.eval ...`, or the deepspeed launcher) share the
examples and answers: each rank holds a whole copy of the model (data-parallel evaluation); sums are
all-reduced, so the numbers do not depend on the rank count. A model too large for one device is evaluated
during training instead (`--eval_every N`, on the ZeRO-3 partitions).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llama_ft.checkpoint.gguf import check_not_gguf
from llama_ft.config import DATA_FLAGS, add_config_flags, validate_data_options
from llama_ft.config_file import add_config_flag, parse_args
from llama_ft.errors import UserError, user_errors_exit
from llama_ft.fsutil import atomic_write, atomic_write_json

log = logging.getLogger("llama_ft")
METRICS = ("loss", "exact_match")
EVAL_DATA_FLAGS = tuple(f for f in DATA_FLAGS if f not in ("packing", "seed"))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llama-ft eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Token-weighted loss and greedy exact match of a base model, base + adapters or a "
                            "merged model on held-out data.")
    add_config_flags(p, EVAL_DATA_FLAGS)
    add_config_flag(p)
    p.add_argument("--adapter_dir", "--adapter", dest="adapter_dir",
                   help="a PEFT LoRA adapter directory (llama-ft train's --output_dir); none for a base or merged "
                        "model")
    p.add_argument("--metric", nargs="+", default=list(METRICS), metavar="METRIC",
                   help="loss and/or exact_match")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="exact_match: tokens generated per answer (default: the reference's length + 16)")
    p.add_argument("--batch_size", type=int, default=8, help="loss: examples per forward pass")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--json", metavar="FILE", help="write the numbers here, and the generations beside it")
    return p


def generations_path(report: Path) -> Path:
    """Where the per-answer generations go: report.json -> report.generations.jsonl."""
    return report.with_name(f"{report.stem}.generations.jsonl")


def check_args(args: argparse.Namespace) -> None:
    unknown = [m for m in args.metric if m not in METRICS]
    if unknown:
        raise UserError(f"--metric {unknown[0]}: expected loss and/or exact_match")
    if not args.model_name_or_path:
        raise UserError("--model_name_or_path is required (a base or merged model directory)")
    model = Path(args.model_name_or_path)
    check_not_gguf(model)
    if (model / "adapter_config.json").is_file() and not (model / "config.json").is_file():
        raise UserError(f"--model_name_or_path {model}: holds PEFT adapters, not a model; pass it as --adapter_dir "
                        "and its base model as --model_name_or_path")
    if not (model / "config.json").is_file():
        raise UserError(f"--model_name_or_path {model}: no config.json there (expected a model directory: a base or a "
                        "merged model; adapters go in --adapter_dir)")
    if args.adapter_dir and not (Path(args.adapter_dir) / "adapter_config.json").is_file():
        raise UserError(f"--adapter_dir {args.adapter_dir}: no adapter_config.json there (expected the --output_dir "
                        "of llama-ft train, or another PEFT adapter directory)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: expected an integer >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: expected an integer >= 1")
    if args.json:
        report = Path(args.json)
        if report.is_dir():
            raise UserError(f"--json {report}: is a directory (expected a .json file path)")
        if report.resolve() == Path(args.dataset).expanduser().resolve():
            raise UserError(f"--json {report}: is the dataset itself; write the report elsewhere")


def check_adapter_fits(model_dir: str, adapter_dir: str) -> None:
    """One line naming both shapes when the adapters were trained for another base (merge.load_adapter's
    checks, on the safetensors headers of the base and the adapter tensors; a bnb-4bit base's weights by the
    shapes in their quant states, nf4.checkpoint.logical_view)."""
    from llama_ft.merge import load_adapter
    from llama_ft.nf4.checkpoint import is_bnb_4bit, logical_view
    from llama_ft.shards import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    load_adapter(Path(adapter_dir), logical_view(ckpt) if is_bnb_4bit(ckpt.config) else ckpt)


def load_examples(args: argparse.Namespace, tokenizer: Any):
    """The examples, through training's pipeline, and their stats."""
    from llama_ft.data import DataOptions, prepare_examples, use_chat_template
    from llama_ft.data.formats import CHAT

    if args.dataset_format == CHAT:
        use_chat_template(tokenizer, args.chat_template, args.tokenizer_name_or_path or args.model_name_or_path)
    return prepare_examples(DataOptions.from_config(args), tokenizer)


def distributed() -> tuple[int, int]:
    """(rank, world): a process group when a launcher started several ranks, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def evaluate_model(args: argparse.Namespace) -> dict[str, Any]:
    """Load, score, and return the report (every rank returns the same numbers; rank 0 writes)."""
    import torch

    from llama_ft.data import load_tokenizer, pad_token_id
    from llama_ft.generate import load_model, tokenizer_dir
    from llama_ft.train.evaluate import causal_lm, evaluate, example_answers, greedy_answers, unprompted_examples
    from llama_ft.train.loss import use_chunked_loss

    rank, world = distributed()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if args.adapter_dir:
        check_adapter_fits(args.model_name_or_path, args.adapter_dir)
    # the data first: a mistake in it is one line before minutes of model loading
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or tokenizer_dir(args.model_name_or_path, args.adapter_dir))
    examples, stats = load_examples(args, tokenizer)
    if "exact_match" in args.metric:
        bad = unprompted_examples(examples)
        if bad:
            raise UserError(f"--metric exact_match: example {bad[0]} (line {bad[0] + 1} of llama-ft data --dump) "
                            "has no assistant answer after a prompt to generate from (no assistant turn, or "
                            "--train_on_source trains every token); evaluate it with --metric loss")
    model = load_model(args.model_name_or_path, args.adapter_dir, dtype, device)
    report: dict[str, Any] = {"model": args.model_name_or_path, "adapter_dir": args.adapter_dir,
                              "dataset": args.dataset, "dataset_format": args.dataset_format,
                              "examples": len(examples), "dropped": stats.dropped, "ranks": world}
    if "loss" in args.metric:
        lm = causal_lm(model)
        try:
            head = use_chunked_loss(lm)
        except ValueError:  # an adapter on the LM head (PEFT can put one there; llama-ft never does)
            raise UserError(f"--adapter_dir {args.adapter_dir}: adapts the LM head, which llama-ft eval's chunked "
                            "loss reads as a plain weight; merge the adapters first (llama-ft merge) or use "
                            "--metric exact_match") from None
        scored = evaluate(model, head, examples, args.batch_size, pad_token_id(tokenizer), world, rank, None, 1024)
        lm.lm_head = lm.lm_head.head  # the real head back, for generation
        report.update(loss=scored["loss"], trained_tokens=scored["trained_tokens"])
    if "exact_match" in args.metric:
        answers = example_answers(examples)
        records = greedy_answers(model, tokenizer, answers, device, world, rank, args.max_new_tokens)
        matches = sum(r["match"] for r in records)
        report.update(exact_match=matches / len(records), answers=len(records), matches=matches)
        report["generations"] = records
    return report


def table(report: dict[str, Any]) -> str:
    what = report["model"] + (f" + adapters {report['adapter_dir']}" if report["adapter_dir"] else "")
    rows = [("model", what), ("dataset", f"{report['dataset']} (--dataset_format {report['dataset_format']}): "
                                         f"{report['examples']} examples")]
    if "loss" in report:
        rows.append(("loss", f"{report['loss']:.4f} nats per trained token ({report['trained_tokens']:,} tokens)"))
    if "exact_match" in report:
        rows.append(("exact_match", f"{report['exact_match']:.4f} ({report['matches']} of {report['answers']} "
                                    "answers, greedy)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_report(report: dict[str, Any], path: Path) -> None:
    """FILE (the numbers) and FILE's generations JSONL, each through a temporary file and a rename."""
    generations = report.pop("generations", None)
    if generations is not None:
        with atomic_write(generations_path(path)) as f:
            for r in generations:
                f.write(json.dumps(r) + "\n")
        report["generations_file"] = str(generations_path(path))
    atomic_write_json(path, report)


@user_errors_exit(prog="llama-ft eval")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)  # --config FILE: its values are the defaults
    check_args(args)
    validate_data_options(SimpleNamespace(**vars(args), packing=False))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    report = evaluate_model(args)
    if rank == 0:
        print(table(report))
        if args.json:
            write_report(report, Path(args.json))
    return 0
