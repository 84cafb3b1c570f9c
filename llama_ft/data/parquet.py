"""Read a Parquet dataset file into an Arrow table of the columns its format reads, checked before any row is.

    read_parquet_table(path, dataset_format) -> pyarrow.Table

Only the columns the format reads are read (formats.ROW_FIELDS, or `messages`/`conversations` for chat):
a column the product never reads (a map, a timestamp, a corrupt page) cannot fail a run. Each kept column
is then held to what the row checks will ask of it, as one line naming the file (and row) instead of an
exception out of Arrow or `datasets`:
- its type: strings (string, large_string, a dictionary of strings, or all null) for a single-turn format;
  for chat a list of structs whose role/content (from/value) fields are strings;
- its text: valid UTF-8 (Parquet does not check it, and another writer can store any bytes as a string;
  Python's decode of such a value would otherwise fail inside `datasets.map`), naming the first bad row.
The schema's key-value metadata is dropped: `datasets` would read a `huggingface` key there as the
table's features, and a wrong one fails in `datasets` code; the row checks type every value anyway.
"""

from __future__ import annotations

from pathlib import Path

from llama_ft.data.formats import CHAT, ROW_FIELDS
from llama_ft.errors import UserError

CHAT_COLUMNS = {"messages": ("role", "content"), "conversations": ("from", "value")}
"""The chat columns and the string fields of each message (OpenAI and ShareGPT forms)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _shown(t) -> str:
    text = str(t)
    return text if len(text) <= 120 else text[:117] + "..."


def _strings(t) -> bool:
    import pyarrow as pa

    view = getattr(pa.types, "is_string_view", lambda _: False)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or view(t) or pa.types.is_null(t)
            or (pa.types.is_dictionary(t) and _strings(t.value_type)))


def _messages(t, fields: tuple[str, ...]) -> bool:
    """A list (of any offset width) of structs whose `fields`, where present, are strings; or all null."""
    import pyarrow as pa

    if pa.types.is_null(t):
        return True
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    item = t.value_type
    return all(_strings(item.field(k).type) for k in range(item.num_fields) if item.field(k).name in fields)


def _check_types(path: Path, table, dataset_format: str) -> None:
    for field in table.schema:
        if dataset_format == CHAT:
            keys = CHAT_COLUMNS[field.name]
            if not _messages(field.type, keys):
                raise UserError(f"dataset file {path}: column '{field.name}' is of type {_shown(field.type)} "
                                f"(expected a list of {{{keys[0]}, {keys[1]}}} messages with string fields, read "
                                "by --dataset_format chat)")
        elif not _strings(field.type):
            raise UserError(f"dataset file {path}: column '{field.name}' is of type {_shown(field.type)} (expected "
                            f"strings, read by --dataset_format {dataset_format})")


def _check_utf8(path: Path, table) -> None:
    """UserError naming the first row whose text in some column is not UTF-8 (full validation finds it;
    the row is then found by decoding that chunk, on this error path only)."""
    import pyarrow as pa

    for name in table.column_names:
        start = 0
        for chunk in table.column(name).chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as e:
                bad = _first_bad_row(chunk)
                at = f": row {start + bad}" if bad is not None else ""
                raise UserError(f"dataset file {path}{at}: column '{name}' holds text that is not valid UTF-8 "
                                f"({_one_line(e)})") from None
            start += len(chunk)


def _first_bad_row(chunk) -> int | None:
    """The first row of `chunk` that Python cannot decode; None if none (the array is invalid otherwise)."""
    step = 1024
    for lo in range(0, len(chunk), step):
        try:
            chunk.slice(lo, step).to_pylist()
        except (UnicodeDecodeError, ValueError):
            for j in range(lo, min(lo + step, len(chunk))):
                try:
                    chunk.slice(j, 1).to_pylist()
                except (UnicodeDecodeError, ValueError):
                    return j
    return None


def read_parquet_table(path: Path, dataset_format: str):
    """The columns of `path` that `dataset_format` reads, as a pyarrow.Table, checked (module doc)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path, memory_map=True).names
        wanted = list(CHAT_COLUMNS) if dataset_format == CHAT else list(ROW_FIELDS[dataset_format])
        table = pq.read_table(path, columns=[c for c in wanted if c in names], memory_map=True)
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own types (and OSError) for files that are not Parquet
        raise UserError(f"dataset file {path}: not a readable Parquet file ({_one_line(e)})") from None
    if not table.column_names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise UserError(f"dataset file {path}: none of the columns --dataset_format {dataset_format} reads "
                        f"({', '.join(wanted)}) is there (it has: {shown or 'no columns'})")
    table = table.replace_schema_metadata(None)
    _check_types(path, table, dataset_format)
    _check_utf8(path, table)
    return table
