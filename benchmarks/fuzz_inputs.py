"""Bad-input fuzzer: seeded mutations of valid inputs, each run through the command that reads it, in process.

    python benchmarks/fuzz_inputs.py --cases 2000 --seed 1 [--work DIR] [--show 5]

What a user hands us, and the command each case runs:
- data files (alpaca JSONL/JSON, chat JSONL, CSV-ish text) -> `llama-ft data --dataset F --dataset_format ...`
- Parquet data files (alpaca, chat, oasst1, chip2, self-instruct, DPO pairs), written with pyarrow, then a
  table change (wrong column types, nulls, a missing column, an empty table, deep types, huge strings,
  invalid UTF-8 under a string type, garbage `huggingface` schema metadata, odd Arrow types) or a byte change
  (footer, its length, the magic, the pages); layout-only changes (codecs, one-row row groups, page v2,
  large_string, dictionaries, extra columns) must be accepted with every row -> the same `llama-ft data`
- chat messages (unknown roles, missing content, content as a list of parts, no assistant turn) -> the same
- config files (YAML, JSON)                 -> `llama-ft config F`
- hostfiles                                -> `llama-ft hostfile check F`
- adapter directories                      -> `llama-ft merge --base TINY --adapter D --output O`
- model directories                        -> `llama-ft merge --base M --adapter GOOD --output O`
- flags                                    -> `llama-ft data` / `llama-ft plan` with a mutated flag value

The oracle, applied to every case: either accepted (exit 0), or a non-zero exit with a line
`... error: ...` that names the file (its path or name) or a flag given on the command line; never a
traceback (an exception escaping the command), never a hang (a per-case alarm of --case_timeout s).
Mutations are drawn from one seeded random.Random, so a seed and a case number name one input exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import re
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ASSETS = REPO / "llama_ft" / "assets"


class CaseTimeout(BaseException):
    """Raised by the per-case alarm: a BaseException so that no `except Exception` in the code swallows it."""


@dataclass
class Case:
    target: str
    mutation: str
    argv: list[str]
    names: list[str]  # what an error line must name (one of): files, basenames, flags
    accepted: Callable[[str], str | None] | None = None  # given stdout: what is wrong with an accepted case, if any
    must_accept: bool = False  # a valid input (only its layout changed): a refusal is wrong too


@dataclass
class Outcome:
    case: Case
    verdict: str  # accepted | rejected | traceback | hang | unnamed
    detail: str = ""


@dataclass
class Seeds:
    """The valid inputs every mutation starts from, made once under `work`."""

    work: Path
    tiny: Path = field(init=False)
    adapter: Path = field(init=False)

    def make(self) -> Seeds:
        from llama_ft.tiny import make_tiny_llama

        self.work.mkdir(parents=True, exist_ok=True)
        self.tiny = self.work / "tiny"
        if not (self.tiny / "config.json").is_file():
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                make_tiny_llama(str(self.tiny))
        self.adapter = self.work / "adapter"
        if not (self.adapter / "adapter_model.safetensors").is_file():
            import torch

            from llama_ft.adapters import save_adapters
            from llama_ft.lora import LoraSpec
            from llama_ft.model.build import build_lora_model

            spec = LoraSpec(r=4, alpha=8)
            torch.manual_seed(0)
            model, _ = build_lora_model(str(self.tiny), spec, None, torch.float32)
            for n, p in model.named_parameters():
                if "lora_B" in n:  # non-zero B, so that a merge changes the weights
                    torch.nn.init.normal_(p, std=0.01)
            save_adapters(model, self.adapter, spec, str(self.tiny))
        return self


# --- mutations of bytes and of JSON values ---

JUNK_VALUES: list = [None, 0, -1, 1e308, 10**40, "", "x" * 100_000, [], {}, True, [[[[[]]]]], {"a": None}, "\x00",
                     "\ud800", float("nan")]


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def byte_mutations(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "nul", "bad_utf8", "bom", "crlf", "huge_line", "deep", "empty", "garbage",
                       "huge_number", "dup"])
    if kind == "truncate":
        return kind, data[: rng.randrange(0, max(len(data), 1))]
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "nul":
        i = rng.randrange(len(data) + 1)
        return kind, data[:i] + b"\x00" * rng.randint(1, 4) + data[i:]
    if kind == "bad_utf8":
        i = rng.randrange(len(data) + 1)
        return kind, data[:i] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]) + data[i:]
    if kind == "bom":
        return kind, b"\xef\xbb\xbf" + data
    if kind == "crlf":
        return kind, data.replace(b"\n", b"\r\n")
    if kind == "huge_line":
        return kind, data + b"{\"instruction\": \"" + b"a" * 2_000_000 + b"\", \"output\": \"b\"}\n"
    if kind == "deep":
        return kind, data + _deep(rng.choice([100, 5000, 200_000])).encode() + b"\n"
    if kind == "empty":
        return kind, b""
    if kind == "garbage":
        return kind, bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    if kind == "huge_number":
        return kind, data + b"{\"instruction\": 1" + b"9" * 5000 + b", \"output\": 1e999}\n"
    return kind, data + data  # dup


def _mutate_value(obj, rng: random.Random):
    """A copy of a JSON value with one value somewhere replaced by junk (or a key removed)."""
    if isinstance(obj, dict) and obj:
        obj = dict(obj)
        k = rng.choice(list(obj))
        if rng.random() < 0.25:
            del obj[k]
        elif rng.random() < 0.5:
            obj[k] = _mutate_value(obj[k], rng)
        else:
            obj[k] = rng.choice(JUNK_VALUES)
        return obj
    if isinstance(obj, list) and obj:
        obj = list(obj)
        i = rng.randrange(len(obj))
        obj[i] = _mutate_value(obj[i], rng) if rng.random() < 0.6 else rng.choice(JUNK_VALUES)
        return obj
    return rng.choice(JUNK_VALUES)


def _chat_mutation(row: dict, rng: random.Random) -> tuple[str, dict]:
    if "messages" not in row:  # a ShareGPT row of the bundled set: as OpenAI messages
        row = {"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                             "content": t["value"]} for t in row["conversations"]]}
    msgs = [dict(m) for m in row["messages"]]
    kind = rng.choice(["unknown_role", "missing_content", "parts", "no_assistant", "only_system", "empty_messages",
                       "role_type", "sharegpt_mixed"])
    if kind == "unknown_role":
        msgs[rng.randrange(len(msgs))]["role"] = rng.choice(["bot", "", "ASSISTANT", "tool", "function"])
    elif kind == "missing_content":
        msgs[rng.randrange(len(msgs))].pop("content")
    elif kind == "parts":
        m = msgs[rng.randrange(len(msgs))]
        m["content"] = rng.choice([[{"type": "text", "text": m["content"]}], [{"type": "image", "url": "x"}],
                                   [m["content"]], [{"text": None}]])
    elif kind == "no_assistant":
        msgs = [m for m in msgs if m["role"] != "assistant"]
    elif kind == "only_system":
        msgs = [{"role": "system", "content": "s"}]
    elif kind == "empty_messages":
        msgs = []
    elif kind == "role_type":
        msgs[rng.randrange(len(msgs))]["role"] = rng.choice([None, 1, ["user"]])
    else:
        return kind, {"conversations": [{"from": "human", "value": "hi"}], "messages": msgs}
    return kind, {**row, "messages": msgs}


# --- the targets: each makes one case from the seeds ---


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def data_case(seeds: Seeds, d: Path, rng: random.Random) -> Case:
    fmt = rng.choice(["alpaca", "alpaca", "chat", "chat"])
    src = ASSETS / ("chat_tiny.jsonl" if fmt == "chat" else "alpaca_tiny.jsonl")
    lines = src.read_text().splitlines()[:12]
    how = rng.random()
    suffix = ".jsonl"
    if fmt == "chat" and how < 0.4:
        rows = [json.loads(x) for x in lines]
        i = rng.randrange(len(rows))
        mutation, rows[i] = _chat_mutation(rows[i], rng)
        data = "\n".join(json.dumps(r) for r in rows).encode()
    elif how < 0.55:
        rows = [json.loads(x) for x in lines]
        i = rng.randrange(len(rows))
        rows[i] = _mutate_value(rows[i], rng)
        mutation = "json_value"
        data = "\n".join(json.dumps(r, allow_nan=True) for r in rows).encode("utf-8", "surrogatepass")
    elif how < 0.65:  # the same rows as one JSON array, mutated as bytes
        suffix = ".json"
        mutation, data = byte_mutations(("[" + ",\n".join(lines) + "]").encode(), rng)
        mutation = "json_array_" + mutation
    elif how < 0.72:  # mixed formats in one file
        other = (ASSETS / ("alpaca_tiny.jsonl" if fmt == "chat" else "chat_tiny.jsonl")).read_text().splitlines()
        mutation, data = "mixed_formats", "\n".join(lines[:6] + other[:3] + lines[6:]).encode()
    else:
        mutation, data = byte_mutations("\n".join(lines).encode() + b"\n", rng)
    f = _write(d / f"train{suffix}", data)
    return Case("data", f"{fmt}:{mutation}", ["data", "--dataset", str(f), "--dataset_format", fmt,
                                              "--model_name_or_path", str(seeds.tiny), "--source_max_len", "64",
                                              "--target_max_len", "32"], [str(f), f.name, "--dataset"],
                lambda out: None if "examples" in out else f"no summary of the examples printed: {out[-300:]!r}")


def config_case(seeds: Seeds, d: Path, rng: random.Random) -> Case:
    base = {"lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-4, "max_steps": 10, "dataset_format": "alpaca",
            "bf16": True, "lora_target_modules": ["q_proj", "v_proj"]}
    yaml_ = rng.random() < 0.5
    if rng.random() < 0.5:
        obj = _mutate_value(base, rng)
        if rng.random() < 0.3:
            obj = {**base, rng.choice(["lora_rr", "", "1", "max steps", "--lora_r"]): 1}
        text = json.dumps(obj, allow_nan=True)
        if yaml_:
            import yaml

            try:
                text = yaml.safe_dump(obj)
            except yaml.YAMLError:
                text = json.dumps(obj, allow_nan=True)
        mutation, data = "value", text.encode("utf-8", "surrogatepass")
    else:
        text = json.dumps(base, indent=1)
        if yaml_:
            import yaml

            text = yaml.safe_dump(base)
        mutation, data = byte_mutations(text.encode(), rng)
        if yaml_ and rng.random() < 0.2:
            mutation, data = "yaml_tags", b"lora_r: !!python/object/apply:os.system ['true']\n"
    f = _write(d / ("run.yaml" if yaml_ else "run.json"), data)
    return Case("config", mutation, ["config", str(f)], [str(f), f.name],
                lambda out: None if not out.strip() or out.lstrip().startswith("--") else f"not flags: {out[:300]!r}")


def hostfile_case(seeds: Seeds, d: Path, rng: random.Random) -> Case:
    text = rng.choice(["localhost slots=2\n", "node-a slots=8\nnode-b slots=8\n", "# hosts\nworker-1 slots=4\n"])
    kind = rng.choice(["bytes", "bytes", "slots", "dup", "words"])
    if kind == "slots":
        data = text.replace("slots=", "slots=" + rng.choice(["-1", "0", "x", "1e9", "99999999999999999999", " ",
                                                              "2.5", "٣"]), 1).encode()
    elif kind == "dup":
        data = (text + text).encode()
    elif kind == "words":
        data = rng.choice([b"localhost slots=2 extra\n", b"slots=2\n", b"localhost slot=2\n", b"= =\n",
                           b"localhost slots=2 slots=3\n", b"a" * 70000 + b" slots=1\n"])
    else:
        kind, data = byte_mutations(text.encode(), rng)
    f = _write(d / "hostfile", data)
    return Case("hostfile", kind, ["hostfile", "check", str(f)], [str(f), f.name])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _mutate_safetensors(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    kind = rng.choice(["truncate", "header_len", "header_json", "flip_header", "flip_data", "empty"])
    if kind == "truncate":
        path.write_bytes(data[: rng.randrange(0, len(data))])
    elif kind == "header_len":
        n = rng.choice([0, 1, 2**63, len(data) * 2, 7])
        path.write_bytes(n.to_bytes(8, "little", signed=False) + data[8:])
    elif kind == "header_json":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + n])
        key = rng.choice([k for k in header if k != "__metadata__"])
        header[key] = _mutate_value(header[key], rng)
        raw = json.dumps(header).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    elif kind == "flip_header":
        b = bytearray(data)
        n = int.from_bytes(data[:8], "little")
        b[8 + rng.randrange(n)] ^= 0xFF
        path.write_bytes(bytes(b))
    elif kind == "flip_data":
        b = bytearray(data)
        b[rng.randrange(len(b) - 64, len(b))] ^= 0xFF
        path.write_bytes(bytes(b))
    else:
        path.write_bytes(b"")
    return kind


def _merged(d: Path) -> Callable[[str], str | None]:
    """An accepted merge wrote a loadable checkpoint: an index whose every shard reads back."""
    def check(out: str) -> str | None:
        from llama_ft.shards import open_checkpoint

        try:
            ckpt = open_checkpoint(d / "merged", "--output")
            for shard in {t.shard for t in ckpt.tensors.values()}:
                for _ in ckpt.iter_shard(shard):
                    pass
        except Exception as e:  # noqa: BLE001 - any failure to read it back is the finding
            return f"merged output does not read back: {e}"
        return None
    return check


def _json_value(path: Path, keys: list[str], values: list, rng: random.Random) -> str:
    """Set one of `keys` of a JSON file to junk or to one of `values`; the mutation's name."""
    obj = json.loads(path.read_text())
    key = rng.choice(keys)
    obj[key] = rng.choice(JUNK_VALUES[:13] + values)
    path.write_text(json.dumps(obj, allow_nan=True))
    return f"config_{key}"


