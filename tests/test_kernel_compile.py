"""`llama-ft kernels --compile`: every Triton kernel compiles for every GPU generation we support, without a GPU.

The CI test compiles the default configurations (training shapes, r 16 and 64, both FP8 modes, the quantize
kernels) for each architecture: about 60 compiles, a minute on 2 cores the first time, seconds from the cache
($LLAMA_FT_CACHE/kernels, keyed by kernel source, Triton version, architecture and configuration). The full
sweep (every dtype, rank bucket and autotune configuration) is the command itself; docs/fp8.md has its table.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama_ft.gpus import ARCHS
from llama_ft.kernelcheck import command

REPO = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"kernel", "signature", "constexprs", "options", "arch", "ok", "error", "registers", "spill_stores",
              "shared", "mode", "default"}


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The command in a process of its own, without the interpreter (kernels defined under TRITON_INTERPRET=1
    cannot be compiled; the command would re-run itself without it anyway)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "llama_ft.cli", "kernels", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def default_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("kernels") / "defaults.json"
    ran = _run("--compile", "all", "--defaults", "--jobs", "2", "--json", str(out))
    assert out.exists(), ran.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    bad = [f"{r['kernel']} {r['mode']} {r['launch']} {r['tiles']} {r['arch']}: {r['error']}"
           for r in rows if not r["ok"]]
    assert not bad and ran.returncode == 0, "\n".join(bad) or ran.stderr[-2000:]
    return rows


def test_default_configurations_compile_on_every_supported_arch(default_rows):
    assert {r["arch"] for r in default_rows} == set(ARCHS)
    for row in default_rows:
        assert ROW_FIELDS <= set(row), sorted(ROW_FIELDS - set(row))
        assert row["default"] and row["ok"] and row["error"] is None
        assert isinstance(row["registers"], int) and 0 < row["registers"] <= 255
        assert row["signature"]["q_ptr" if "q_ptr" in row["signature"] else "a_ptr"].startswith("*")
    for arch in ARCHS.values():
        rows = [r for r in default_rows if r["arch"] == arch.name]
        modes = {"weight-only", "fp8-compute", "nf4"} if arch.capability >= (8, 9) else {"weight-only", "nf4"}
        for kernel in ("_fwd_kernel", "_dx_kernel"):
            for mode in modes:
                got = {r["constexprs"]["BLOCK_R"] for r in rows if r["kernel"].endswith(kernel) and r["mode"] == mode}
                assert got == {16, 64}, (arch.name, kernel, mode, got)
        if arch.capability < (8, 9):  # no e4m3 type in Triton there: the integer decode, and no fp8 compute
            assert all(r["constexprs"].get("INT_DECODE") is not False for r in rows)


def test_default_tiles_do_not_spill_and_pipeline(default_rows):
    """Issue 25: zero spill stores for the default tiles (weight-only on every architecture, fp8 compute too as
    measured), and a K loop pipelined through shared memory (num_stages - 1 buffers of its tiles at least)."""
    spilling = [f"{r['kernel']} {r['mode']} {r['launch']} {r['arch']}: {r['spill_stores']} B" for r in default_rows
                if r["spill_stores"] != 0]
    assert not spilling, spilling
    for r in default_rows:
        if not r["kernel"].endswith(("_fwd_kernel", "_dx_kernel")):
            continue
        c = r["constexprs"]
        x_bytes = 1 if r["mode"] == "fp8-compute" else 2  # e4m3 activations, else bf16
        w_bytes = 0.5 if r["mode"] == "nf4" else 1  # two NF4 codes a byte, else one e4m3 byte an element
        fwd = r["kernel"].endswith("_fwd_kernel")
        # per stage: the activation tile (BLOCK_M x contraction) and the weight tile's bytes
        red, other = (c["BLOCK_K"], c["BLOCK_N"]) if fwd else (c["BLOCK_N"], c["BLOCK_K"])
        stage = c["BLOCK_M"] * red * x_bytes + red * other * w_bytes
        assert r["shared"] >= (r["options"]["num_stages"] - 1) * stage, (r["kernel"], r["arch"], r["shared"], stage)


def test_every_triton_kernel_goes_through_the_check(default_rows):
    """A `@triton.jit def _..._kernel` anywhere in llama_ft (the 4-bit base's kernels, later) must be launched by a
    registered family (llama_ft/kernelcheck/registry.py)."""
    defined = set()
    for path in (REPO / "llama_ft").rglob("*.py"):
        text = path.read_text()
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for name in re.findall(r"@triton\.jit[^\n]*\n\s*def (_\w+_kernel)\(", text):
            defined.add(f"{module}:{name}")
    assert defined, "no kernels found: the pattern is stale"
    checked = {r["kernel"] for r in default_rows}
    assert defined <= checked, sorted(defined - checked)


def test_rows_reproduce_their_compile_and_are_cached(default_rows, tmp_path):
    """A second run reads every row from the cache; and one row rebuilt from its JSON alone compiles to the same
    registers (what the docstring of kernelcheck/compile.py promises)."""
    out = tmp_path / "again.json"
    ran = _run("--compile", "sm_90", "--defaults", "--jobs", "2", "--json", str(out), timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["cached"] for r in rows)
    row = next(r for r in rows if r["kernel"].endswith("_fwd_kernel") and r["mode"] == "weight-only")
    script = (
        "import importlib, json, sys, warnings; warnings.simplefilter('ignore')\n"
        "import triton, triton.language as tl\n"
        "from triton.backends.compiler import GPUTarget\nfrom triton.compiler import ASTSource\n"
        "row = json.loads(sys.argv[1]); module, name = row['kernel'].split(':')\n"
        "fn = getattr(importlib.import_module(module), name)\n"
        "attrs = {(fn.arg_names.index(a),): [['tt.divisibility', 16]] for a in row['divisible_by_16']}\n"
        "consts = {k: tl.dtype(v) if isinstance(v, str) else v for k, v in row['constexprs'].items()}\n"
        "k = triton.compile(ASTSource(fn, row['signature'], consts, attrs), target=GPUTarget('cuda', 90, 32),"
        " options=row['options'])\n"
        "print(k.metadata.shared)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    again = subprocess.run([sys.executable, "-c", script, json.dumps(row)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert int(again.stdout.split()[-1]) == row["shared"]


def test_specialization_is_the_one_a_launch_makes():
    """compile.specialize against Triton's own launch binder (its internals in triton 3.9: skipped elsewhere), for
    the default forward and dx launches of both families (FP8, NF4): the same types, constants and divisibility."""
    script = r"""
import warnings; warnings.simplefilter("ignore")
import torch
from triton.compiler import make_backend
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import create_function_from_signature
from llama_ft.fp8 import launches
from llama_ft.nf4 import launches as nf4_launches
from llama_ft.kernelcheck.compile import specialize
backend = make_backend(GPUTarget("cuda", 90, 32))
for cl in [*launches.check_launches((9, 0), defaults_only=True), *nf4_launches.check_launches((9, 0), True)]:
    ln, cfg = cl.launch, cl.launch.configs[0]
    fn = ln.kernel
    # the binder reads data_ptr(): meta tensors (0) stand for aligned CUDA tensors; CPU tensors of the same dtype
    args = tuple(torch.empty(1, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in ln.args)
    kw = {**ln.constexprs, **cfg.kwargs}
    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kw)
    _, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    ours = specialize(fn, ln.args, kw, {})
    assert ours["signature"] == signature, (fn.__name__, ours["signature"], signature)
    theirs_div = sorted(fn.arg_names[p[0]] for p, v in attrs.items() if ["tt.divisibility", 16] in v)
    assert sorted(ours["divisible_by_16"]) == theirs_div, (fn.__name__, ours["divisible_by_16"], theirs_div)
    names = {fn.arg_names[p[0]]: v for p, v in constexprs.items()}
    assert {k: str(v) if not isinstance(v, (bool, int)) else v for k, v in names.items()} == ours["constexprs"]
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if "create_function_from_signature" in ran.stderr and "ImportError" in ran.stderr:
        pytest.skip("this Triton's launch binder differs (checked against triton 3.9)")
    assert ran.returncode == 0 and ran.stdout.strip().endswith("ok"), ran.stderr[-3000:]


@pytest.mark.parametrize("arg,needle", [
    ("sm_75", "no bf16 tensor cores below sm_80"),
    ("sm_70,sm_90", "no bf16 tensor cores below sm_80"),
    ("sm_7x", "no bf16 tensor cores below sm_80"),
    ("a100", "unknown architecture"),
    ("sm_91", "unknown architecture"),
    ("", "unknown architecture"),
])
def test_bad_architecture_is_one_line(capsys, arg, needle):
    with pytest.raises(SystemExit) as e:
        command.main(["--compile", arg])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llama-ft kernels: error: ") and needle in err[0], err
    assert all(name in err[0] for name in ARCHS)


def test_triton_too_old_is_one_line(capsys, monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "3.1.0")
    with pytest.raises(SystemExit) as e:
        command.main(["--compile", "sm_90"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "triton 3.1.0 found" in err[0] and "needs triton >= 3.3" in err[0], err


def test_triton_missing_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    with pytest.raises(SystemExit) as e:
        command.main(["--compile", "sm_80"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "triton is not installed" in err[0] and ">= 3.3" in err[0]
