"""The rank-side watches of llama_ft/train/faults.py on plain processes: a watched launcher that is gone (reaped, or a
zombie no one has reaped yet), a pid reused by another process, and a local peer stopped by SIGSTOP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

from llama_ft.train.faults import LAUNCHER_HOST_ENV, LAUNCHER_PID_ENV, LauncherWatch, PeerWatch


def test_launcher_gone_reaped_or_zombie(monkeypatch):
    for reap in (True, False):
        launcher = subprocess.Popen(["sleep", "60"])
        monkeypatch.setenv(LAUNCHER_PID_ENV, str(launcher.pid))
        monkeypatch.setenv(LAUNCHER_HOST_ENV, socket.gethostname())
        watch = LauncherWatch(rank=1)
        assert launcher.pid in watch.watched and watch.gone() is None
        launcher.kill()
        if reap:
            launcher.wait()
        else:
            time.sleep(0.5)  # dead, not yet waited for: a zombie still answers kill(pid, 0)
        assert watch.gone() == (launcher.pid, "run-llama.sh")
        line = watch.report(watch.gone())
        assert line == (f"[rank 1] llama-ft: error: run-llama.sh (pid {launcher.pid}) is gone (killed?): stopping "
                        "rank 1, which must not train on orphaned")
        launcher.wait()


def test_a_parent_that_is_no_launcher_is_not_watched(monkeypatch):
    """`nohup llama-ft train &` from a shell that then exits: the process goes on (its parent was no launcher)."""
    monkeypatch.delenv(LAUNCHER_PID_ENV, raising=False)
    assert LauncherWatch(rank=0).watched == {}  # pytest's parent is a shell or CI's runner


def test_launcher_of_another_host_is_not_watched(monkeypatch):
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(os.getpid()))
    monkeypatch.setenv(LAUNCHER_HOST_ENV, "some-other-node")
    assert os.getpid() not in LauncherWatch(rank=0).watched  # there, that pid is some other process


def test_a_stopped_peer_is_seen(tmp_path):
    peer = subprocess.Popen(["sleep", "60"])
    try:
        ranks = tmp_path / ".llama-ft" / "ranks"
        ranks.mkdir(parents=True)
        for r, pid in ((0, os.getpid()), (1, peer.pid)):
            (ranks / f"rank{r}.json").write_text(json.dumps({"rank": r, "host": socket.gethostname(), "pid": pid}))
        watch = PeerWatch(tmp_path, 0, 2)
        assert watch.stopped_peers() == []
        os.kill(peer.pid, signal.SIGSTOP)
        time.sleep(0.3)
        assert watch.stopped_peers() == [(1, peer.pid)] and watch.dead_peer() is None  # alive, but never answering
    finally:
        peer.kill()
        peer.wait()
