"""`llama-ft kernels --compile sm_80,sm_86,sm_89,sm_90,sm_100 [--json FILE]`: compile every Triton kernel of the
project at every configuration its dispatcher can choose, for each architecture, without a GPU.

Prints one markdown row per kernel, launch, tile configuration and architecture: ok or the compile error,
registers, spill stores (bytes) and shared memory. `--defaults` keeps the configurations training uses by
default (bf16, 4,096 tokens, Llama 70B projections, r 16 and 64, the default tiles; the quantize kernels):
what CI compiles. The full sweep (every dtype, LoRA rank bucket, M class and autotune configuration) is
about 1,100 compiles, 7 minutes on 2 idle cores the first time.
Exit status: 0 when every row compiles, 1 when one does not, 2 for bad input (one line).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from llama_ft.errors import UserError, user_errors_exit
from llama_ft.gpus import ARCHS, Arch, parse_archs

MIN_TRITON = (3, 3)
"""ASTSource with constexprs and divisibility by argument, GPUTarget, and Blackwell targets."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llama-ft kernels", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", required=True, metavar="ARCHS",
                   help=f"comma list of {', '.join(ARCHS)}, or all (sm_7x has no bf16 tensor cores)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every row (with what reproduces its compile)")
    p.add_argument("--defaults", action="store_true",
                   help="only the default configurations of training (bf16, M 4096, r 16 and 64) and the quantize "
                        "kernels")
    p.add_argument("--jobs", type=int, metavar="N", help="compiles at a time (default: the CPU count, 8 at most)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="compile every row again (default: reuse $LLAMA_FT_CACHE/kernels)")
    return p


def check_triton() -> str:
    """The Triton version, or a UserError line saying what was found and what is needed."""
    need = ".".join(map(str, MIN_TRITON))
    try:
        import triton
    except ImportError:
        raise UserError(f"triton is not installed; compiling the kernels for GPU targets needs triton >= {need}") \
            from None
    version = triton.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < MIN_TRITON:
        raise UserError(f"triton {version} found; compiling the kernels for GPU targets needs triton >= {need}")
    return version


def _compile_job(spec: dict[str, Any], arch: Arch, use_cache: bool) -> dict[str, Any]:
    from llama_ft.kernelcheck.compile import cached_compile

    return cached_compile(spec, arch, use_cache)


def sweep(archs: list[Arch], defaults_only: bool = False, jobs: int = 1, use_cache: bool = True,
          progress: bool = False) -> list[dict[str, Any]]:
    """Every row for every architecture, compiled (each distinct compile once), in a stable order."""
    from llama_ft.kernelcheck.compile import cache_key
    from llama_ft.kernelcheck.registry import specs

    rows = [row for arch in archs for row in specs(arch, defaults_only)]
    by_arch = {a.name: a for a in archs}
    keys = [cache_key(row, by_arch[row["arch"]]) for row in rows]
    unique = {k: row for k, row in zip(keys, rows, strict=True)}
    results: dict[str, dict[str, Any]] = {}
    # fork: the workers inherit the imported kernels (no CUDA is initialized here; compiling needs no driver)
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
        futures = {pool.submit(_compile_job, row, by_arch[row["arch"]], use_cache): k for k, row in unique.items()}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            if progress:
                r = results[futures[fut]]
                print(f"\r[kernels] {i}/{len(unique)} compiles"
                      + (" (cached)" if r.get("cached") else f" ({r['seconds']:.1f} s)"),
                      end="", file=sys.stderr, flush=True)
    if progress and unique:
        print(file=sys.stderr)
    return [{**row, **results[k], "key": k} for k, row in zip(keys, rows, strict=True)]


def _short(kernel: str) -> str:
    module, _, name = kernel.partition(":")
    return f"{module.split('.')[-2]} {name.strip('_').removesuffix('_kernel')}"


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| kernel | mode | launch | tiles | arch | result | registers | spill stores (B) | shared (KB) |",
           "|---|---|---|---|---|---|--:|--:|--:|"]
    for r in rows:
        result = "ok" if r["ok"] else r["error"].replace("|", "\\|")
        shared = f"{r['shared'] / 1024:.0f}" if r["shared"] is not None else "-"
        tiles = r["tiles"] + (" **default**" if r["default"] else "")
        out.append(f"| {_short(r['kernel'])} | {r['mode']} | {r['launch']} | {tiles} | {r['arch']} | {result} | "
                   f"{r['registers'] if r['registers'] is not None else '-'} | "
                   f"{r['spill_stores'] if r['spill_stores'] is not None else '-'} | {shared} |")
    return "\n".join(out)


def summary(rows: list[dict[str, Any]]) -> str:
    bad = [r for r in rows if not r["ok"]]
    defaults = [r for r in rows if r["default"] and r["ok"]]
    spilling = sorted({f"{_short(r['kernel'])} {r['mode']} {r['arch']} ({r['spill_stores']} B)" for r in defaults
                       if r["spill_stores"]})
    distinct = {r["key"]: r for r in rows}
    compiled = sum(not r.get("cached") for r in distinct.values())
    return (f"{len(rows)} rows, {len(distinct)} distinct compiles ({compiled} compiled now, the rest from the cache); "
            f"{len(bad)} compile errors; default configurations spilling: {', '.join(spilling) or 'none'}")


def _reexec_without_interpreter(argv: list[str]) -> int:
    """Under TRITON_INTERPRET=1 the kernels are defined as interpreted functions, which cannot be compiled: run
    the command again in a process without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "llama_ft.cli", "kernels", *argv]
    return subprocess.run(cmd, env=env).returncode


@user_errors_exit(prog="llama-ft kernels")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    archs = parse_archs(args.compile)
    jobs = min(os.cpu_count() or 1, 8) if args.jobs is None else args.jobs
    if jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected an integer >= 1")
    version = check_triton()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _reexec_without_interpreter(argv)
    # Triton 3.9 warns, once per process, that its fp-fusion default will change: the check compiles as a launch
    # does (with Triton's default), so the warning says nothing about it
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    rows = sweep(archs, args.defaults, jobs, args.cache, progress=sys.stderr.isatty())
    print(table(rows))
    print()
    print(summary(rows))
    if args.json:
        header = {"command": "llama-ft kernels " + " ".join(argv), "triton": version,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "archs": [a.name for a in archs]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    return 1 if any(not r["ok"] for r in rows) else 0
