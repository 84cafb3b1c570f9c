"""DeepSpeed JIT op preparation: stale torch build locks must not hang a run."""

from __future__ import annotations

import os
import threading
import time

from llama_ft.ops import clear_stale_lock, needed_builders


def test_stale_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path, stale_after_s=600) is True
    assert not lock.exists()


def test_live_lock_is_waited_for_not_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    released = []

    def finish_build():
        time.sleep(0.3)
        released.append(time.time())
        lock.unlink()

    t = threading.Thread(target=finish_build)
    t.start()
    t0 = time.time()
    assert clear_stale_lock(tmp_path, stale_after_s=600, poll_s=0.05) is False
    t.join()
    assert released and time.time() - t0 >= 0.25  # returned only after the build released it


def test_young_lock_becomes_stale_after_the_limit(tmp_path):
    (tmp_path / "lock").touch()
    assert clear_stale_lock(tmp_path, stale_after_s=0.2, poll_s=0.05) is True


def test_needed_builders_follow_the_config():
    plain = {"zero_optimization": {"stage": 3}}
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert needed_builders(plain, on_gpu=False) == ["ShareMemCommBuilder"]
    assert needed_builders(offload, on_gpu=False) == ["ShareMemCommBuilder", "CPUAdamBuilder"]
    assert needed_builders(plain, on_gpu=True) == []
    assert needed_builders(offload, on_gpu=True) == ["CPUAdamBuilder"]


def _backdate(p, seconds):
    t = time.time() - seconds
    os.utime(p, (t, t))


def test_idle_lock_is_stale_without_the_long_wait(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    _backdate(lock, 60)  # older than IDLE_AFTER_S, and nobody works in the folder
    t0 = time.time()
    assert clear_stale_lock(tmp_path, stale_after_s=600, idle_after_s=30) is True
    assert time.time() - t0 < 5


def test_lock_of_a_running_build_is_kept(tmp_path):
    import subprocess

    lock = tmp_path / "lock"
    lock.touch()
    _backdate(lock, 60)
    builder = subprocess.Popen(["sleep", "30"], cwd=tmp_path)  # stands for ninja working in the build folder
    try:
        t = threading.Timer(0.5, lock.unlink)
        t.start()
        assert clear_stale_lock(tmp_path, stale_after_s=600, idle_after_s=30, poll_s=0.05) is False
        t.join()
    finally:
        builder.kill()
        builder.wait()
