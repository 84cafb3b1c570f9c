"""From the data flags to training examples: read, check, render, tokenize, cut, cache.

    prepare_examples(opts, tokenizer) -> (examples, DataStats)

`examples` is a `datasets.Dataset` (memory-mapped Arrow) whose rows are exactly
`{"input_ids": [...], "labels": [...]}` (with `objective="dpo"`: the pair columns of data/pairs.py,
`{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}`), in dataset order:
the sequence training consumes and `llama-ft data --dump` writes. The first process on a node to get
here tokenizes and caches (cache.py); the others wait on a file lock and read the cached file, so a
second run with the same inputs does not tokenize again.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llama_ft.checkpoint.gguf import check_not_gguf
from llama_ft.data.cache import default_cache_dir, examples_key
from llama_ft.data.formats import CHAT, check_format, source_target
from llama_ft.data.pairs import PAIR_COLUMNS, check_pair_options, encode_pair_rows, read_pairs
from llama_ft.data.readers import LINE, RowRef, one_line, open_source, quiet_datasets, read_rows
from llama_ft.data.tokenize import check_lengths, encode_batch
from llama_ft.errors import UserError
from llama_ft.flags import check_objective_choice
from llama_ft.fsutil import atomic_write_json, exclusive_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataOptions:
    """The flags that decide the training examples (shared by `llama-ft train` and `llama-ft data`)."""

    dataset: str
    dataset_format: str = "alpaca"
    chat_template: str | None = None
    source_max_len: int = 1024
    target_max_len: int = 256
    max_seq_len: int | None = None
    train_on_source: bool = False
    max_train_samples: int | None = None
    objective: str = "sft"  # "dpo": rows are preference pairs (data/pairs.py)

    @classmethod
    def from_config(cls, cfg: Any) -> DataOptions:
        # tools without a flag (llama-ft eval has no --objective) get the default
        return cls(**{f.name: getattr(cfg, f.name, f.default) for f in fields(cls)})

    def check(self) -> None:
        check_objective_choice(self.objective)
        check_format(self.dataset_format)
        check_lengths(self.source_max_len, self.target_max_len, self.max_seq_len)
        if self.chat_template and self.dataset_format != CHAT:
            raise UserError(f"--chat_template applies to --dataset_format chat (this run reads "
                            f"--dataset_format {self.dataset_format})")
        if self.objective == "dpo":
            check_pair_options(self.dataset, self.dataset_format, self.train_on_source)


DROPPED_EXAMPLE = "no token to train on"
DROPPED_PAIR = "a side with no token to train on, or both sides the same after the cut"
"""Why a row is left out after the --max_seq_len cut: an SFT example, a preference pair (pairs.encode_pair_rows)."""


@dataclass
class DataStats:
    rows: int  # rows read (after --max_train_samples)
    examples: int  # examples kept (pairs with --objective dpo)
    cut: int  # examples shortened to --max_seq_len (pairs: either side)
    dropped: int  # rows left out after the cut: DROPPED_EXAMPLE, or DROPPED_PAIR for pairs
    cache_file: str
    from_cache: bool
    rows_key: str = ""  # the content key of the rows read (readers.Source.key)
    train_index: list[int] = field(default_factory=list)  # training's examples -> their index in all examples
    pairs: bool = False  # the examples are preference pairs (--objective dpo)

    @property
    def unit(self) -> str:
        """What an example is: "pairs" or "examples"."""
        return "pairs" if self.pairs else "examples"

    @property
    def dropped_why(self) -> str:
        return DROPPED_PAIR if self.pairs else DROPPED_EXAMPLE

    def line(self, max_seq_len: int | None) -> str:
        """The data report: e.g. `5 rows -> 4 pairs, 2 pairs cut at --max_seq_len 64, 1 pairs dropped (a side with
        no token to train on, or both sides the same after the cut); tokenized (CACHE)`."""
        of = f" {self.unit}" if self.pairs else ""  # SFT keeps its shorter wording
        cut = f", {self.cut}{of} cut at --max_seq_len {max_seq_len}" if max_seq_len else ""
        dropped = f", {self.dropped}{of} dropped ({self.dropped_why})" if self.dropped else ""
        how = "from the cache" if self.from_cache else "tokenized"
        return f"{self.rows} rows -> {self.examples} {self.unit}{cut}{dropped}; {how} ({self.cache_file})"


def prepare_examples(opts: DataOptions, tokenizer: Any, cache_dir: str | Path | None = None):
    """Training examples and counts for `opts` (module doc). The tokenizer must already carry the chat
    template (chat.use_chat_template) for the chat format. `cache_dir` is the cache root (default
    cache.default_cache_dir()): checked rows under rows/, examples under tokenized/. Raises UserError
    on any bad input."""
    import datasets

    opts.check()
    source = open_source(opts.dataset)
    options = {k: v for k, v in asdict(opts).items() if k not in ("dataset", "chat_template")}
    key = examples_key(source.key, tokenizer, options)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "tokenized"
    arrow, meta = folder / f"{key}.arrow", folder / f"{key}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.lock").touch()
    except OSError as e:
        raise UserError(f"tokenize cache {folder}: cannot use it ({one_line(e)}); set LLAMA_FT_CACHE to a writable "
                        "directory") from None
    with exclusive_lock(folder / f"{key}.lock"):  # one process per node tokenizes; the others wait, then read
        from_cache = arrow.is_file() and meta.is_file()
        if from_cache:
            examples = datasets.Dataset.from_file(str(arrow))
            counts = json.loads(meta.read_text())
        else:
            if opts.objective == "dpo":
                examples, counts = _encode_pairs(source, opts, tokenizer, root, arrow, key)
                atomic_write_json(meta, counts)
                return _finish(examples, counts, arrow, source, opts, from_cache)
            rows, where = read_rows(source, opts.dataset_format, opts.max_train_samples, root)
            features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                          "labels": datasets.Sequence(datasets.Value("int32")),
                                          "cut": datasets.Value("bool")})
            log.info("tokenizing %d rows of %s into %s", len(rows), opts.dataset, arrow)
            with quiet_datasets(progress=sys.stderr.isatty()):  # a bar in a log file is noise
                examples = rows.map(
                    encode_batch, batched=True, with_indices=True, remove_columns=rows.column_names,
                    features=features, cache_file_name=str(arrow), load_from_cache_file=False, new_fingerprint=key,
                    desc="tokenize", fn_kwargs={
                        "dataset_format": opts.dataset_format, "tokenizer": tokenizer,
                        "source_max_len": opts.source_max_len, "target_max_len": opts.target_max_len,
                        "max_seq_len": opts.max_seq_len, "train_on_source": opts.train_on_source, "where": where})
            counts = {"rows": len(rows), "examples": len(examples), "cut": int(sum(examples["cut"])),
                      "dropped": len(rows) - len(examples)}
            atomic_write_json(meta, counts)  # written last: an .arrow without it is redone
    return _finish(examples, counts, arrow, source, opts, from_cache)


def _finish(examples, counts: dict[str, int], arrow: Path, source, opts: DataOptions, from_cache: bool):
    """(examples without the `cut` column, DataStats); UserError when nothing is left to train on."""
    stats = DataStats(cache_file=str(arrow), from_cache=from_cache, rows_key=source.key,
                      pairs=opts.objective == "dpo", **counts)
    if stats.examples == 0:
        hint = (f"check the chat template and --max_seq_len {opts.max_seq_len}" if opts.dataset_format == CHAT
                else f"check --target_max_len {opts.target_max_len} and --max_seq_len {opts.max_seq_len}")
        if stats.pairs:
            raise UserError(f"--dataset {opts.dataset}: none of its {stats.rows} pairs is left to train on (each has "
                            f"{DROPPED_PAIR}; {hint})")
        raise UserError(f"--dataset {opts.dataset}: none of its {stats.rows} rows has a token to train on ({hint})")
    return examples.remove_columns(["cut"]), stats


def _encode_pairs(source, opts: DataOptions, tokenizer: Any, root: Path, arrow: Path, key: str):
    """(pair examples with a `cut` column, counts): read_pairs' rows through pairs.encode_pair_rows."""
    import datasets

    rows, where = read_pairs(source, opts.max_train_samples, root)
    int_list = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features({**{name: int_list for name in PAIR_COLUMNS}, "cut": datasets.Value("bool")})
    log.info("tokenizing %d preference pairs of %s into %s", len(rows), opts.dataset, arrow)
    with quiet_datasets(progress=sys.stderr.isatty()):
        examples = rows.map(
            encode_pair_rows, batched=True, with_indices=True, remove_columns=rows.column_names, features=features,
            cache_file_name=str(arrow), load_from_cache_file=False, new_fingerprint=key, desc="tokenize pairs",
            fn_kwargs={"tokenizer": tokenizer, "source_max_len": opts.source_max_len,
                       "target_max_len": opts.target_max_len, "max_seq_len": opts.max_seq_len, "where": where})
    counts = {"rows": len(rows), "examples": len(examples), "cut": int(sum(examples["cut"])),
              "dropped": len(rows) - len(examples)}
    return examples, counts


def load_tokenizer(path: str):
    """AutoTokenizer from a local directory (or Hub name), never running code shipped with it."""
    from transformers import AutoTokenizer

    check_not_gguf(path, "--tokenizer_name_or_path")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokenizer_name_or_path {path}: no tokenizer found there ({one_line(e)})") from None


def load_rows(dataset: str, dataset_format: str, max_samples: int | None = None) -> list[dict[str, str]]:
    """Single-turn rows as `{"source": prompt_text, "target": response_text}` (formats.source_target),
    in memory, for tools and tests that want the text rather than the ids."""
    check_format(dataset_format)
    if dataset_format == CHAT:
        raise UserError("load_rows reads single-turn formats; chat rows go through prepare_examples")
    rows, where = read_rows(open_source(dataset), dataset_format, max_samples, default_cache_dir())
    out = []
    for i, row in enumerate(rows):
        source, target = source_target(row, dataset_format, RowRef(where, i, row.get(LINE)))
        out.append({"source": source, "target": target})
    return out
