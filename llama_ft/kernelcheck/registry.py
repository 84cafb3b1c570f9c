"""Which kernels the compile check covers: each family's function that lists its dispatcher's launches.

A family of Triton kernels (FP8, the 4-bit NF4 base) has one entry here: a function
`check_launches(capability, defaults_only) -> list[CheckLaunch]` (see llama_ft/fp8/launches.py). The CI test
also fails when a `@triton.jit` kernel of llama_ft (a function named `_..._kernel`) is launched by no entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llama_ft.fp8 import launches as fp8_launches
from llama_ft.gpus import Arch
from llama_ft.nf4 import launches as nf4_launches

FAMILIES: dict[str, Callable[..., list[Any]]] = {
    "fp8": fp8_launches.check_launches,
    "nf4": nf4_launches.check_launches,
}


def _tiles_label(cfg: Any) -> str:
    kw = dict(cfg.kwargs)
    dims = " ".join(f"{k.removeprefix('BLOCK_')}{kw.pop(k)}" for k in list(kw) if k.startswith("BLOCK_"))
    rest = " ".join(f"{k.lower()}{v}" for k, v in kw.items())
    return " ".join(filter(None, [dims, rest, f"w{cfg.num_warps}", f"s{cfg.num_stages}"]))


def specs(arch: Arch, defaults_only: bool = False) -> list[dict[str, Any]]:
    """One row (without results) per family, launch and tile configuration for `arch`; defaults_only: the
    configurations the dispatchers use for training (the first tiles of the training launches)."""
    from llama_ft.kernelcheck.compile import specialize

    rows = []
    for family, launches in FAMILIES.items():
        for cl in launches(arch.capability, defaults_only):
            ln = cl.launch
            fn = ln.kernel
            name = f"{fn.fn.__module__}:{fn.fn.__name__}"  # fn is a JITFunction; fn.fn the Python function
            for i, cfg in enumerate(ln.configs):
                default = cl.training and i == 0
                if defaults_only and not default:
                    continue
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                spec = specialize(fn, ln.args, {**ln.constexprs, **cfg.kwargs}, options)
                rows.append({"family": family, "kernel": name, "mode": ln.mode,
                             "launch": cl.label, "tiles": _tiles_label(cfg), "arch": arch.name,
                             "default": default, **spec})
    return rows
