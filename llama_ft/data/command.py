"""`llama-ft data`: see exactly what the model will be trained on, before a GPU-hour is spent.

    llama-ft data --model_name_or_path DIR [--dataset FILE|NAME] [--dataset_format chat]
                  [--chat_template T.jinja] [--max_seq_len N] [--dump OUT.jsonl] [--preview K] ...

It takes the data flags of `llama-ft train` and runs the same pipeline (data/pipeline.py), so the
examples it shows are the ones training reads (and it fills the same tokenize cache). It prints
a summary: examples, token-length percentiles, how many were cut, the share of tokens trained.
`--preview K` prints the first K examples decoded, trained spans marked. `--dump OUT.jsonl` writes
one line per example, in dataset order: {"input_ids": [...], "labels": [...]}, labels unshifted
(labels[i] = input_ids[i] where token i is trained, -100 elsewhere), written atomically. With
`--packing`, it writes the packed rows of the first epoch instead, in training order for `--seed`, as
{"input_ids", "labels", "position_ids"} (each example's first label -100, data/packing.py): the rows
training reads when it has no eval split (--eval_dataset_size 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from llama_ft.config import DATA_FLAGS, TrainConfig, add_config_flags, validate_data_options
from llama_ft.config_file import add_config_flag, parse_args
from llama_ft.data.batches import epoch_rows, example_lengths
from llama_ft.data.chat import use_chat_template
from llama_ft.data.collate import collate_packed, pad_token_id
from llama_ft.data.formats import CHAT, IGNORE_INDEX
from llama_ft.data.pipeline import DataOptions, DataStats, load_tokenizer, prepare_examples
from llama_ft.errors import UserError, user_errors_exit
from llama_ft.fsutil import atomic_write

MARK_OPEN, MARK_CLOSE = "[[", "]]"
GREEN, RESET = "\033[42;30m", "\033[0m"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft data", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Show what training will read: a summary of the tokenized examples, "
                                            "a decoded preview with the trained spans marked, and a dump.")
    add_config_flags(p, DATA_FLAGS)
    add_config_flag(p)
    p.add_argument("--dump", metavar="OUT.jsonl", help="write every example as {\"input_ids\", \"labels\"} JSON lines")
    p.add_argument("--preview", type=int, default=0, metavar="K", help="print the first K examples decoded")
    return p


def token_stats(examples) -> dict[str, Any]:
    """Lengths and trained-token counts of all examples, computed on the Arrow columns (no Python lists)."""
    import pyarrow.compute as pc

    table = examples.with_format("arrow")[:]
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    labels = table.column("labels")
    trained_all = pc.sum(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)).as_py() or 0
    first = pc.sum(pc.not_equal(pc.list_element(labels, 0), IGNORE_INDEX)).as_py() or 0
    trained = trained_all - first  # label 0 is never predicted (train/loss.py)
    pct = np.percentile(lengths, [50, 90, 99]).round().astype(int).tolist()
    return {"tokens": int(lengths.sum()), "trained": int(trained), "min": int(lengths.min()),
            "max": int(lengths.max()), "mean": float(lengths.mean()), "p50": pct[0], "p90": pct[1], "p99": pct[2]}


def summary(opts: DataOptions, stats: DataStats, tok: dict[str, Any]) -> str:
    share = 100.0 * tok["trained"] / max(tok["tokens"], 1)
    cut = f"{stats.cut} of {stats.examples} at --max_seq_len {opts.max_seq_len}" if opts.max_seq_len else \
        "none (no --max_seq_len)"
    rows = [
        ("dataset", f"{opts.dataset} (--dataset_format {opts.dataset_format})"),
        ("rows read", f"{stats.rows}"),
        ("examples", f"{stats.examples} ({stats.dropped} dropped: no token to train on)"),
        ("cut", cut),
        ("tokens per example", f"p50 {tok['p50']}, p90 {tok['p90']}, p99 {tok['p99']}, min {tok['min']}, "
                               f"max {tok['max']}, mean {tok['mean']:.1f}"),
        ("tokens", f"{tok['tokens']:,}"),
        ("trained tokens", f"{tok['trained']:,} ({share:.1f}% of all tokens)"),
        ("cache", f"{stats.cache_file} ({'reused' if stats.from_cache else 'tokenized now'})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def render_marked(tokenizer: Any, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded example, each maximal run of trained tokens wrapped in [[ ]] (or green on a terminal)."""
    parts, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            if labels[start] != IGNORE_INDEX:
                text = f"{GREEN}{text}{RESET}" if color else f"{MARK_OPEN}{text}{MARK_CLOSE}"
            parts.append(text)
            start = i
    return "".join(parts)


