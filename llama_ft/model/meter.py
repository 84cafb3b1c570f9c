"""What building the model costs a rank: peak memory per phase and the bytes its collectives moved.

Memory:
  - CPU ranks: the process's peak RSS (VmHWM). It is reset at the start of the build by writing 5
    to /proc/self/clear_refs (Linux >= 4.0), so the figure is the build's own peak, not the data
    preparation's before it; where that is refused, getrusage's ru_maxrss (peak since start).
  - GPU ranks: torch.cuda.max_memory_allocated, reset at the start of the build.
Communication: every torch.distributed collective issued during the build (DeepSpeed's included:
deepspeed.comm calls torch.distributed.*) adds the bytes of its tensor(s) on this rank.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_COLLECTIVES = ("broadcast", "all_reduce", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
                "all_gather", "reduce", "scatter", "gather")


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset (VmHWM), else since the process started (ru_maxrss)."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


@dataclass
class BuildMeter:
    """Phases of the build, each with its seconds, RSS at its end and the peak so far (and on a GPU
    the allocated peak so far), plus the collective bytes of the whole build."""

    phases: list[dict] = field(default_factory=list)
    comm_bytes: int = 0
    comm_calls: int = 0
    peak_reset: bool = False

    @contextlib.contextmanager
    def measure(self) -> Iterator[BuildMeter]:
        self.peak_reset = reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

        def counting(name, fn):
            def wrapper(*args, **kwargs):
                tensor = args[0] if args else kwargs.get("tensor", kwargs.get("output_tensor"))
                if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base"):
                    tensor = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("tensor"))
                self.comm_bytes += _nbytes(tensor)
                self.comm_calls += 1
                return fn(*args, **kwargs)
            return wrapper

        for name, fn in originals.items():
            setattr(dist, name, counting(name, fn))
        self._t = time.perf_counter()
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def phase(self, name: str) -> None:
        """Close the phase that ran since the last call (or since `measure` began)."""
        now = time.perf_counter()
        row = {"phase": name, "seconds": round(now - self._t, 3), "rss_bytes": rss_bytes(),
               "peak_rss_bytes": peak_rss_bytes()}
        if torch.cuda.is_available():
            row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        self.phases.append(row)
        self._t = now

    def summary(self) -> dict:
        out = {"phases": self.phases, "peak_rss_bytes": max((p["peak_rss_bytes"] for p in self.phases), default=0),
               "peak_is_build_only": self.peak_reset, "comm_bytes": self.comm_bytes, "comm_calls": self.comm_calls}
        if torch.cuda.is_available():
            out["max_memory_allocated"] = max(p["max_memory_allocated"] for p in self.phases)
        return out
