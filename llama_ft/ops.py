"""Build DeepSpeed's JIT C++ ops once, one process at a time, before any rank needs them.

DeepSpeed compiles some ops on first use (on CPU ranks: `deepspeed_shm_comm` at every
distributed init, `cpu_adam` for optimizer offload), through torch's cpp_extension. torch
guards each build folder with a `lock` file that a waiting process polls *forever*; a build
killed half-way (a timeout, Ctrl-C, an OOM kill) leaves that file behind and every later run
hangs silently at start-up. Every rank calls `prepare_ops` before it starts distributed work:

- an OS file lock (`flock`, released by the kernel when its holder dies) serialises the ranks
  of all llama-ft jobs sharing the extensions folder, so exactly one process compiles and the
  others then find the op built;
- holding it, a torch `lock` file is a dead build's when it is older than `STALE_AFTER_S`, or
  older than `IDLE_AFTER_S` while no process works in the build folder (torch runs ninja and the
  compilers there); it is removed with a warning. A live compile of these ops takes about a
  minute; its lock is waited for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from llama_ft.fsutil import exclusive_lock

log = logging.getLogger(__name__)

STALE_AFTER_S = 600.0
IDLE_AFTER_S = 30.0


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


def _someone_builds_in(build_dir: Path) -> bool:
    """True if a process on this machine works in `build_dir` (torch runs ninja and the compilers there)."""
    target = str(build_dir.resolve())
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if os.readlink(cwd) == target:
                return True
        except OSError:  # gone, or not ours to read
            continue
    return False


def clear_stale_lock(build_dir: Path, stale_after_s: float = STALE_AFTER_S, poll_s: float = 1.0,
                     idle_after_s: float = IDLE_AFTER_S) -> bool:
    """Wait for a live build's `lock` to go; remove a dead one. True if removed.

    Dead: older than `stale_after_s`, or older than `idle_after_s` with no process working in the
    build folder (a compile killed moments ago need not cost `stale_after_s` of waiting).
    """
    lock = build_dir / "lock"
    warned = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= stale_after_s or (age >= idle_after_s and not _someone_builds_in(build_dir)):
            log.warning("removing stale build lock %s (%.0f s old, no build running: a killed compile left it)",
                        lock, age)
            lock.unlink(missing_ok=True)
            return True
        if not warned:
            log.warning("waiting for a build of %s in progress (lock %s, %.0f s old)", build_dir.name, lock, age)
            warned = True
        time.sleep(poll_s)


def prefer_this_pythons_tools() -> None:
    """Put this interpreter's bin/ first on PATH when it has a `ninja`.

    torch builds ops with the first `ninja` on PATH, and rebuilds an op (about 35 s for shm_comm) whenever
    the ninja that wrote its build files changes. A venv's pip-installed ninja and the system's differ in
    version, so runs started with and without the venv on PATH would rebuild each other's ops forever.
    """
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(bindir) / "ninja").exists() and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def prepare_ops(ds_config: dict, on_gpu: bool) -> None:
    """Compile (or just load) the ops this run needs, serialised across processes."""
    from deepspeed.accelerator import get_accelerator

    prefer_this_pythons_tools()

    names = needed_builders(ds_config, on_gpu)
    builders = [b for b in (get_accelerator().create_op_builder(n) for n in names) if b is not None]
    builders = [b for b in builders if b.is_compatible(verbose=False)]
    if not builders:
        return
    with exclusive_lock(_build_dir(builders[0].name).parent / ".llama-ft-build.lock"):
        for b in builders:
            clear_stale_lock(_build_dir(b.name))
            t0 = time.time()
            b.load(verbose=False)
            log.debug("op %s ready in %.1f s", b.name, time.time() - t0)


SHM_BUFFER_PREFIX = "/dev/shm/deepspeed_allreduce_buffer_"


def unlink_shm_buffer(rank: int) -> list[str]:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer; the paths removed.

    DeepSpeed's shm_comm creates one 64 MiB POSIX shared-memory file per rank in init_distributed
    (deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK) and never unlinks it, so every CPU job, finished or
    killed, left 2 x 64 MiB of tmpfs (RAM) behind. Call once every rank of this host has mapped it (after a
    host barrier that follows init_distributed): the mappings stay valid, and the memory goes with the last
    process that maps it, however it ends."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    mapped = {line.split()[-1] for line in maps.splitlines() if SHM_BUFFER_PREFIX in line}
    removed = []
    for path in sorted(p for p in mapped if p.startswith(SHM_BUFFER_PREFIX) and p.endswith(f"_{rank}")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed
