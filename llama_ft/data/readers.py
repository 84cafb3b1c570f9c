"""Read a dataset's rows into a memory-mapped Arrow table (`datasets.Dataset`), checked against its format.

    open_source(dataset)                              -> Source: what it is, and a key of its content
    read_rows(source, dataset_format, max_samples, cache_root) -> (rows, Locator)

Local JSON (a `.json` list of objects or JSON lines, a `.jsonl` file) is parsed here, one line at a
time, and every row is checked by its format (formats.typed_row) as it is read, then written through
`Dataset.from_generator` with a fixed schema of strings. So an error names its exact line, text that
merely looks like a date stays text (Arrow's JSON reader would turn it into a timestamp), and no
Python list of rows is ever held. Only the first `max_samples` rows are read.

Parquet files are memory-mapped with pyarrow, only the columns the format reads, their types and UTF-8
checked first (data/parquet.py); Hub names go through
`datasets.load_dataset(name, split="train")`. Their rows are checked as they are tokenized, and named
`FILE: row i` / `--dataset NAME: row i`.

The content key is the sha256 of a local file's bytes (not its path or mtime: a copy that keeps the
mtime but not the bytes is still a different dataset), or datasets' fingerprint of a Hub revision.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_ft.data.formats import CHAT, typed_row
from llama_ft.errors import UserError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
LINE = "_line"  # column of JSON rows: their line in the file (JSON lines) or index in the list (.json list)

log = logging.getLogger(__name__)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Locator:
    """Names a row for error messages. Picklable (datasets.map workers carry it)."""

    source: str
    kind: str  # "lines" (JSON lines: LINE is the line) | "list" (a .json list) | "parquet" | "hub"

    def describe(self, index: int, line: int | None = None) -> str:
        if self.kind == "lines":
            return f"{self.source}: line {line}"
        if self.kind == "hub":
            return f"--dataset {self.source}: row {index}"
        return f"{self.source}: row {index if line is None else line}"


class RowRef:
    """A row's location, formatted only when an error message uses it (f"{where}: ..."): building
    every row's location up front would cost a string per row for nothing."""

    def __init__(self, locator: Locator, index: int, line: int | None = None) -> None:
        self.locator, self.index, self.line = locator, index, line

    def __str__(self) -> str:
        return self.locator.describe(self.index, self.line)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


@dataclass
class Source:
    dataset: str  # as the user gave it
    path: Path | None  # local file, or None for a Hub name
    key: str  # content key (module doc)
    hub_rows: Any = None  # the loaded Hub dataset


@contextlib.contextmanager
def quiet_datasets(progress: bool = False) -> Iterator[None]:
    """Silence `datasets` inside the block: its own error log lines (we raise one clear UserError instead)
    and, unless `progress`, its progress bars. Restores both after."""
    from datasets.utils import logging as ds_logging

    verbosity, bars = ds_logging.get_verbosity(), ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity(logging.CRITICAL)
    if not progress:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


