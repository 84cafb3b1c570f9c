"""Atomic, durable outputs: write under a temporary sibling name, fsync, rename when complete.

A crash, a kill -9, a full disk or a user error never leaves a half-written directory or file behind
under the final name, and a completed one survives a power cut: every file is fsynced before the
rename and the parent directory after it. An existing directory is replaced by an atomic exchange
(renameat2 RENAME_EXCHANGE on Linux), so its name never points at nothing; the old copy is removed
only after the new one is in place.

A full disk (ENOSPC, EDQUOT, also when safetensors' Rust writer reports it) becomes one UserError line
naming the path, the free space and, where known, the bytes needed (`disk_full_is_user_error`).

A temporary directory is named `.NAME.tmp-<host>-<pid>-XXXXXXXX` (host: a hash of the host name) and its
owner holds an flock on it, so a run killed with -9 can be told from one still writing: the next
atomic_dir for the same NAME removes the temporaries of this host whose process is gone and whose lock
is free (`remove_stale_temps`), and never touches another host's (shared filesystems) or a live one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llama_ft.errors import UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain open() would (0666 minus the umask): temporary files are made
    0600, and a checkpoint or adapters that only their writer can read would surprise a server of them."""
    os.chmod(path, 0o666 & ~_umask())


def default_modes(root: str | os.PathLike) -> None:
    """default_mode for every file under `root`, and 0777 minus the umask for the folders: mkdtemp makes
    the folder 0700 and safetensors writes 0600, which would keep a shared output from its readers."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


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


def _host_tag() -> str:
    """8 hex digits naming this host: a pid means something only on the host (kernel) that issued it."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_dir_prefix(final: str | os.PathLike) -> str:
    """The name prefix of this process's atomic_dir temporaries for `final`; mkdtemp adds 8 random characters."""
    return f".{Path(final).name}.tmp-{_host_tag()}-{os.getpid()}-"


def _stale_pattern(final: Path) -> re.Pattern[str]:
    # exactly what temp_dir_prefix + tempfile.mkdtemp produce (its random part: 8 of [a-z0-9_])
    return re.compile(rf"\.{re.escape(final.name)}\.tmp-(?P<host>[0-9a-f]{{8}})-(?P<pid>[1-9][0-9]*)-[a-z0-9_]{{8}}")


def _pid_alive(pid: int) -> bool:
    """Does process `pid` exist on this host? Anything but a clear "no such process" counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _lock_dir(path: str | os.PathLike) -> int | None:
    """Open `path` and take a non-blocking exclusive flock on it; the fd (close it to unlock), or None when
    the lock is held by someone else. Raises OSError where the filesystem has no flock (some NFS setups)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Remove the atomic_dir temporaries of `final` that a killed run left behind; return what was removed.

    Only siblings named exactly `.NAME.tmp-<host>-<pid>-XXXXXXXX` with this host's tag, whose pid is not
    a live process and whose flock is free (the kernel drops it when its owner dies; this also covers a
    pid namespace that shares the host name). Never raises: a leftover costs disk space, not correctness.
    """
    final = Path(final)
    pattern, host = _stale_pattern(final), _host_tag()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = _lock_dir(entry.path)
            except OSError:
                fd = -1  # no flock here: the host and the dead pid decide
            if fd is None:
                continue  # its owner (another pid namespace) is alive and holds the lock
            try:
                shutil.rmtree(entry.path)
            finally:
                if fd >= 0:
                    os.close(fd)
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def check_free_space(path: str | os.PathLike, needed: int) -> None:
    """UserError when fewer than `needed` bytes are free where `path` will be written (checked before a
    long write, so a full disk fails in a second instead of after minutes of work)."""
    free = _free_bytes(Path(path))
    if free is not None and free < needed:
        raise UserError(f"{path}: not enough free disk space: about {needed / 2**20:.1f} MiB needed, "
                        f"{free / 2**20:.1f} MiB free; nothing was written")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `final`; on success its files are fsynced and it
    replaces `final` (replace_dir). With `overwrite`, an existing `final` is replaced, else refused.

    On entry, temporaries of `final` left by killed runs are removed (remove_stale_temps); with `needed`
    (bytes), a UserError is raised first if that much space is not free (an existing `final` stays until
    the new copy is complete, so the whole of it must fit)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    if needed is not None:
        check_free_space(final, needed)
    tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(final), dir=final.parent))
    lock: int | None = None
    try:
        with contextlib.suppress(OSError):
            lock = _lock_dir(tmp)  # held until we are done: tells remove_stale_temps its owner is alive
        yield tmp
        default_modes(tmp)
        fsync_tree(tmp)
        if final.exists() and not overwrite:
            raise FileExistsError(errno.EEXIST, "exists", str(final))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


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
        default_mode(tmp)
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
