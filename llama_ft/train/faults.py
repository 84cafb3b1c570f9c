"""Faults while training: preemption signals, a rank that dies, an output dir that is not shared.

- StopSignals: the first SIGTERM or SIGINT only sets a flag. The loop checks it (all-reduced, so one
  signalled rank stops them all) at the start of every optimizer step: the step in flight finishes,
  a checkpoint is saved and the run exits with 128 + the signal number. A second signal, more than
  DEDUPE_S after the first, aborts at once: launchers and schedulers fan one request out (a terminal's
  Ctrl-C reaches every rank and DeepSpeed's launcher forwards a SIGTERM right after), and that must
  not count twice.
- RankFiles / check_shared_output_dir: every rank writes OUTPUT_DIR/.llama-ft/ranks/rank{R}.json (host,
  pid) at start; rank 0 must see them all, else the output dir is not shared between nodes and the run
  stops with one line before any work (checkpoints are written by every rank into one folder).
- PeerWatch: a daemon thread that looks every POLL_S at the ranks of its own host; when one is gone
  while training runs, it prints one line naming that rank and ends this process too, instead of
  leaving it in a collective that can never complete. Ranks on other hosts are seen by their own
  host's watch; a collective with a dead remote rank fails (gloo) or times out (--dist_timeout). When it times out
  because a local peer is stopped (SIGSTOP), that peer is SIGKILLed with the job: stopped, it would take no SIGTERM.
- LauncherWatch: a daemon thread that looks every POLL_S at this rank's parent (DeepSpeed's per-node process)
  and at run-llama.sh (LLAMA_FT_LAUNCHER_PID, same host only); when either is gone it prints one line saying
  so and ends the rank. Why: run-llama.sh starts the launcher in a session of its own, and a kill -9 of the
  script (or of the launcher) runs no handler, so nothing else would stop ranks that go on training orphaned.
  A parent-death signal (prctl) would cover only the direct parent and could not say why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from llama_ft.errors import StopRun, UserError
from llama_ft.fsutil import atomic_write_json
from llama_ft.hostcomm import any_rank, from_rank0

log = logging.getLogger(__name__)

DEDUPE_S = 2.0
POLL_S = 1.0
RANKS_DIR = Path(".llama-ft") / "ranks"


class StopSignals:
    """SIGTERM / SIGINT handling for the training loop (module doc). `requested` is the first signal."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._at = 0.0

    def install(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._at = signum, now
            log.warning("%s received: finishing this step, then saving a checkpoint (again to abort at once)",
                        signal.Signals(signum).name)
            return
        if now - self._at > DEDUPE_S:
            rank = os.environ.get("RANK", "0")
            print(f"[rank {rank}] llama-ft: error: second {signal.Signals(signum).name}: aborting without saving; "
                  "the last complete checkpoint is kept", file=sys.stderr, flush=True)
            os._exit(128 + signum)


LAUNCHER_PID_ENV, LAUNCHER_HOST_ENV = "LLAMA_FT_LAUNCHER_PID", "LLAMA_FT_LAUNCHER_HOST"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after "pid (comm) " (state first, start time 20th), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _is_launcher(pid: int) -> bool:
    """Is `pid` DeepSpeed's per-node launcher or torchrun? Only then is the parent watched: a `nohup llama-ft train`
    whose shell has exited must go on."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return any(s in cmd for s in (b"deepspeed.launcher.launch", b"torch.distributed.run", b"torchrun"))


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None when it is gone or a zombie: with the pid, it
    names one process even after the pid is reused."""
    fields = _proc_stat(pid)
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]