def _looks_like_path(dataset: str) -> bool:
    return dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith(("/", "./", "../", "~"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def open_source(dataset: str) -> Source:
    """Check that `dataset` exists (a local file of a known type, else a reachable Hub name) and key it.

    A name that ends in .json/.jsonl/.parquet or starts with / ./ ../ ~ is always a local path.
    """
    if not dataset.strip():  # Path("") is the current directory: the error named "." (fuzzer)
        raise UserError(f"--dataset {dataset!r}: empty (expected a .json, .jsonl or .parquet file or a hub dataset "
                        "name)")
    path = Path(dataset).expanduser()
    if not (path.exists() or _looks_like_path(dataset)):
        rows = _load_hub(dataset)
        return Source(dataset, None, f"hub:{dataset}:{rows._fingerprint}", rows)
    if path.is_dir():
        raise UserError(f"dataset {path} is a directory (expected a .json, .jsonl or .parquet file or a hub dataset "
                        "name)")
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist (expected a .json, .jsonl or .parquet file or a hub "
                        "dataset name)")
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"dataset file {path}: unsupported file type '{path.suffix}' (expected .json, .jsonl or "
                        ".parquet)")
    if path.stat().st_size == 0:
        raise UserError(f"dataset file {path} is empty (expected at least one row)")
    return Source(dataset, path, f"sha256:{file_sha256(path)}")


def _load_hub(name: str):
    import datasets

    try:
        with quiet_datasets(progress=True):  # a download can take a while
            rows = datasets.load_dataset(name, split="train")
    except (OSError, datasets.exceptions.DatasetsError) as e:
        # ConnectionError (offline / unreachable) and DatasetNotFoundError are both OSErrors.
        raise UserError(
            f"--dataset {name} is neither a local file nor reachable on the Hugging Face hub ({one_line(e)})"
        ) from None
    except ValueError as e:  # e.g. Unknown split "train"
        raise UserError(f"--dataset {name}: cannot load its 'train' split ({one_line(e)})") from None
    if len(rows) == 0:
        raise UserError(f"--dataset {name}: its 'train' split holds no rows")
    return rows


def _json_values(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, line or index, value) of each row of a JSON-lines file or a .json list; blank lines skipped."""
    try:
        if path.suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg == "Extra data" and text.lstrip().startswith("{"):
                    data = None  # JSON lines saved as .json
                else:
                    raise UserError(f"dataset file {path}: invalid JSON at line {e.lineno} column {e.colno} "
                                    f"({e.msg})") from None
            if data is not None:
                if not isinstance(data, list):
                    raise UserError(f"dataset file {path}: expected a JSON list of objects (or JSON lines), got a "
                                    f"JSON {type(data).__name__}")
                for index, value in enumerate(data):
                    yield f"{path}: row {index}", index, value
                return
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield f"{path}: line {lineno}", lineno, value
    except UnicodeDecodeError as e:
        raise UserError(f"dataset file {path}: not UTF-8 text ({one_line(e)})") from None


def _typed_json_rows(path: str, dataset_format: str, max_samples: int | None, content_key: str) -> Iterator[dict]:
    """The `Dataset.from_generator` generator: checked rows of a local JSON file (content_key keys its cache)."""
    n = 0
    for where, line, value in _json_values(Path(path)):
        yield {**typed_row(value, dataset_format, where), LINE: line}
        n += 1
        if n == max_samples:
            return  # the rest of the file is not read
    if n == 0:
        raise UserError(f"dataset file {path} holds no rows (expected at least one)")


def row_features(dataset_format: str):
    """The fixed Arrow schema of checked rows: the format's fields as strings (chat: role/content lists)."""
    import datasets

    from llama_ft.data.formats import ROW_FIELDS

    string = datasets.Value("string")
    if dataset_format == CHAT:
        fields = {"messages": [{"role": string, "content": string}]}  # a list of structs
    else:
        fields = {name: string for name in ROW_FIELDS[dataset_format]}
    return datasets.Features({**fields, LINE: datasets.Value("int64")})


def read_rows(source: Source, dataset_format: str, max_samples: int | None, cache_root: Path):
    """(rows, Locator) of `source`: a `datasets.Dataset`, the first `max_samples` rows if given (module doc)."""
    import datasets

    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0
    ):
        raise UserError(f"--max_train_samples must be a positive integer, got {max_samples!r}")
    if source.path is None:
        rows, where = source.hub_rows, Locator(source.dataset, "hub")
    elif source.path.suffix == ".parquet":
        from llama_ft.data.parquet import read_parquet_table

        table = read_parquet_table(source.path, dataset_format)
        try:
            rows = datasets.Dataset(table)
        except Exception as e:  # noqa: BLE001 - an Arrow type `datasets` has no feature for raises ValueError/TypeError
            raise UserError(f"dataset file {source.path}: its columns cannot be read as a dataset ({one_line(e)})"
                            ) from None
        where = Locator(str(source.path), "parquet")
        if len(rows) == 0:
            raise UserError(f"dataset file {source.path} holds no rows (expected at least one)")
    else:
        lines = source.path.suffix == ".jsonl" or _starts_with_object(source.path)
        where = Locator(str(source.path), "lines" if lines else "list")
        try:
            with quiet_datasets():
                return datasets.Dataset.from_generator(
                    _typed_json_rows, features=row_features(dataset_format), cache_dir=str(cache_root / "rows"),
                    gen_kwargs={"path": str(source.path), "dataset_format": dataset_format,
                                "max_samples": max_samples, "content_key": source.key}), where
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, UserError):
                raise e.__cause__ from None
            raise UserError(f"dataset file {source.path}: cannot be read ({one_line(e.__cause__ or e)})") from None
    if max_samples is not None and max_samples < len(rows):
        rows = rows.select(range(max_samples))
    return rows, where


def _starts_with_object(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1] == b"{"