def _file_bytes(path: Path, rng: random.Random) -> str:
    """A byte mutation of a whole file; the mutation's name."""
    kind, data = byte_mutations(path.read_bytes(), rng)
    path.write_bytes(data)
    return "config_" + kind


def adapter_case(seeds: Seeds, d: Path, rng: random.Random) -> Case:
    a = _copy(seeds.adapter, d / "adapter")
    kind = rng.choice(["weights", "weights", "config_value", "config_bytes", "missing"])
    if kind == "weights":
        kind = "safetensors_" + _mutate_safetensors(a / "adapter_model.safetensors", rng)
    elif kind == "config_value":
        kind = _json_value(a / "adapter_config.json", ["r", "lora_alpha", "target_modules", "base_model_name_or_path",
                                                        "peft_type", "use_dora", "fan_in_fan_out", "rank_pattern",
                                                        "modules_to_save"], [2, 128, ["q_proj"], ["nope"], "IA3"], rng)
    elif kind == "config_bytes":
        kind = _file_bytes(a / "adapter_config.json", rng)
    else:
        (a / rng.choice(["adapter_config.json", "adapter_model.safetensors"])).unlink()
    return Case("adapter", kind, ["merge", "--base", str(seeds.tiny), "--adapter", str(a), "--output",
                                  str(d / "merged"), "--no-progress"], [str(a), a.name, "--adapter"], _merged(d))


