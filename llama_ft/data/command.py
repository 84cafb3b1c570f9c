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

With `--objective dpo` the examples are preference pairs (data/pairs.py): the summary counts pairs and
gives the token statistics of each side; `--preview K` shows both sides of each of the first K pairs,
labelled chosen and rejected, each decoded in full with its trained tokens (the response) marked; `--dump`
writes one line per pair, {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"},
the columns training collates (data/collate.py collate_pairs). With `--packing` the dump is the packed rows
of whole pairs (2 x --max_seq_len tokens each), with "sequence_ids" (collate_packed_pairs).
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
from llama_ft.data.batches import epoch_rows, example_lengths, pack_capacity
from llama_ft.data.chat import use_chat_template
from llama_ft.data.collate import collate_packed, collate_packed_pairs, pad_token_id
from llama_ft.data.formats import CHAT, IGNORE_INDEX
from llama_ft.data.pairs import PAIR_COLUMNS, SIDES
from llama_ft.data.pipeline import DataOptions, DataStats, load_tokenizer, prepare_examples
from llama_ft.errors import UserError, user_errors_exit
from llama_ft.fsutil import atomic_write

MARK_OPEN, MARK_CLOSE = "[[", "]]"
GREEN, RESET = "\033[42;30m", "\033[0m"
COMMAND_FLAGS = (*DATA_FLAGS, "objective")
"""Training's data flags, and --objective: SFT examples or DPO pairs (eval reads SFT examples only)."""
EXAMPLE_COLUMNS = ("input_ids", "labels")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft data", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Show what training will read: a summary of the tokenized examples, "
                                            "a decoded preview with the trained spans marked, and a dump.")
    add_config_flags(p, COMMAND_FLAGS)
    add_config_flag(p)
    p.add_argument("--dump", metavar="OUT.jsonl", help="write every example as {\"input_ids\", \"labels\"} JSON lines "
                                                     "(--objective dpo: every pair, both sides' ids and labels)")
    p.add_argument("--preview", type=int, default=0, metavar="K",
                   help="print the first K examples decoded (--objective dpo: both sides of the first K pairs)")
    return p


def token_stats(examples, prefix: str = "") -> dict[str, Any]:
    """Lengths and trained-token counts of all examples, computed on the Arrow columns (no Python lists);
    `prefix` "chosen_" or "rejected_": one side of preference pairs."""
    import pyarrow.compute as pc

    table = examples.with_format("arrow")[:]
    lengths = pc.list_value_length(table.column(f"{prefix}input_ids")).to_numpy(zero_copy_only=False)
    labels = table.column(f"{prefix}labels")
    trained_all = pc.sum(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)).as_py() or 0
    first = pc.sum(pc.not_equal(pc.list_element(labels, 0), IGNORE_INDEX)).as_py() or 0
    trained = trained_all - first  # label 0 is never predicted (train/loss.py)
    pct = np.percentile(lengths, [50, 90, 99]).round().astype(int).tolist()
    return {"tokens": int(lengths.sum()), "trained": int(trained), "min": int(lengths.min()),
            "max": int(lengths.max()), "mean": float(lengths.mean()), "p50": pct[0], "p90": pct[1], "p99": pct[2]}


def token_rows(tok: dict[str, Any], what: str = "", per: str = "example") -> list[tuple[str, str]]:
    """The summary's length and trained-token lines for one token_stats (`what`: "chosen " or "rejected ")."""
    share = 100.0 * tok["trained"] / max(tok["tokens"], 1)
    return [(f"{what}tokens per {per}", f"p50 {tok['p50']}, p90 {tok['p90']}, p99 {tok['p99']}, min {tok['min']}, "
                                        f"max {tok['max']}, mean {tok['mean']:.1f}"),
            (f"{what}tokens", f"{tok['tokens']:,}"),
            (f"{what}trained tokens", f"{tok['trained']:,} ({share:.1f}% of {'its' if what else 'all'} tokens)")]


def summary(opts: DataOptions, stats: DataStats, toks: dict[str, dict[str, Any]]) -> str:
    """The summary table; `toks`: token_stats of the examples ({"": ...}), or of each side of pairs
    ({"chosen": ..., "rejected": ...})."""
    of = f" {stats.unit}" if stats.pairs else ""  # SFT keeps its shorter wording
    cut = f"{stats.cut} of {stats.examples}{of} at --max_seq_len {opts.max_seq_len}" if opts.max_seq_len else \
        "none (no --max_seq_len)"
    objective = ", --objective dpo" if stats.pairs else ""
    rows = [
        ("dataset", f"{opts.dataset} (--dataset_format {opts.dataset_format}{objective})"),
        ("rows read", f"{stats.rows}"),
        (stats.unit, f"{stats.examples} ({stats.dropped} dropped: {stats.dropped_why})"),
        ("cut", cut),
    ]
    for side, tok in toks.items():
        rows += token_rows(tok, f"{side} " if side else "", "sequence" if side else "example")
    rows.append(("cache", f"{stats.cache_file} ({'reused' if stats.from_cache else 'tokenized now'})"))
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


