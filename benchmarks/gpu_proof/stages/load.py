"""Stage 7, load: benchmarks/load.py writes a random 70B-shape FP8 checkpoint (llama-ft's pre-quantized layout)
to the machine's local disk, with 16 of the 80 layers (8 or 4 when less time is left: a whole one is ~70 GB,
more than the disk and the minutes allow), empties the page cache, and times streaming it into one GPU with
half of the frozen base partitions offloaded to pinned host memory; the 80-layer time is extrapolated from
the bytes, and labelled so. Dry run: 2 layers of a tiny shape, page cache left warm."""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

import load as load_bench  # stdlib-only at import

from ..runner import HERE, GiB, Proof, Stage, shown


def full_fp8_bytes(shape: str, layers: int) -> int:
    """Bytes of the llama-ft FP8 checkpoint of `shape` with `layers` layers (the quantized linears at 1 byte
    plus their float32 128x128 block scales, norms, embeddings and LM head in bf16)."""
    d = load_bench.SHAPES[shape]
    h, i, v = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    kv = d["num_key_value_heads"] * (h // d["num_attention_heads"])
    linears = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    blocks = sum(-(-n // 128) * -(-k // 128) for n, k in linears)
    per_layer = sum(n * k for n, k in linears) + 4 * blocks + 2 * 2 * h
    head = 2 * v * h * (1 if d["tie_word_embeddings"] else 2) + 2 * h
    return layers * per_layer + head


def stage_load(p: Proof, limit: float) -> dict[str, Any]:
    out = p.scratch / "load.json"
    out.unlink(missing_ok=True)
    if p.dry:
        shape, layers, extra = "tiny", 2, []
    else:  # fewer layers when less time or disk is left: the write and a cold read both scale with them
        free = shutil.disk_usage(p.scratch).free
        fits = [n for n, secs in ((16, 140), (8, 90), (4, 0))
                if limit >= secs and 1.2 * full_fp8_bytes("70b", n) < free]
        if not fits:
            return {"status": "skipped", "reason": f"{free / GiB:.1f} GiB free at {p.scratch}: not enough for 4 layers "
                                                   f"of the 70B shape ({full_fp8_bytes('70b', 4) / GiB:.1f} GiB)"}
        shape, layers, extra = "70b", fits[0], ["--drop-caches"]
    cmd = [sys.executable, str(HERE / "load.py"), "--shape", shape, "--layers", str(layers), "--fp8", "--nproc", "1",
           "--loaders", "stream", "--offload-ratio", "0.5", *extra, "--dir", str(p.scratch / "load"),
           "--json", str(out)]
    ran = p.run(cmd, limit, "load")
    result: dict[str, Any] = {"commands": [shown(cmd)]}
    if ran.rc != 0 or not out.exists():
        return {**result, "status": "timeout" if ran.rc == 124 else "failed", "reason": ran.why(limit)}
    report = json.loads(out.read_text())
    row = report["rows"][0]
    full_layers = load_bench.SHAPES[shape]["num_hidden_layers"]
    ckpt = report["checkpoint_bytes"]
    full = full_fp8_bytes(shape, full_layers)
    res = {"shape": shape, "layers": layers, "of_layers": full_layers, "checkpoint_bytes": ckpt,
           "write_seconds": report["write_seconds"], "load_seconds": row["seconds"],
           "gib_per_s": ckpt / GiB / row["seconds"], "bytes_read": row["bytes_read"],
           "read_vs_checkpoint": row["bytes_read"] / ckpt, "peak_rss_bytes": row["peak_rss_bytes"],
           "cuda_max_allocated_bytes": row.get("cuda_max_allocated_bytes"),
           "partition_bytes_gpu": row.get("partition_bytes_gpu"),
           "partition_bytes_host": row.get("partition_bytes_host"),
           "offload": row.get("offload"), "page_cache": report["page_cache"].get("stream"),
           # the formula the extrapolation uses, at the layers written: equal to the checkpoint's bytes
           "formula_bytes_at_these_layers": full_fp8_bytes(shape, layers),
           "full_checkpoint_bytes": full, "full_load_seconds_extrapolated": row["seconds"] * full / ckpt}
    result.update(results=res, table_md=ran.stdout.strip(),
                  summary=f"{layers} of {full_layers} layers, {ckpt / GiB:.2f} GiB in {row['seconds']:.1f} s "
                          f"({res['gib_per_s']:.2f} GiB/s, page cache {res['page_cache']}), read "
                          f"{res['read_vs_checkpoint']:.2f}x; all {full_layers} layers ({full / GiB:.1f} GiB) "
                          f"~{res['full_load_seconds_extrapolated']:.0f} s extrapolated, not measured")
    return {**result, "status": "ok"}


STAGE = Stage("load", "load: 70B-shape FP8 checkpoint into one GPU with offload", stage_load, 150, 90, 45)
