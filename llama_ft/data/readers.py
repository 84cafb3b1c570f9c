"""Read a dataset's raw rows with `datasets`: local .json / .jsonl / .parquet files or a Hub dataset name.

    read_rows(dataset, max_samples) -> RawRows(rows: datasets.Dataset, where: Locator, key: str)

`datasets` turns the file into a memory-mapped Arrow table once and caches it; nothing here holds
the rows in Python lists. When `datasets` cannot read a local JSON file, the file is scanned again
line by line only to name the exact line that is wrong (`datasets` reports "An error occurred while
generating the dataset"). `Locator(i)` names row i as a user would find it: `FILE: line N` for JSON
lines (blank lines counted), `FILE: row i` for a JSON list or Parquet, `--dataset NAME: row i`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_ft.errors import UserError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")

log = logging.getLogger(__name__)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Locator:
    """Names row `i` of a source for error messages. Picklable (datasets.map workers carry it)."""

    source: str
    kind: str  # "jsonl" | "json" | "parquet" | "hub"

    def __call__(self, i: int) -> str:
        if self.kind == "jsonl":
            return f"{self.source}: line {_line_of_row(Path(self.source), i)}"
        if self.kind == "hub":
            return f"--dataset {self.source}: row {i}"
        return f"{self.source}: row {i}"


@dataclass
class RawRows:
    rows: object  # datasets.Dataset
    where: Locator
    key: str  # identifies the rows' content for caches: datasets' fingerprint of the source


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


def _line_of_row(path: Path, i: int) -> int:
    """1-based line number of the i-th non-blank line of a JSON-lines file (what datasets calls row i)."""
    seen = -1
    with open(path, encoding="utf-8", newline="") as f:
        # split on "\n" only: str.splitlines would also break on U+2028 etc., which JSON strings may hold raw
        for lineno, line in enumerate(f.read().split("\n"), start=1):
            if line.strip():
                seen += 1
                if seen == i:
                    return lineno
    return i + 1


def _looks_like_path(dataset: str) -> bool:
    return dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith(("/", "./", "../", "~"))


RowCheck = Callable[[Any, str], object]
"""check(row, where): raises UserError naming `where` when the row does not fit the dataset format."""


def _check_json_text(path: Path, check: RowCheck | None = None) -> None:
    """Raise the UserError that says what is wrong with a JSON / JSON-lines file `datasets` refused:
    its syntax, or the first row `check` refuses (arrow cannot hold fields whose types differ by row)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"dataset file {path}: not UTF-8 text ({one_line(e)})") from None
    if not text.strip():
        raise UserError(f"dataset file {path} is empty (expected at least one row)")

    def lines() -> None:
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(value, dict):
                raise UserError(f"{path}: line {lineno}: expected a JSON object, got {type(value).__name__}")
            if check is not None:
                check(value, f"{path}: line {lineno}")

    if path.suffix == ".jsonl":
        lines()
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            lines()  # JSON lines saved as .json (datasets reads both)
            return
        raise UserError(f"dataset file {path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if isinstance(data, list):
        if not data:
            raise UserError(f"dataset file {path} holds no rows (expected a JSON list of objects)")
        for index, value in enumerate(data):
            if not isinstance(value, dict):
                raise UserError(f"{path}: row {index}: expected a JSON object, got {type(value).__name__}")
            if check is not None:
                check(value, f"{path}: row {index}")


def _read_local(path: Path, check: RowCheck | None):
    import datasets

    if path.is_dir():
        raise UserError(f"dataset {path} is a directory (expected a .json, .jsonl or .parquet file or a hub dataset "
                        "name)")
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist (expected a .json, .jsonl or .parquet file or a hub "
                        "dataset name)")
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"dataset file {path}: unsupported file type '{path.suffix}' (expected .json, .jsonl or "
                        ".parquet)")
    builder = "parquet" if path.suffix == ".parquet" else "json"
    if builder == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head[:1] not in (b"{", b"["):
            _check_json_text(path)  # names the problem: empty, not UTF-8, not JSON
    try:
        with quiet_datasets():
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps arrow's and json's errors in its own types
        if builder == "json":
            _check_json_text(path, check)
        raise UserError(f"dataset file {path}: datasets cannot read it ({one_line(e.__cause__ or e)})") from None
    if len(rows) == 0:
        raise UserError(f"dataset file {path} holds no rows (expected at least one)")
    kind = "parquet" if builder == "parquet" else ("jsonl" if _is_json_lines(path, head) else "json")
    return rows, Locator(str(path), kind)


def _is_json_lines(path: Path, head: bytes) -> bool:
    return path.suffix == ".jsonl" or head[:1] == b"{"


def _read_hub(name: str):
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
    return rows, Locator(name, "hub")


def read_rows(dataset: str, max_samples: int | None = None, check: RowCheck | None = None) -> RawRows:
    """The raw rows of `dataset`, the first `max_samples` of them if given.

    `dataset` is an existing local `.json` (a JSON list of objects, or JSON lines), `.jsonl` or
    `.parquet` file, else a Hugging Face Hub dataset name (its "train" split). A name that ends in
    one of those suffixes or starts with / ./ ../ ~ is always a local path and must exist.
    Raises UserError naming the file and line, or the flag; `check` names the row that made a JSON file
    unreadable for `datasets` (rows are otherwise checked as they are tokenized).
    """
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0
    ):
        raise UserError(f"--max_train_samples must be a positive integer, got {max_samples!r}")
    path = Path(dataset).expanduser()
    if path.exists() or _looks_like_path(dataset):
        rows, where = _read_local(path, check)
    else:
        rows, where = _read_hub(dataset)
    if max_samples is not None and max_samples < len(rows):
        rows = rows.select(range(max_samples))
    return RawRows(rows, where, rows._fingerprint)