class LauncherWatch:
    """Ends this rank when its parent or run-llama.sh is gone (module doc). start() first thing in a rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.parent = os.getppid()
        self.watched: dict[int, tuple[str, str]] = {}  # pid -> (what, start time)
        launcher = os.environ.get(LAUNCHER_PID_ENV, "")
        if launcher.isdigit() and (os.environ.get(LAUNCHER_HOST_ENV) or socket.gethostname()) == socket.gethostname():
            self._add(int(launcher), "run-llama.sh")
        if self.parent > 1 and _is_launcher(self.parent):
            self._add(self.parent, "the launcher's per-node process")
        self.last_checkpoint = lambda: None
        self._stop = threading.Event()

    def _add(self, pid: int, what: str) -> None:
        started = _start_time(pid)
        if started is not None:
            self.watched.setdefault(pid, (what, started))

    def gone(self) -> tuple[int, str] | None:
        """(pid, what) of a watched process that has ended, or None."""
        for pid, (what, started) in self.watched.items():
            if _start_time(pid) != started:
                return pid, what
        if self.parent in self.watched and os.getppid() != self.parent:  # re-parented: it ended and was reaped
            return self.parent, "the launcher's per-node process"
        return None

    def report(self, gone: tuple[int, str]) -> str:
        ckpt = self.last_checkpoint()
        kept = f"; the last complete checkpoint is {ckpt}" if ckpt else ""
        return (f"[rank {self.rank}] llama-ft: error: {gone[1]} (pid {gone[0]}) is gone (killed?): stopping rank "
                f"{self.rank}, which must not train on orphaned{kept}")

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            gone = self.gone()
            if gone is not None and not self._stop.is_set():
                try:  # stderr may be a pipe whose reader died with the launcher
                    print(self.report(gone), file=sys.stderr, flush=True)
                except (OSError, ValueError):
                    pass
                os._exit(1)

    def start(self) -> LauncherWatch:
        # only in a launched rank (LOCAL_RANK set by DeepSpeed's launcher or torchrun), not in-process callers
        if self.watched and "LOCAL_RANK" in os.environ:
            threading.Thread(target=self._run, name="llama-ft-launcher-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


def _ranks_dir(output_dir: Path) -> Path:
    return output_dir / RANKS_DIR


def read_rank_files(output_dir: Path, world: int) -> dict[int, dict]:
    out = {}
    for r in range(world):
        try:
            out[r] = json.loads((_ranks_dir(output_dir) / f"rank{r}.json").read_text())
        except (OSError, ValueError):
            continue
    return out


def register_ranks(output_dir: Path, rank: int, world: int) -> None:
    """Collective. Every rank writes OUTPUT_DIR/.llama-ft/ranks/rank{R}.json (host, pid, this run's token);
    rank 0 must see all of them with this run's token, else every rank raises the same UserError: the
    output dir is not shared between the nodes."""
    import random

    (token,) = from_rank0([random.SystemRandom().randrange(1, 2**62) if rank == 0 else 0])
    atomic_write_json(_ranks_dir(output_dir) / f"rank{rank}.json",
                      {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "token": token})
    any_rank(False)  # a barrier: every file is written
    missing: list[int] = []
    if rank == 0:
        seen = read_rank_files(output_dir, world)
        missing = [r for r in range(world) if seen.get(r, {}).get("token") != token]
    n, first = from_rank0([len(missing), missing[0] if missing else -1])
    if n:
        raise UserError(f"--output_dir {output_dir}: rank 0 does not see the files {n} rank(s) wrote there (rank "
                        f"{first} first): it is not one directory shared by every node; put it on storage all "
                        "nodes mount at the same path")


class PeerWatch:
    """Watches the other ranks of this host (module doc). start() after check_shared_output_dir;
    stop() before a normal exit."""

    def __init__(self, output_dir: Path, rank: int, world: int) -> None:
        self.output_dir, self.rank, self.world = output_dir, rank, world
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        host = socket.gethostname()
        self.peers = {r: info["pid"] for r, info in read_rank_files(output_dir, world).items()
                      if r != rank and info.get("host") == host}
        self.last_checkpoint = lambda: None

    def dead_peer(self) -> tuple[int, int] | None:
        """(rank, pid) of a local peer that is gone, if any."""
        for r, pid in self.peers.items():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return r, pid
            except PermissionError:  # alive, another user's
                continue
        return None

    def stopped_peers(self) -> list[tuple[int, int]]:
        """(rank, pid) of the local peers that are stopped (SIGSTOP, a debugger): alive, but never answering."""
        return [(r, pid) for r, pid in self.peers.items() if (_proc_stat(pid) or ["?"])[0] in ("T", "t")]

    def report(self, dead: tuple[int, int]) -> str:
        ckpt = self.last_checkpoint()
        kept = f"; the last complete checkpoint is {ckpt}" if ckpt else ""
        return (f"[rank {self.rank}] llama-ft: error: rank {dead[0]} (pid {dead[1]} on {socket.gethostname()}) died; "
                f"stopping rank {self.rank} too{kept}")

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            dead = self.dead_peer()
            if dead is not None and not self._stop.is_set():
                print(self.report(dead), file=sys.stderr, flush=True)
                os._exit(1)

    def start(self) -> PeerWatch:
        if self.peers:
            self._thread = threading.Thread(target=self._run, name="llama-ft-peer-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def collective_failures(self) -> Iterator[None]:
        """Inside: a collective that fails because a rank is gone (gloo sees the closed connection; NCCL and
        gloo time out after --dist_timeout) ends this rank with one line naming it, not a traceback. A
        planned stop (StopRun, UserError: raised on every rank together) stops the watch first."""
        try:
            yield
        except (StopRun, UserError):
            self.stop()  # every rank ends on purpose now, one after the other: not a death
            raise
        except RuntimeError as e:  # torch.distributed.DistError is a RuntimeError
            dead = self.dead_peer()
            if dead is not None:
                print(self.report(dead), file=sys.stderr, flush=True)
                os._exit(1)
            if self.world > 1 and _looks_collective(e):
                ckpt = self.last_checkpoint()
                kept = f"; the last complete checkpoint is {ckpt}" if ckpt else ""
                stopped = self.stopped_peers()
                if stopped:
                    # A stopped rank holds no signal handler: DeepSpeed's launcher would SIGTERM it and SIGKILL it
                    # only 30 s later. The job ends now, so end the hung rank with it (found by tests/soak.py).
                    self.stop()
                    for _, pid in stopped:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGKILL)
                    r, pid = stopped[0]
                    raise StopRun(1, f"error: rank {r} (pid {pid} on {socket.gethostname()}) is stopped (SIGSTOP?) "
                                     f"and hung a collective for --dist_timeout; ended it and rank {self.rank}"
                                     f"{kept}") from None
                raise StopRun(1, f"error: a collective failed on rank {self.rank} ({' '.join(str(e).split())[:300]}): "
                                 f"a rank on another host died or hung{kept}") from None
            raise


def _looks_collective(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout"))