def model_case(seeds: Seeds, d: Path, rng: random.Random) -> Case:
    m = _copy(seeds.tiny, d / "model")
    shards = sorted(m.glob("model-*.safetensors"))
    kind = rng.choice(["shard", "shard", "missing_shard", "index_missing_file", "index_bytes", "config_value",
                       "config_bytes", "no_index"])
    if kind == "shard":
        kind = "shard_" + _mutate_safetensors(rng.choice(shards), rng)
    elif kind == "missing_shard":
        rng.choice(shards).unlink()
    elif kind == "index_missing_file":
        idx = json.loads((m / "model.safetensors.index.json").read_text())
        k = rng.choice(list(idx["weight_map"]))
        idx["weight_map"][k] = rng.choice(["model-99999.safetensors", "../escape.safetensors", "", None, 3])
        (m / "model.safetensors.index.json").write_text(json.dumps(idx))
    elif kind == "index_bytes":
        kind = "index_" + _file_bytes(m / "model.safetensors.index.json", rng).removeprefix("config_")
    elif kind == "config_value":
        kind = _json_value(m / "config.json", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "intermediate_size", "vocab_size", "model_type",
                                               "torch_dtype", "rope_scaling"], [7, 3, "gpt2", "float8", -5], rng)
    elif kind == "config_bytes":
        kind = _file_bytes(m / "config.json", rng)
    else:
        (m / "model.safetensors.index.json").unlink()
    return Case("model", kind, ["merge", "--base", str(m), "--adapter", str(seeds.adapter), "--output",
                                str(d / "merged"), "--no-progress"], [str(m), m.name, "--base"], _merged(d))