def preview(examples, tokenizer: Any, k: int, out: TextIO) -> None:
    color = out.isatty()
    legend = "trained tokens on green" if color else f"trained tokens between {MARK_OPEN} and {MARK_CLOSE}"
    print(f"\nfirst {min(k, len(examples))} examples ({legend}):", file=out)
    for i in range(min(k, len(examples))):
        ex = examples[i]
        n = sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX)
        print(f"--- example {i}: {len(ex['input_ids'])} tokens, {n} trained ---", file=out)
        print(render_marked(tokenizer, ex["input_ids"], ex["labels"], color), file=out)


def dump(examples, path: Path) -> None:
    """Every example as one JSON line, in dataset order, through a temporary file renamed when complete."""
    from tqdm import tqdm

    with atomic_write(path) as f:
        for batch in tqdm(examples.iter(batch_size=1000), total=-(-len(examples) // 1000), desc="dump",
                          unit="batch", disable=None):
            for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
                f.write(json.dumps({"input_ids": ids, "labels": labels}, separators=(",", ":")) + "\n")


def dump_packed(examples, rows: list[list[int]], pad_id: int, path: Path) -> None:
    """Each packed row as one JSON line {"input_ids", "labels", "position_ids"}, as collate_packed builds it."""
    from tqdm import tqdm

    with atomic_write(path) as f:
        for row in tqdm(rows, desc="dump", unit="row", disable=None):
            t = collate_packed([[examples[i] for i in row]], pad_id)
            line = {k: t[k][0].tolist() for k in ("input_ids", "labels", "position_ids")}
            f.write(json.dumps(line, separators=(",", ":")) + "\n")


def packing_line(rows: list[list[int]], lengths: list[int], pack_len: int) -> str:
    fill = 100 * sum(lengths) / (len(rows) * pack_len)
    return f"packed rows         {len(rows)} rows of {pack_len} tokens for {len(lengths)} examples ({fill:.1f}% filled)"


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)  # --config FILE: its values are the defaults
    cfg = TrainConfig(**{k: getattr(args, k) for k in DATA_FLAGS})
    tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if not tok_path:
        raise UserError("--model_name_or_path (or --tokenizer_name_or_path) is required: the tokenizer decides the ids")
    validate_data_options(cfg)
    if args.preview < 0:
        raise UserError(f"--preview {args.preview}: expected a number of examples >= 0")
    if args.dump and Path(args.dump).is_dir():
        raise UserError(f"--dump {args.dump}: is a directory (expected a .jsonl file path)")
    if args.dump and Path(args.dump).resolve() == Path(cfg.dataset).expanduser().resolve():
        raise UserError(f"--dump {args.dump}: is the dataset itself; write the dump elsewhere")
    tokenizer = load_tokenizer(tok_path)
    if cfg.dataset_format == CHAT:
        use_chat_template(tokenizer, cfg.chat_template, tok_path)
    opts = DataOptions.from_config(cfg)
    examples, stats = prepare_examples(opts, tokenizer)
    print(summary(opts, stats, token_stats(examples)))
    rows = None
    if cfg.packing:  # epoch 0 of the training stream, all examples
        lengths = example_lengths(examples)
        rows = epoch_rows(lengths, cfg.seed, 0, cfg.max_seq_len)
        print(packing_line(rows, lengths, cfg.max_seq_len))
    if args.preview:
        preview(examples, tokenizer, args.preview, sys.stdout)
    if args.dump and rows is not None:
        dump_packed(examples, rows, pad_token_id(tokenizer), Path(args.dump))
        print(f"\nwrote {len(rows)} packed rows to {args.dump}")
    elif args.dump:
        dump(examples, Path(args.dump))
        print(f"\nwrote {len(examples)} examples to {args.dump}")
    return 0
