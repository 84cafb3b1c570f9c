"""Atomic, durable outputs: write under a temporary sibling name, fsync, rename when complete.

A crash, a kill -9, a full disk or a user error never leaves a half-written directory or file behind
under the final name, and a completed one survives a power cut: every file is fsynced before the
rename and the parent directory after it. An existing directory is replaced by an atomic exchange
(renameat2 RENAME_EXCHANGE on Linux), so its name never points at nothing; the old copy is removed
only after the new one is in place.

A full disk (ENOSPC, EDQUOT, also when safetensors' Rust writer reports it) becomes one UserError line
naming the path, the free space and, where known, the bytes needed (`disk_full_is_user_error`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llama_ft.errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False  # a filesystem without exchange (some network filesystems): two renames instead
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(new: Path, final: Path) -> None:
    """Put directory `new` under the name `final`, durably; an existing `final` is exchanged with `new`
    atomically and then removed (never before the new one is in place)."""
    if final.exists():
        if _exchange(new, final):
            fsync_path(final.parent)
            shutil.rmtree(new, ignore_errors=True)  # `new` now names the old copy
            return
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(new, final)
        fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(new, final)  # ENOTEMPTY if another process created `final` meanwhile
    fsync_path(final.parent)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; on success its files are fsynced and it
    replaces `final` (replace_dir). With `overwrite`, an existing `final` is replaced, else refused."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists() and not overwrite:
            raise FileExistsError(errno.EEXIST, "exists", str(final))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as text from a writer that wraps it (safetensors' Rust I/O)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122"))


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


def disk_full_message(path: str | os.PathLike, needed: int | None = None) -> str:
    free = _free_bytes(Path(path))
    have = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    need = f", about {needed / 2**20:.1f} MiB needed" if needed else ""
    return f"{path}: disk full ({have}{need}); nothing was written under the final name"


@contextlib.contextmanager
def disk_full_is_user_error(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into one UserError line naming `path` (disk_full_message)."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise UserError(disk_full_message(path, needed)) from None
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yield a file open on a temporary sibling of `path`; when the block ends cleanly it is flushed,
    fsynced and renamed to `path`. On any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic rename."""
    with atomic_write(path) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an OS file lock (`flock`) on `path`: one process at a time, released by the kernel if it dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_within(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """True when `child` is `parent` or lies inside it (after resolving symlinks)."""
    c, p = Path(child).resolve(), Path(parent).resolve()
    return c == p or p in c.parents