# --- Parquet data files: valid tables written with pyarrow, then broken as tables or as bytes ---

PARQUET_FORMATS = ("alpaca", "alpaca", "chat", "chat", "oasst1", "chip2", "self-instruct", "dpo")
PARQUET_ROWS = 8
# layout-only changes: every row stays valid, so an accepted case must count all PARQUET_ROWS examples
PARQUET_INTACT = ("tiny_row_groups", "codec", "page_v2", "large_string", "dictionary", "extra_column",
                  "no_statistics", "reordered_columns", "intact")


def _parquet_rows(fmt: str) -> list[dict]:
    """PARQUET_ROWS valid rows of `fmt` (dpo: {prompt, chosen, rejected} pairs), from the bundled sets."""
    alpaca = [json.loads(x) for x in (ASSETS / "alpaca_tiny.jsonl").read_text().splitlines()[:PARQUET_ROWS]]
    if fmt == "alpaca":
        return alpaca
    if fmt == "chat":
        return [json.loads(x) for x in (ASSETS / "chat_tiny.jsonl").read_text().splitlines()[:PARQUET_ROWS]]
    if fmt == "oasst1":
        return [{"text": f"### Human: {r['instruction']} {r['input']}### Assistant: {r['output']}"} for r in alpaca]
    if fmt == "chip2":
        return [{"text": f"<human>: {r['instruction']} {r['input']}\n<bot>: {r['output']}"} for r in alpaca]
    if fmt == "self-instruct":
        return [{"prompt": f"{r['instruction']} {r['input']}", "completion": r["output"]} for r in alpaca]
    return [{"prompt": f"{r['instruction']} {r['input']}", "chosen": r["output"], "rejected": "no"} for r in alpaca]


