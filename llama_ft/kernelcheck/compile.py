"""Compile one kernel configuration for one architecture and read its registers, spills and shared memory.

A row reproduces its compile by itself:

    fn = getattr(importlib.import_module(module), name)          # row["kernel"] = "module:name"
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in row["divisible_by_16"]}
    constexprs = {k: tl.dtype(v) if isinstance(v, str) else v for k, v in row["constexprs"].items()}
    triton.compile(ASTSource(fn, row["signature"], constexprs, attrs),
                   target=GPUTarget("cuda", capability, 32), options=row["options"])

The signature, constexprs and divisibility are those a launch gives (`specialize`, Triton's own rules): a
pointer 16-byte aligned and an int divisible by 16 carry tt.divisibility 16, an int equal to 1 becomes the
constexpr 1. They matter: a unit stride known at compile time is what lets Triton vectorize the loads and
pipeline the K loop through shared memory. Compiled without them, the FP8 forward spills at 255 registers on
sm_90 and runs unpipelined (24-32 KB of shared memory where 3 stages of its tiles need about 80 KB).

Registers and spill stores come from ptxas -v (Triton's own run when the knob for its log exists, else ptxas
on the PTX with the same flags); shared memory is what Triton launches the kernel with (metadata.shared).
Results are cached under $LLAMA_FT_CACHE/kernels (default ~/.cache/llama-ft/kernels), keyed by the
kernel's source hash (its JITFunction.cache_key, which covers the jit functions it calls), the Triton
version, the architecture, the signature, constexprs, divisibility and options.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llama_ft.gpus import Arch

HARNESS_VERSION = 1
"""Bump when what a cached row holds changes."""
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
               torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}


def specialize(fn: Any, args: tuple, constexprs: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """What a launch of `fn(*args, **constexprs)` compiles: {"signature", "constexprs", "divisible_by_16"},
    JSON-ready (a Triton dtype as its short name), following Triton's specialization of launch arguments."""
    names = list(fn.arg_names)
    values = dict(zip(names, args, strict=False))  # the rest come as constexprs
    values.update(constexprs)
    signature: dict[str, str] = {}
    consts: dict[str, Any] = {}
    divisible: list[str] = []
    for name, param in zip(names, fn.params, strict=True):
        v = values[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            consts[name] = str(v) if _is_tl_dtype(v) else v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + DTYPE_NAMES[v.dtype]
            if v.data_ptr() % 16 == 0:
                divisible.append(name)
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                signature[name], consts[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    divisible.append(name)
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialize argument {name} of type {type(v).__name__}")
    return {"signature": signature, "constexprs": consts, "divisible_by_16": divisible,
            "options": dict(options)}


def _is_tl_dtype(v: Any) -> bool:
    import triton.language as tl

    return isinstance(v, tl.dtype)


def resolve(kernel: str) -> Any:
    module, _, name = kernel.partition(":")
    return getattr(importlib.import_module(module), name)


def cache_key(spec: dict[str, Any], arch: Arch) -> str:
    import triton

    fn = resolve(spec["kernel"])
    blob = json.dumps({"v": HARNESS_VERSION, "src": fn.cache_key, "triton": triton.__version__, "arch": arch.name,
                       **{k: spec[k] for k in ("kernel", "signature", "constexprs", "divisible_by_16", "options")}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_dir() -> Path:
    """$LLAMA_FT_CACHE/kernels, else ~/.cache/llama-ft/kernels: the root the data cache uses too (not imported
    from llama_ft.data, whose package pulls in the data pipeline; the GPU proof runs this before its wheels)."""
    return Path(os.environ.get("LLAMA_FT_CACHE") or Path.home() / ".cache" / "llama-ft") / "kernels"


def _ptxas_numbers(log: str, name: str) -> tuple[int, int] | None:
    """(registers, spill store bytes) of kernel `name` from a ptxas -v log."""
    part = log[log.find(f"for '{name}'"):] if f"for '{name}'" in log else log
    spill = re.search(r"(\d+) bytes spill stores", part)
    regs = re.search(r"Used (\d+) registers", part)
    if not (spill and regs):
        return None
    return int(regs.group(1)), int(spill.group(1))


def _ptxas_rerun(ptx: str, cap: int) -> str:
    """ptxas -v on the PTX with the flags Triton passes, for a Triton without the knob that prints its log."""
    from triton.backends.nvidia import compiler as nv

    try:  # get_ptxas(arch) in triton 3.4+ (an NvidiaTool, or (path, version) before knobs); get_ptxas() earlier
        tool = nv.get_ptxas(cap)
    except TypeError:
        tool = nv.get_ptxas()
    tool = tool.path if hasattr(tool, "path") else tool[0]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([tool, "-lineinfo", "-v", f"--gpu-name={nv.sm_arch_from_capability(cap)}", str(src),
                              "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True, timeout=600)
    return run.stderr + run.stdout


def _one_line(e: BaseException) -> str:
    """The line of a compile error that says what is wrong (Triton's messages end with it, after the source)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith(("^", "~")) and not re.match(r"^\d+\s*\|", ln):
            return f"{type(e).__name__}: {ln}"[:400]
    return type(e).__name__


def compile_spec(spec: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """Compile one row's kernel for `arch`: {"ok", "error", "registers", "spill_stores", "shared", "seconds"}."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = resolve(spec["kernel"])
    consts = {k: tl.dtype(v) if isinstance(v, str) else v for k, v in spec["constexprs"].items()}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec["divisible_by_16"]}
    cap = arch.capability[0] * 10 + arch.capability[1]
    knobs = getattr(triton, "knobs", None)
    nv_knobs = getattr(knobs, "nvidia", None)
    has_log = (nv_knobs is not None and hasattr(nv_knobs, "dump_ptxas_log") and hasattr(nv_knobs, "scope")
               and hasattr(knobs.compilation, "always_compile"))
    out = io.StringIO()
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            if has_log:  # Triton prints ptxas -v when asked; it must run ptxas then, not read its own cache
                stack.enter_context(knobs.nvidia.scope())
                stack.enter_context(knobs.compilation.scope())
                knobs.nvidia.dump_ptxas_log = True
                knobs.compilation.always_compile = True
            stack.enter_context(contextlib.redirect_stdout(out))  # the log, or the PTX Triton prints on a failure
            k = triton.compile(ASTSource(fn, spec["signature"], consts, attrs), target=GPUTarget("cuda", cap, 32),
                               options=dict(spec["options"]))
    except Exception as e:  # noqa: BLE001 - a compile error is this row's result
        return {"ok": False, "error": _one_line(e), "registers": None, "spill_stores": None, "shared": None,
                "seconds": round(time.monotonic() - t0, 2)}
    numbers = _ptxas_numbers(out.getvalue(), fn.__name__) if has_log else None
    if numbers is None:
        numbers = _ptxas_numbers(_ptxas_rerun(k.asm["ptx"], cap), fn.__name__)
    regs, spills = numbers if numbers else (None, None)
    shared = int(k.metadata.shared)
    # a launch asking for more shared memory than the GPU has fails at the first step: a failure here too
    error = (f"OutOfResources: {shared / 1024:.0f} KB of shared memory, {arch.name} has {arch.max_shared_kb} KB"
             if shared > arch.max_shared_kb * 1024 else None)
    return {"ok": error is None, "error": error, "registers": regs, "spill_stores": spills, "shared": shared,
            "seconds": round(time.monotonic() - t0, 2)}


def cached_compile(spec: dict[str, Any], arch: Arch, use_cache: bool = True) -> dict[str, Any]:
    """compile_spec through the on-disk cache (one small JSON file per key, written atomically)."""
    path = cache_dir() / f"{cache_key(spec, arch)}.json"
    if use_cache:
        with contextlib.suppress(OSError, ValueError):
            return {**json.loads(path.read_text()), "cached": True}
    result = compile_spec(spec, arch)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)
    return {**result, "cached": False}