def preview(examples, tokenizer: Any, k: int, out: TextIO, pairs: bool = False) -> None:
    """The first k examples decoded, each under a `--- example I: N tokens, T trained ---` line; pairs: each
    side in full under `--- pair I: chosen|rejected, N tokens, T trained ---` (T: labels[1:] trained, the
    tokens the loss sees)."""
    color = out.isatty()
    legend = "trained tokens on green" if color else f"trained tokens between {MARK_OPEN} and {MARK_CLOSE}"
    k = min(k, len(examples))
    print(f"\nfirst {k} {'pairs, both sides' if pairs else 'examples'} ({legend}):", file=out)
    for i in range(k):
        ex = examples[i]
        for side in SIDES if pairs else ("",):
            ids, labels = ex[f"{side}_input_ids" if side else "input_ids"], ex[f"{side}_labels" if side else "labels"]
            n = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
            what = f"pair {i}: {side}," if side else f"example {i}:"
            print(f"--- {what} {len(ids)} tokens, {n} trained ---", file=out)
            print(render_marked(tokenizer, ids, labels, color), file=out)


def dump(examples, path: Path, columns: tuple[str, ...] = EXAMPLE_COLUMNS) -> None:
    """Every example as one JSON line {column: ids, ...}, in dataset order, through a temporary file renamed
    when complete; pairs: columns=PAIR_COLUMNS."""
    from tqdm import tqdm

    with atomic_write(path) as f:
        for batch in tqdm(examples.iter(batch_size=1000), total=-(-len(examples) // 1000), desc="dump",
                          unit="batch", disable=None):
            for values in zip(*(batch[c] for c in columns), strict=True):
                f.write(json.dumps(dict(zip(columns, values, strict=True)), separators=(",", ":")) + "\n")


def dump_packed(examples, rows: list[list[int]], pad_id: int, path: Path, pairs: bool = False) -> None:
    """Each packed row as one JSON line {"input_ids", "labels", "position_ids"}, as collate_packed builds it;
    rows of pairs add "sequence_ids" (collate_packed_pairs: pair k's chosen side k, its rejected side P + k)."""
    from tqdm import tqdm

    collate_row = collate_packed_pairs if pairs else collate_packed
    columns = ("input_ids", "labels", "position_ids", *(("sequence_ids",) if pairs else ()))
    with atomic_write(path) as f:
        for row in tqdm(rows, desc="dump", unit="row", disable=None):
            t = collate_row([[examples[i] for i in row]], pad_id)
            line = {k: t[k][0].tolist() for k in columns}
            f.write(json.dumps(line, separators=(",", ":")) + "\n")


def packing_line(rows: list[list[int]], lengths: list[int], pack_len: int) -> str:
    fill = 100 * sum(lengths) / (len(rows) * pack_len)
    return f"packed rows         {len(rows)} rows of {pack_len} tokens for {len(lengths)} examples ({fill:.1f}% filled)"


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)  # --config FILE: its values are the defaults
    cfg = TrainConfig(**{k: getattr(args, k) for k in COMMAND_FLAGS})
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
    pairs = cfg.objective == "dpo"
    tokenizer = load_tokenizer(tok_path)
    if cfg.dataset_format == CHAT:
        use_chat_template(tokenizer, cfg.chat_template, tok_path)
    opts = DataOptions.from_config(cfg)
    examples, stats = prepare_examples(opts, tokenizer)
    toks = {side: token_stats(examples, f"{side}_") for side in SIDES} if pairs else {"": token_stats(examples)}
    print(summary(opts, stats, toks))
    rows = None
    if cfg.packing:  # epoch 0 of the training stream, all examples
        lengths = example_lengths(examples)  # a pair: both sides
        capacity = pack_capacity(cfg.max_seq_len, pairs)
        rows = epoch_rows(lengths, cfg.seed, 0, capacity)
        print(packing_line(rows, lengths, capacity))
    if args.preview:
        preview(examples, tokenizer, args.preview, sys.stdout, pairs)
    if args.dump and rows is not None:
        dump_packed(examples, rows, pad_token_id(tokenizer), Path(args.dump), pairs)
        print(f"\nwrote {len(rows)} packed rows to {args.dump}")
    elif args.dump:
        dump(examples, Path(args.dump), PAIR_COLUMNS if pairs else EXAMPLE_COLUMNS)
        print(f"\nwrote {len(examples)} {stats.unit} to {args.dump}")
    return 0