def _invalid_utf8_strings(n: int, bad: int):
    """A string array of n values whose value `bad` is not UTF-8: built from raw buffers, as a writer in
    another language could leave it (pyarrow checks UTF-8 when it converts Python values, not here)."""
    import pyarrow as pa

    values = [b"ok %d" % i for i in range(n)]
    values[bad] = b"bad \xff\xfe \xc3\x28"
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.Array.from_buffers(pa.string(), n, [None, pa.array(offsets, pa.int32()).buffers()[1],
                                                  pa.py_buffer(b"".join(values))])


def _deep_type_value(depth: int, leaf):
    import pyarrow as pa

    value, typ = leaf, pa.string()
    for k in range(depth):
        if k % 2:
            value, typ = {"x": value}, pa.struct([("x", typ)])
        else:
            value, typ = [value], pa.list_(typ)
    return value, typ


def _table_mutation(rows: list[dict], rng: random.Random):
    """(name, table, write options) of the seed rows with one thing about the table changed."""
    import pyarrow as pa

    table = pa_table(rows)
    cols = table.column_names
    n = table.num_rows
    kind = rng.choice(["wrong_type", "nulls", "all_null", "missing_column", "empty_table", "deep", "huge_string",
                       "invalid_utf8", "struct_missing_fields", "list_of_strings", "renamed", "many_columns",
                       "odd_types", "hf_metadata", "zero_row_groups", *PARQUET_INTACT])
    opts: dict = {}
    col = rng.choice(cols)
    i = table.schema.get_field_index(col)
    bad = rng.randrange(n)
    if kind == "wrong_type":
        values = [rng.choice([7, -1, 2**62]) for _ in range(n)]
        typ = rng.choice([pa.int64(), pa.float64(), pa.int8(), pa.bool_()])
        if typ == pa.float64():
            values = [rng.choice([0.5, -1.0, 1e300, float("nan")]) for _ in range(n)]
        elif typ == pa.bool_():
            values = [bool(v % 2) for v in values]
        elif typ == pa.int8():
            values = [v % 100 for v in values]
        table = table.set_column(i, col, pa.array(values, typ))
    elif kind == "nulls":
        values = table.column(col).to_pylist()
        for j in rng.sample(range(n), rng.randint(1, n)):
            values[j] = None
        table = table.set_column(i, col, pa.array(values, table.schema.field(col).type))
    elif kind == "all_null":
        table = table.set_column(i, col, pa.nulls(n))
    elif kind == "missing_column":
        table = table.drop_columns([col])
    elif kind in ("empty_table", "zero_row_groups"):  # pyarrow writes one empty row group, or with
        table = table.slice(0, 0)                        # zero_row_groups (parquet_case) none at all
        opts["row_group_size"] = rng.choice([1, 1024])
    elif kind == "deep":
        value, typ = _deep_type_value(rng.choice([3, 40, 200]), "x")
        table = table.set_column(i, col, pa.array([value] * n, typ))
    elif kind == "huge_string":
        # 1-2 MB of text in one value (3 MB in each of a row's messages took the tokenizer 10 s of CPU: past the case
        # timeout on the loaded 2-core machine, and no different in kind)
        huge = rng.choice(["a" * 2_000_000, "ab " * 300_000, "\u00e9" * 1_000_000])
        values = table.column(col).to_pylist()
        if pa.types.is_string(table.schema.field(col).type):
            values[bad] = huge
        else:  # chat: one message's text
            j = rng.choice([j for j, v in enumerate(values) if v])
            k = rng.randrange(len(values[j]))
            values[j][k] = {f: huge if f in ("content", "value") else v for f, v in values[j][k].items()}
        table = table.set_column(i, col, pa.array(values, table.schema.field(col).type))
    elif kind == "invalid_utf8":
        if pa.types.is_string(table.schema.field(col).type):
            table = table.set_column(i, col, _invalid_utf8_strings(n, bad))
        else:  # chat: one message's text, inside the list of structs
            lists = table.column(col).combine_chunks()
            inner = lists.flatten()
            names = [f.name for f in inner.type]
            fields = [inner.field(k) for k in range(len(names))]
            fields[-1] = _invalid_utf8_strings(len(inner), rng.randrange(len(inner)))
            inner = pa.StructArray.from_arrays(fields, names=names)
            table = table.set_column(i, col, pa.ListArray.from_arrays(lists.offsets, inner, mask=lists.is_null()))
    elif kind == "struct_missing_fields":
        keep = rng.choice([["role"], ["content"], ["role", "text"], []])
        listed = pa.types.is_list(table.schema.field(col).type)
        values = [[{k: m.get(k, "x") for k in keep} for m in r or []] if listed else {k: "x" for k in keep}
                  for r in table.column(col).to_pylist()]
        typ = pa.struct([(k, pa.string()) for k in keep])
        typ = pa.list_(typ) if listed else typ
        if not keep:
            values, typ = [[{}]] * n, pa.list_(pa.struct([("role", pa.string())]))
        table = table.set_column(i, col, pa.array(values, typ))
    elif kind == "list_of_strings":
        table = table.set_column(i, col, pa.array([["a", "b"]] * n, pa.list_(pa.string())))
    elif kind == "renamed":
        table = table.rename_columns([c.upper() if c == col else c for c in cols])
    elif kind == "many_columns":
        extra = {f"c{k}": pa.array(["v"] * n) for k in range(rng.choice([50, 2000]))}
        table = pa.table({**{c: table.column(c) for c in cols}, **extra})
    elif kind == "odd_types":
        import datetime
        import decimal

        choices = [
            pa.array([datetime.datetime(1, 1, 1)] * n, pa.timestamp("us")),
            pa.array([2**62] * n, pa.timestamp("ns")),
            pa.array([10**13] * n, pa.timestamp("s")),  # beyond Python's datetime
            pa.array([decimal.Decimal("1.5")] * n, pa.decimal128(38, 10)),
            pa.array([b"\xff\x00"] * n, pa.binary()),
            pa.array([[("k", "v")]] * n, pa.map_(pa.string(), pa.string())),
            pa.array([datetime.timedelta(days=1)] * n, pa.duration("s")),
            pa.array([1.5] * n, pa.float16()) if hasattr(pa, "float16") else pa.array([1.5] * n),
            pa.array([[1, 2]] * n, pa.list_(pa.int32(), 2)),
            pa.array([None] * n, pa.struct([])),
        ]
        table = table.set_column(i, col, rng.choice(choices))
    elif kind == "hf_metadata":
        # datasets reads a `huggingface` key of the schema metadata as the table's features
        meta = rng.choice([b"{", b"null", b"[]", b'{"info": 3}', b'{"info": {"features": {"x": 1}}}',
                           json.dumps({"info": {"features": {c: {"dtype": "int64", "_type": "Value"}
                                                             for c in cols}}}).encode(),
                           json.dumps({"info": {"features": {col: {"_type": "Nope"}}}}).encode(),
                           b"\xff\xfe"])
        table = table.replace_schema_metadata({b"huggingface": meta})
    elif kind == "tiny_row_groups":
        opts["row_group_size"] = 1
    elif kind == "codec":
        opts["compression"] = rng.choice(["none", "snappy", "gzip", "zstd", "brotli", "lz4"])
    elif kind == "page_v2":
        opts.update(data_page_version="2.0", use_dictionary=False)
    elif kind == "large_string":
        table = pa_table(rows).cast(pa.schema(
            [pa.field(f.name, pa.large_string()) if pa.types.is_string(f.type) else f for f in table.schema]))
    elif kind == "dictionary":
        opts["use_dictionary"] = True
        if pa.types.is_string(table.schema.field(col).type):
            table = table.set_column(i, col, table.column(col).dictionary_encode())
    elif kind == "extra_column":
        table = table.append_column("extra", pa.array([rng.choice([1, 2])] * n))
    elif kind == "no_statistics":
        opts["write_statistics"] = False
    elif kind == "reordered_columns":
        table = table.select(list(reversed(cols)))
    return kind, table, opts


