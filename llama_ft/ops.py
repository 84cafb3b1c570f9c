"""Build DeepSpeed's JIT C++ ops once, one process at a time, before any rank needs them.

DeepSpeed compiles some ops on first use (on CPU ranks: `deepspeed_shm_comm` at every
distributed init, `cpu_adam` for optimizer offload), through torch's cpp_extension. torch
guards each build folder with a `lock` file that a waiting process polls *forever*; a build
killed half-way (a timeout, Ctrl-C, an OOM kill) leaves that file behind and every later run
hangs silently at start-up. Every rank calls `prepare_ops` before it starts distributed work:

- an OS file lock (`flock`, released by the kernel when its holder dies) serialises the ranks
  of all llama-ft jobs sharing the extensions folder, so exactly one process compiles and the
  others then find the op built;
- holding it, a torch `lock` file older than `STALE_AFTER_S` is a dead build's, and is removed
  with a warning (a live compile of these ops takes about a minute; younger locks are waited for).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_S = 600.0


def needed_builders(ds_config: dict, on_gpu: bool) -> list[str]:
    """Names of the DeepSpeed op builders a run with `ds_config` compiles at start-up."""
    names = [] if on_gpu else ["ShareMemCommBuilder"]
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        names.append("CPUAdamBuilder")
    return names


def _build_dir(op_name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op_name, verbose=False))


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def clear_stale_lock(build_dir: Path, stale_after_s: float = STALE_AFTER_S, poll_s: float = 1.0) -> bool:
    """Wait for a live build's `lock` to go; remove one older than `stale_after_s`. True if removed."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= stale_after_s:
            log.warning("removing stale build lock %s (%.0f s old: a killed compile left it)", lock, age)
            lock.unlink(missing_ok=True)
            return True
        time.sleep(poll_s)


def prepare_ops(ds_config: dict, on_gpu: bool) -> None:
    """Compile (or just load) the ops this run needs, serialised across processes."""
    from deepspeed.accelerator import get_accelerator

    names = needed_builders(ds_config, on_gpu)
    builders = [b for b in (get_accelerator().create_op_builder(n) for n in names) if b is not None]
    builders = [b for b in builders if b.is_compatible(verbose=False)]
    if not builders:
        return
    with _exclusive(_build_dir(builders[0].name).parent / ".llama-ft-build.lock"):
        for b in builders:
            clear_stale_lock(_build_dir(b.name))
            t0 = time.time()
            b.load(verbose=False)
            log.debug("op %s ready in %.1f s", b.name, time.time() - t0)
