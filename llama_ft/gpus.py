"""GPU generations llama-ft supports, the GPU kinds `llama-ft plan --gpu` knows, and the FP8 mode each runs.

Standard library only: `llama-ft plan` (no torch import) and the kernels' dispatch both read it.

    architecture   compute capability   FP8 frozen base (--quantize)
    sm_80, sm_86   8.0, 8.6             weight-only: e4m3 bytes decoded to bf16 with integer operations in the
                                        kernel (Ampere has no fp8 type), bf16 tensor cores; no --fp8_compute
    sm_89          8.9                  weight-only (hardware e4m3 -> bf16 conversion) or --fp8_compute
    sm_90          9.0                  the same, on wgmma
    sm_100, sm_120 10.0, 12.0           the same
Below 8.0 (V100 sm_70, T4 sm_75) there are no bf16 tensor cores: not supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llama_ft.errors import UserError

FP8_TENSOR_CORES = (8, 9)
"""The first compute capability with fp8 (e4m3) tensor cores and the hardware e4m3 conversion (Ada)."""
MIN_CAPABILITY = (8, 0)
"""bf16 tensor cores: Ampere and later."""


@dataclass(frozen=True)
class Arch:
    name: str                       # sm_90
    capability: tuple[int, int]     # (9, 0)
    gpus: str                       # the GPUs of this architecture people train on
    max_shared_kb: int              # shared memory one program may use (the opt-in maximum per block)


ARCHS = {a.name: a for a in (
    Arch("sm_80", (8, 0), "A100, A800", 163),
    Arch("sm_86", (8, 6), "A6000, A40, A10, RTX 3090", 99),
    Arch("sm_89", (8, 9), "L40S, L40, L4, RTX 4090, RTX 6000 Ada", 99),
    Arch("sm_90", (9, 0), "H100, H200, H800, GH200", 227),
    Arch("sm_100", (10, 0), "B200, GB200", 227),
    Arch("sm_120", (12, 0), "RTX 5090, RTX PRO 6000 Blackwell", 99),
)}
"""Every architecture the kernels are compiled and checked for (`llama-ft kernels --compile`)."""


@dataclass(frozen=True)
class GpuKind:
    name: str                   # a100-80gb
    label: str                  # A100 80GB
    capability: tuple[int, int]
    memory_gib: float           # total memory as nvidia-smi reports it (MiB / 1024)


GPU_KINDS = {g.name: g for g in (
    GpuKind("a100-40gb", "A100 40GB", (8, 0), 40.0),
    GpuKind("a100-80gb", "A100 80GB", (8, 0), 80.0),
    GpuKind("a6000", "RTX A6000", (8, 6), 48.0),
    GpuKind("a10", "A10", (8, 6), 22.5),
    GpuKind("rtx3090", "RTX 3090", (8, 6), 24.0),
    GpuKind("l4", "L4", (8, 9), 22.5),
    GpuKind("l40s", "L40S", (8, 9), 45.0),
    GpuKind("rtx4090", "RTX 4090", (8, 9), 24.0),
    GpuKind("h100", "H100 80GB", (9, 0), 79.6),
    GpuKind("h200", "H200", (9, 0), 140.4),
    GpuKind("b200", "B200", (10, 0), 179.1),
    GpuKind("rtx5090", "RTX 5090", (12, 0), 31.8),
)}
"""`llama-ft plan --gpu NAME`: the compute capability and memory of common GPUs (--gpu_memory_gb overrides)."""


def capability_text(cap: tuple[int, int]) -> str:
    return f"{cap[0]}.{cap[1]}"


def arch_of(cap: tuple[int, int]) -> str:
    return f"sm_{cap[0]}{cap[1]}"


def has_fp8_tensor_cores(cap: tuple[int, int]) -> bool:
    return tuple(cap) >= FP8_TENSOR_CORES


def int_decode(cap: tuple[int, int]) -> bool:
    """Whether the kernels decode e4m3 bytes with integer operations: Triton has no e4m3 type below 8.9."""
    return not has_fp8_tensor_cores(cap)


def _weight_only_how(cap: tuple[int, int] | None) -> str:
    if cap is None:
        return "e4m3 weights widened to bf16 in the kernel, bf16 tensor cores"
    decode = "decoded with integer operations" if int_decode(cap) else "converted by the hardware"
    return f"e4m3 weights {decode} to bf16 in the kernel, bf16 tensor cores"


def fp8_mode(cap: tuple[int, int] | None, fp8_compute: bool) -> str:
    """The FP8 mode `--quantize [--fp8_compute]` runs on a GPU of capability `cap` (None: not known yet)."""
    if fp8_compute and cap is None:
        return "fp8 compute (needs compute capability 8.9+, checked at launch)"
    if fp8_compute and has_fp8_tensor_cores(cap):
        return "fp8 compute (activations rounded to e4m3 per 1x128 tile, fp8 tensor cores)"
    return f"weight-only ({_weight_only_how(cap)})"


def fp8_compute_refusal(gpu: str, cap: tuple[int, int]) -> str | None:
    """The one line that refuses --fp8_compute on a GPU without FP8 tensor cores, else None."""
    if has_fp8_tensor_cores(cap):
        return None
    return (f"--fp8_compute: {gpu} (compute capability {capability_text(cap)}) has no FP8 tensor cores (8.9+: "
            f"L40S, RTX 4090, H100, B200); drop --fp8_compute: --quantize alone runs weight-only FP8 on it "
            f"({_weight_only_how(cap)})")


def parse_archs(text: str) -> list[Arch]:
    """'sm_80,sm_90' (or 'all') -> the architectures; an unknown or unsupported name is one UserError line."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(ARCHS.values())
    supported = ", ".join(ARCHS)
    out = []
    for name in names or [text]:
        arch = ARCHS.get(name.lower())
        if arch is None:
            if re.fullmatch(r"sm_?[1-7][0-9x]a?", name.lower()):  # sm_70, sm_75, sm_7x: Volta and Turing
                raise UserError(f"--compile {name}: no bf16 tensor cores below sm_80 (V100, T4); supported: "
                                f"{supported} (or all)")
            raise UserError(f"--compile {name}: unknown architecture; supported: {supported} (or all)")
        out.append(arch)
    return out


def parse_gpu(text: str) -> tuple[str, tuple[int, int], float | None]:
    """--gpu a100-80gb | h100 | ... | 8.0 | sm_80 -> (label, capability, memory GiB or None)."""
    key = text.strip().lower()
    if key in GPU_KINDS:
        g = GPU_KINDS[key]
        return g.label, g.capability, g.memory_gib
    m = re.fullmatch(r"(?:sm_?)?(\d{1,2})\.?(\d)", key)
    if m:
        cap = (int(m.group(1)), int(m.group(2)))
        if cap < MIN_CAPABILITY:
            raise UserError(f"--gpu {text}: compute capability {capability_text(cap)} has no bf16 tensor cores "
                            "(8.0+ is supported)")
        return f"a GPU of compute capability {capability_text(cap)}", cap, None
    raise UserError(f"--gpu {text}: unknown GPU; expected one of {', '.join(GPU_KINDS)} or a compute capability "
                    "such as 8.0")