def _parquet_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A byte mutation aimed at what a Parquet reader trusts: the footer, its length, the magic, the pages."""
    n = len(data)
    footer_len = int.from_bytes(data[-8:-4], "little")
    footer0 = max(4, n - 8 - footer_len)
    kind = rng.choice(["truncate", "truncate_footer", "flip_footer", "flip_pages", "footer_len", "magic",
                       "only_magic", "append", "generic"])
    b = bytearray(data)
    if kind == "truncate":
        return kind, data[: rng.randrange(1, n)]
    if kind == "truncate_footer":
        return kind, data[: rng.randrange(footer0, n)]
    if kind == "flip_footer":
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(footer0, n - 8)] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "flip_pages":
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(4, max(footer0, 5))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "footer_len":
        v = rng.choice([0, 1, n, n - 8, 2**31 - 1, 2**32 - 1, footer_len + 1, footer_len - 1])
        b[-8:-4] = v.to_bytes(4, "little")
        return kind, bytes(b)
    if kind == "magic":
        where = rng.choice([slice(0, 4), slice(n - 4, n)])
        b[where] = rng.choice([b"PAR0", b"PARE", b"\x00\x00\x00\x00"])
        return kind, bytes(b)
    if kind == "only_magic":
        return kind, rng.choice([b"PAR1", b"PAR1PAR1", b"PAR1\x00\x00\x00\x00PAR1"])
    if kind == "append":
        return kind, data + data[: rng.randrange(1, n)]
    kind, out = byte_mutations(data, rng)
    return "bytes_" + kind, out


def parquet_case(seeds: Seeds, d: Path, rng: random.Random) -> Case:
    import pyarrow.parquet as pq

    fmt = rng.choice(PARQUET_FORMATS)
    rows = _parquet_rows(fmt)
    mutation, table, opts = _table_mutation(rows, rng)
    f = d / "train.parquet"
    try:
        if mutation == "zero_row_groups":
            pq.ParquetWriter(f, table.schema).close()
        else:
            pq.write_table(table, f, **opts)
    except Exception as e:  # noqa: BLE001 - a table pyarrow will not write is no input a user could hand us
        mutation = f"unwritable_{mutation}({type(e).__name__})"
        pq.write_table(pa_table(rows), f)
    if mutation not in PARQUET_INTACT and rng.random() < 0.35:
        kind, data = _parquet_bytes(f.read_bytes(), rng)
        f.write_bytes(data)
        mutation = f"{mutation}+{kind}"
    argv = ["data", "--dataset", str(f), "--model_name_or_path", str(seeds.tiny), "--source_max_len", "64",
            "--target_max_len", "32"]
    argv += ["--dataset_format", "chat", "--objective", "dpo"] if fmt == "dpo" else ["--dataset_format", fmt]
    expect = len(rows) if mutation in PARQUET_INTACT else None

    def accepted(out: str) -> str | None:
        if "examples" not in out:
            return f"no summary of the examples printed: {out[-300:]!r}"
        if expect is not None and not re.search(rf"\bexamples\s+{expect}\b", out):
            return f"a layout-only change ({mutation}) lost rows: expected {expect} examples in {out[-400:]!r}"
        return None

    return Case("parquet", f"{fmt}:{mutation}", argv, [str(f), f.name, "--dataset"], accepted,
                must_accept=expect is not None and fmt != "dpo")


def pa_table(rows: list[dict]):
    """The rows as a table with a column for every key of any row (null where a row lacks it): chat seeds mix
    OpenAI `messages` rows and ShareGPT `conversations` rows (Table.from_pylist would keep row 0's keys only)."""
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})


