"""Hugging Face safetensors checkpoints: config, shard index, header checks, tensor reads.

The loader, the merge and the hub helper all go through `open_checkpoint`, so a
malformed model directory gets the same one-line error everywhere.

Layout handled (as written by `save_pretrained`):
    DIR/config.json
    DIR/model.safetensors                      (single file), or
    DIR/model.safetensors.index.json           {"metadata": {...}, "weight_map": {name: shard}}
    DIR/model-00001-of-0000N.safetensors ...
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama_ft.checkpoint.gguf import check_not_gguf
from llama_ft.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# safetensors dtype strings -> torch dtypes (the subset checkpoints use)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one tensor: its shard, dtype and shape (nothing read beyond the header)."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute file offset of the tensor's first byte

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=ST_DTYPES.get(self.dtype, torch.uint8)).element_size()
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """An opened, validated checkpoint directory."""

    root: Path
    config: dict
    tensors: dict[str, TensorInfo]  # tensor name -> header info
    index_metadata: dict = field(default_factory=dict)

    @property
    def shards(self) -> list[str]:
        """Shard file names in index order (sorted, as save_pretrained numbers them)."""
        return sorted({t.shard for t in self.tensors.values()})

    def names_in(self, shard: str) -> list[str]:
        return [n for n, t in self.tensors.items() if t.shard == shard]

    def shard_path(self, shard: str) -> Path:
        return self.root / shard

    def read(self, name: str) -> torch.Tensor:
        """Read one whole tensor (mmap'ed by safetensors)."""
        with _opened(self.shard_path(self.tensors[name].shard)) as f:
            return f.get_tensor(name)

    def iter_shard(self, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for every tensor of one shard, in file order."""
        with _opened(self.shard_path(shard)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header (8-byte little-endian length + JSON) with explicit errors.

    Raises UserError naming the file when it is truncated or the header is not valid JSON,
    or when a tensor's byte range points past the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8:
                raise UserError(f"{path}: corrupt safetensors header (header length {n} exceeds file size {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"{path}: cannot read safetensors file ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt safetensors header (not valid JSON)") from e
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(meta["shape"])
            # wrong JSON types reached the byte arithmetic later as TypeError tracebacks (fuzzer)
            if not (isinstance(dtype, str) and all(_index(x) for x in (start, end, *shape))):
                raise TypeError(name)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: corrupt safetensors header entry for {name!r}") from e
        if end > data_len or start > end:
            raise UserError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end}, data has {data_len})"
            )
        if dtype in ST_DTYPES and math.prod(shape) * ST_DTYPES[dtype].itemsize != end - start:
            # a shape that does not fit its bytes went on to size the merge output (1e36 MiB "needed": fuzzer)
            raise UserError(f"{path}: corrupt safetensors header entry for {name!r} (shape {list(shape)} of {dtype} "
                            f"does not fit its {end - start} bytes)")
        meta["shape"] = shape
        meta["dtype"] = dtype
        meta["offset"] = 8 + n + start
    return header


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """safe_open, with what it refuses (a header read_safetensors_header let through: offsets that do not match
    a shape and dtype, overlapping tensors) as one line naming the file, not a SafetensorError (fuzzer)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise UserError(f"{path}: corrupt safetensors file ({' '.join(str(e).split())})") from None


def _index(x: object) -> bool:
    """A non-negative int of JSON (not a bool): a byte offset or a dimension."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _load_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path}: missing {what}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {what} must be a JSON object")
    return obj


def open_checkpoint(path: str | Path, flag: str = "--model_name_or_path") -> Checkpoint:
    """Open and validate a safetensors checkpoint directory.

    Checks: the directory exists; config.json parses; the index (or single file) exists and
    names existing shards; every shard header parses; every tensor the index names is in its shard.
    """
    check_not_gguf(path, flag)
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{flag} {path}: not a directory (expected a Hugging Face model directory)")
    config = _load_json(root / CONFIG_NAME, "config.json")
    index_path = root / INDEX_NAME
    if index_path.exists():
        index = _load_json(index_path, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path}: field 'weight_map' missing or empty (expected {{tensor: shard file}})")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:  # sorted() of mixed types was a TypeError traceback (fuzzer)
            raise UserError(f"{index_path}: 'weight_map' names {bad[1]!r} as the shard of {bad[0]!r} (expected a "
                            "file name)")
        metadata = index.get("metadata") or {}
    elif (root / SINGLE_NAME).exists():
        weight_map = None
        metadata = {}
    else:
        raise UserError(
            f"{flag} {path}: no {INDEX_NAME} or {SINGLE_NAME} (expected safetensors weights; "
            ".bin/.pth checkpoints are not loaded because they need pickle)"
        )

    shard_names = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
    headers: dict[str, dict] = {}
    for shard in shard_names:
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise UserError(f"{index_path}: bad shard name {shard!r} in 'weight_map'")
        p = root / shard
        if not p.is_file():
            raise UserError(f"{p}: shard named in {INDEX_NAME} is missing")
        headers[shard] = read_safetensors_header(p)

    tensors: dict[str, TensorInfo] = {}
    if weight_map is None:
        weight_map = {n: SINGLE_NAME for n in headers[SINGLE_NAME] if n != "__metadata__"}
    for name, shard in weight_map.items():
        meta = headers[shard].get(name)
        if meta is None:
            raise UserError(f"{root / shard}: tensor {name!r} named in {INDEX_NAME} is not in this shard")
        tensors[name] = TensorInfo(shard=shard, dtype=meta["dtype"], shape=meta["shape"], offset=meta["offset"])
    return Checkpoint(root=root, config=config, tensors=tensors, index_metadata=metadata)


# Top-level files of a model directory that are weights (never copied: rewritten shards replace them).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf")


def side_files(base: Path) -> list[Path]:
    """Every top-level non-weight file but config.json (tokenizer, generation config, chat template...)."""
    found = []
    for p in sorted(base.iterdir()):
        name = p.name
        if not p.is_file() or name.startswith(".") or name == CONFIG_NAME:
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        found.append(p)
    return found


def copy_side_files(base: Path, out: Path) -> list[str]:
    """Copy the side_files of `base` into `out`."""
    import shutil

    copied = []
    for p in side_files(base):
        shutil.copy2(p, out / p.name)  # follows symlinks (HF cache snapshots)
        copied.append(p.name)
    return copied


def non_weight_bytes(base: Path) -> int:
    """Bytes of what a rewritten checkpoint copies or rewrites besides the tensors: the side files, config.json
    and the index (their sizes in `base`; part of the output size that merge and quantize check ahead)."""
    extra = [base / CONFIG_NAME, base / INDEX_NAME]
    return sum(p.stat().st_size for p in [*side_files(base), *extra] if p.is_file())


def rewrite_shards(
    ckpt: Checkpoint,
    out_dir: Path,
    transform: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
    desc: str,
    progress: bool = True,
) -> tuple[dict[str, str], int]:
    """Write a new checkpoint into `out_dir`, one shard at a time, under the same shard names.

    Every tensor the index names goes through `transform(name, tensor)`, which returns the
    tensors to store for it (the tensor changed, or with companions such as FP8 scales). Only
    one shard is held at a time (peak memory about one shard). Returns (weight_map, total bytes).
    """
    from tqdm.auto import tqdm

    weight_map: dict[str, str] = {}
    total = 0
    for shard in tqdm(ckpt.shards, desc=desc, unit="shard", disable=not progress):
        out: dict[str, torch.Tensor] = {}
        t = new = None  # no reference to the previous shard's last tensor survives into this one
        for name, t in ckpt.iter_shard(shard):
            if name not in ckpt.tensors:  # a tensor the index does not name: not part of the model
                continue
            for new_name, new in transform(name, t).items():
                out[new_name] = new
                weight_map[new_name] = shard
                total += new.numel() * new.element_size()
        save_file(out, str(out_dir / shard), metadata={"format": "pt"})
        del out  # drop this shard before the next one is read
    return weight_map, total


class ShardReader:
    """Reads row ranges of checkpoint tensors with positioned reads, counting every byte.

    Rows are the first dimension (elements for 1-D tensors); rows [r0, r1) of a row-major
    tensor are one contiguous byte range, so a rank that owns part of a tensor reads that part
    and nothing else. Not mmap: the count in `bytes_read` is exactly what came off the files.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.bytes_read = 0
        self._files: dict[str, object] = {}

    def _file(self, shard: str):
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.ckpt.shard_path(shard), "rb")  # noqa: SIM115 - closed in close()
        return f

    def read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of tensor `name`, shape (r1 - r0, *shape[1:]), in the checkpoint dtype."""
        info = self.ckpt.tensors[name]
        dtype = ST_DTYPES[info.dtype]
        row_elems = 1
        for d in info.shape[1:]:
            row_elems *= d
        esize = torch.tensor([], dtype=dtype).element_size()
        n = (r1 - r0) * row_elems * esize
        buf = bytearray(n)
        f = self._file(info.shard)
        f.seek(info.offset + r0 * row_elems * esize)
        got = f.readinto(buf) if n else 0
        if got != n:
            raise UserError(f"{self.ckpt.shard_path(info.shard)}: truncated while reading tensor {name!r}")
        self.bytes_read += n
        t = torch.frombuffer(buf, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        return t.view(dtype).reshape(r1 - r0, *info.shape[1:])

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, reading only the rows that hold them."""
        shape = self.ckpt.tensors[name].shape
        row_elems = 1
        for d in shape[1:]:
            row_elems *= d
        r0, r1 = start // row_elems, -(-end // row_elems)
        rows = self.read_rows(name, r0, r1).reshape(-1)
        return rows[start - r0 * row_elems: end - r0 * row_elems]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