FLAG_VALUES = ["-1", "0", "abc", "1e999", "nan", "", "99999999999999999999", "1.5", "true", "/nonexistent", "\x00",
               "--", "ü"]


def flags_case(seeds: Seeds, d: Path, rng: random.Random) -> Case:
    flag = rng.choice(["--source_max_len", "--target_max_len", "--max_seq_len", "--packing", "--max_train_samples",
                       "--seed", "--dataset_format", "--chat_template", "--preview", "--objective", "--dataset",
                       "--train_on_source", "--tokenizer_name_or_path", "--model_name_or_path", "--config"])
    value = rng.choice(FLAG_VALUES)
    argv = ["data", "--model_name_or_path", str(seeds.tiny)]
    if flag != "--model_name_or_path":
        argv += [flag, value]
    else:
        argv[2] = value
    if rng.random() < 0.15:
        argv.append(rng.choice(["--nope", "--lora_r", "--preview"]))  # an unknown flag, or one without its value
    names = [flag, "--nope", "--lora_r", "--preview", "argument", "usage"] + ([value] if value.strip() else [])
    return Case("flags", f"{flag}={value!r}", argv, names)


TARGETS: dict[str, Callable[[Seeds, Path, random.Random], Case]] = {
    "data": data_case, "config": config_case, "hostfile": hostfile_case, "adapter": adapter_case,
    "model": model_case, "flags": flags_case, "parquet": parquet_case,
}


# --- running a case in process, and the oracle ---


def _alarm(signum, frame):
    raise CaseTimeout


def run_case(case: Case, timeout: float) -> Outcome:
    from llama_ft import cli

    err, out = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    code: int | str | None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(case.argv)
    except SystemExit as e:
        code = e.code
    except CaseTimeout:
        return Outcome(case, "hang", f"no answer in {timeout} s")
    except BaseException:  # noqa: BLE001 - what the oracle looks for: an exception the command let escape
        return Outcome(case, "traceback", traceback.format_exc(limit=-4))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    text = err.getvalue()
    if isinstance(code, str):  # sys.exit("message"): printed, exit 1
        text, code = text + code, 1
    code = code or 0
    if "Traceback (most recent call last)" in text:
        return Outcome(case, "traceback", text[-2000:])
    if code == 0:
        wrong = case.accepted(out.getvalue()) if case.accepted else None
        return Outcome(case, "wrong", wrong) if wrong else Outcome(case, "accepted")
    lines = [ln for ln in text.splitlines() if "error:" in ln.lower()]
    if case.must_accept:
        return Outcome(case, "wrong", f"a valid input was refused (exit {code}): {(lines or [text])[-1][:500]}")
    if not lines:
        return Outcome(case, "unnamed", f"exit {code}, no error line: {text[-500:]!r}")
    if len(lines) > 1:
        return Outcome(case, "unnamed", f"exit {code}, {len(lines)} error lines: {text[-800:]!r}")
    if not any(name and name in ln for ln in lines for name in case.names):
        return Outcome(case, "unnamed", f"exit {code}: {lines[-1][:500]}")
    return Outcome(case, "rejected", lines[-1][:300])


def fuzz(cases: int, seed: int, work: Path, timeout: float = 20.0, targets: list[str] | None = None,
         log: Callable[[str], None] | None = None, verbose: bool = False) -> list[Outcome]:
    """`cases` cases drawn round-robin over the targets from random.Random(seed); the outcome of each."""
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a --dataset that is no file is a Hub name: fail fast, not retry
    logging.disable(logging.WARNING)  # the commands' own info lines are not what is judged
    seeds = Seeds(work).make()
    rng = random.Random(seed)
    names = targets or list(TARGETS)
    outcomes = []
    for i in range(cases):
        d = work / "cases" / str(i)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        case = TARGETS[names[i % len(names)]](seeds, d, rng)
        o = run_case(case, timeout)
        show = log is not None and verbose
        outcomes.append(o)
        if log and (o.verdict not in ("accepted", "rejected") or show):
            log(f"case {i} ({case.target} {case.mutation}): {o.verdict}: {o.detail[-800:]}")
        shutil.rmtree(d, ignore_errors=True)
    logging.disable(logging.NOTSET)
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    by = Counter((o.case.target, o.verdict) for o in outcomes)
    verdicts = ["accepted", "rejected", "traceback", "hang", "unnamed", "wrong"]
    rows = ["| target | cases | " + " | ".join(verdicts) + " |", "|---|---|" + "---|" * len(verdicts)]
    for t in sorted({o.case.target for o in outcomes}):
        n = sum(v for (tt, _), v in by.items() if tt == t)
        rows.append(f"| {t} | {n} | " + " | ".join(str(by[(t, v)]) for v in verdicts) + " |")
    tot = Counter(o.verdict for o in outcomes)
    rows.append(f"| all | {len(outcomes)} | " + " | ".join(str(tot[v]) for v in verdicts) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--seed", type=int, default=None, help="default: drawn, and printed")
    p.add_argument("--work", type=Path, default=Path("/tmp/llama-ft-fuzz"))
    p.add_argument("--case_timeout", type=float, default=20.0)
    p.add_argument("--verbose", action="store_true", help="print every case's verdict and error line")
    p.add_argument("--targets", nargs="*", choices=list(TARGETS), default=None)
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"fuzz: seed {seed}, {args.cases} cases", flush=True)
    t0 = time.time()
    outcomes = fuzz(args.cases, seed, args.work, args.case_timeout, args.targets,
                    log=lambda s: print(s, file=sys.__stderr__, flush=True), verbose=args.verbose)
    print(table(outcomes))
    print(f"fuzz: {len(outcomes)} cases in {time.time() - t0:.0f} s, seed {seed}")
    return int(any(o.verdict not in ("accepted", "rejected") for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
