"""Faults on real CPU ranks: preemption signals, a rank killed mid-save, NaN, a full disk, a non-shared OUTPUT_DIR.

Every run here trains on the 4-bit NF4 base (FLAGS: --bits 4, which implies --quantize): the faults, the save
and the exact resume hold with 4 bits. One chain of runs shares the work: a straight 8-step run is the
reference; a second run is stopped by SIGTERM to run-llama.sh, resumed from `latest` and stopped again by
SIGTERM to rank 1, resumed and then broken by kill -9 of rank 1 while it is saving a checkpoint, and resumed
once more to the end. Its final adapters and losses must equal the straight run's, bit for bit. (A float64
reference for what one step computes is tests/test_token_loss.py. On an unquantized base: SIGTERM, save and
exact resume in tests/test_dpo_train.py (one rank, fp32), exact resume in tests/test_e2e.py and
tests/test_token_loss.py; the full soak, `python tests/soak.py`, draws SIGTERM too.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from proc import kill_tree
from safetensors.torch import load_file
from test_e2e import REPO, _metrics, _same_adapters, llama_env, run_llama

pytestmark = pytest.mark.slow
FLAGS = ("--max_steps", "8", "--save_steps", "3", "--eval_dataset_size", "0", "--lora_r", "8", "--lora_alpha", "16",
         "--learning_rate", "5e-3", "--per_device_train_batch_size", "2", "--source_max_len", "128",
         "--target_max_len", "32", "--lora_dropout", "0.1", "--gradient_checkpointing", "false", "--bits", "4")


def _start(tmp: Path, out: Path, *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "run-llama.sh"), *FLAGS, *extra], env=llama_env(tmp, out, **env),
                            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        _, err = proc.communicate()
        raise AssertionError(f"timed out; stderr tail:\n{err[-4000:]}") from None
    return proc.returncode, err


def _wait_for(cond, timeout: float = 300, what: str = "") -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def _steps_logged(out: Path) -> int:
    try:
        return max((r["step"] for r in _metrics(out) if "loss" in r), default=0)
    except (OSError, ValueError):
        return 0


def _rank_pid(out: Path, rank: int) -> int:
    return json.loads((out / ".llama-ft" / "ranks" / f"rank{rank}.json").read_text())["pid"]


def _latest(out: Path) -> str:
    return (out / "latest").read_text().strip()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    run_llama(tmp, tmp / "straight", *FLAGS, "--save_total_limit", "2")
    return tmp


def test_straight_run_keeps_the_newest_checkpoints(straight):
    out = straight / "straight"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]  # --save_total_limit 2
    assert _latest(out) == "checkpoint-8" and not list(out.glob(".checkpoint-*"))


def test_signals_and_a_killed_save_lose_nothing(straight):
    tmp, out = straight, straight / "chain"
    slow = {"LLAMA_FT_TEST_STEP_SLEEP": "0.5"}

    # 1. SIGTERM to run-llama.sh: it reaches the ranks, which finish the step, save and exit 143
    proc = _start(tmp, out, **slow)
    _wait_for(lambda: _steps_logged(out) >= 1, what="step 1")
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    first = _latest(out)
    step1 = int(first.split("-")[1])
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert f"llama-ft: stopped by SIGTERM after step {step1}; checkpoint {out / first}" in err, err[-3000:]
    assert "--resume_from_checkpoint latest" in err and "Traceback" not in err
    assert 1 <= step1 < 8 and (out / first / "trainer_state.json").is_file()

    # 2. resume from `latest`; SIGTERM to rank 1 alone: every rank stops after the same step
    proc = _start(tmp, out, "--resume_from_checkpoint", "latest", **slow)
    _wait_for(lambda: _steps_logged(out) >= step1 + 1 and (out / ".llama-ft/ranks/rank1.json").is_file()
              and psutil.pid_exists(_rank_pid(out, 1)), what="a step after resuming")
    os.kill(_rank_pid(out, 1), signal.SIGTERM)
    code, err = _finish(proc)
    second = _latest(out)
    step2 = int(second.split("-")[1])
    assert code == 128 + signal.SIGTERM and step1 < step2 < 8, (code, step2, err[-3000:])
    assert "Traceback" not in err

    # 3. resume; kill -9 rank 1 while the next checkpoint is being written: the run ends within 60 s naming
    #    rank 1, the half-written checkpoint is not under a final name, `latest` still names the last one
    proc = _start(tmp, out, "--resume_from_checkpoint", "latest", LLAMA_FT_TEST_PAUSE_IN_SAVE="30", **slow)
    _wait_for(lambda: bool(list(out.glob(".checkpoint-*.tmp/.paused"))), what="a save in progress")
    victim = _rank_pid(out, 1)
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    code, err = _finish(proc, timeout=120)
    assert time.time() - t0 < 60 and code != 0, (time.time() - t0, code)
    assert f"rank 1 (pid {victim}" in err and "died" in err, err[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert _latest(out) == second and steps[-1] == step2 and list(out.glob(".checkpoint-*.tmp"))

    # 4. resume to the end: the same adapters and losses as the straight run
    code, err = _finish(_start(tmp, out, "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]
    assert "frozen linears" in err and "(NF4)" in err  # the 4-bit base (rank 0's partition-bytes line)
    assert not list(out.glob(".checkpoint-*.tmp"))  # the killed save's leftovers are gone
    _same_adapters(tmp / "straight", out)
    ref = {r["step"]: r["loss"] for r in _metrics(tmp / "straight") if "loss" in r}
    got = {r["step"]: r["loss"] for r in _metrics(out) if "loss" in r}
    assert got == ref


def _job_leftovers(port: str) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers of the job on `port` still named in /dev/shm."""
    return [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]


def test_kill_9_of_run_llama_stops_every_rank(straight):
    """kill -9 of run-llama.sh runs no trap, and the launcher is in a session of its own: the ranks' own watch on
    the script's pid must stop them (and with them the launcher's processes) within seconds, saying why."""
    tmp, out = straight, straight / "orphans"
    env = llama_env(tmp, out, LLAMA_FT_TEST_STEP_SLEEP="1")
    proc = subprocess.Popen(["bash", str(REPO / "run-llama.sh"), *FLAGS, "--save_steps", "1"], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(lambda: _steps_logged(out) >= 2, what="step 2")
    job = psutil.Process(proc.pid).children(recursive=True)  # the launcher, its per-node process, both ranks
    assert len(job) >= 4, job
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.time()
    _, alive = psutil.wait_procs(job, timeout=15)
    took = time.time() - t0
    for p in alive:
        kill_tree(p.pid)
    _, err = proc.communicate(timeout=60)
    assert not alive, f"still running {took:.0f} s after kill -9 of run-llama.sh: {alive}"
    assert f"llama-ft: error: run-llama.sh (pid {proc.pid}) is gone (killed?): stopping rank 0" in err, err[-3000:]
    assert (out / _latest(out) / "trainer_state.json").is_file()  # `latest` names a complete checkpoint
    assert not _job_leftovers(env["MASTER_PORT"])


def test_a_rank_hung_in_the_final_save_ends_the_job_after_dist_timeout(straight):
    """Rank 1 stops (SIGSTOP) after the last step, before the final adapters are gathered: rank 0's collective
    times out after --dist_timeout and the job ends with one line naming the stopped rank, which is ended with
    it, not with a traceback and 30 s more until DeepSpeed's launcher SIGKILLs it (found by tests/soak.py)."""
    tmp, out = straight, straight / "hung-at-end"
    env = llama_env(tmp, out, LLAMA_FT_TEST_STOP_AFTER_LOOP="1")
    proc = subprocess.Popen(["bash", str(REPO / "run-llama.sh"), *FLAGS, "--max_steps", "2", "--save_steps", "2",
                             "--dist_timeout", "8"], env=env, cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    code, err = _finish(proc, timeout=300)
    # the launcher ends with the first rank it sees end: the stopped one, SIGKILLed (-9 read as 247), or rank 0 (1)
    assert code in (1, 247) and "Traceback" not in err, err[-3000:]
    line = next(ln for ln in err.splitlines() if "is stopped (SIGSTOP?)" in ln)
    hung = _rank_pid(out, 1)
    assert f"rank 1 (pid {hung} on" in line and "ended it and rank 0" in line and "checkpoint-2" in line, line
    assert not psutil.pid_exists(hung) and not _job_leftovers(env["MASTER_PORT"])
    assert _latest(out) == "checkpoint-2" and not (out / "adapter_model.safetensors").exists()


def test_nan_stop_keeps_the_last_good_checkpoint(straight):
    tmp, out = straight, straight / "nan-stop"
    code, err = _finish(_start(tmp, out, "--save_steps", "2", LLAMA_FT_TEST_NAN_AT_STEP="3"))
    assert code == 3, err[-3000:]
    line = next(ln for ln in err.splitlines() if "llama-ft: error: step 3:" in ln)
    assert "NaN or inf" in line and "rank 0: [" in line and "rank 1: [" in line
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in line and _latest(out) == "checkpoint-2"
    assert not (out / "checkpoint-3").exists() and "Traceback" not in err


def test_nan_skip_drops_the_update_and_counts_it(straight):
    tmp, out = straight, straight / "nan-skip"
    code, err = _finish(_start(tmp, out, "--max_steps", "4", "--nan_policy", "skip", LLAMA_FT_TEST_NAN_AT_STEP="2"))
    assert code == 0, err[-3000:]
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert "step 2: the loss or gradient norm is NaN or inf" in err and "skipped (--nan_policy skip)" in err
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter_model.safetensors")).values())


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): ENOSPC not testable")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_a_checkpoint_save(straight, tmpfs):
    """The disk fills up between two saves: one line naming the path, non-zero exit, the earlier checkpoint
    and `latest` intact, no temporary folder left."""
    out = tmpfs / "out"
    proc = _start(straight, out, "--save_steps", "2", LLAMA_FT_TEST_STEP_SLEEP="0.5")
    _wait_for(lambda: (out / "latest").is_file(), what="the first checkpoint")
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    (tmpfs / "filler").write_bytes(b"\0" * max(free - 4096, 0))
    code, err = _finish(proc)
    assert code != 0 and "Traceback" not in err, err[-3000:]
    line = next(ln for ln in err.splitlines() if "llama-ft: error: saving" in ln)
    assert "disk full" in line and "the earlier checkpoints are intact" in line
    assert _latest(out) == "checkpoint-2" and (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not list(out.glob(".checkpoint-*.tmp"))


def test_output_dir_not_shared_between_nodes(tmp_path):
    """Two "nodes" (one launcher and rank each) with different OUTPUT_DIRs: both stop at start with one line."""
    hostfile = tmp_path / "two-nodes"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    from test_e2e import _free_port

    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = llama_env(tmp_path, tmp_path / f"out-{node}", HOSTFILE=str(hostfile), NODE_RANK=str(node),
                        MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
        env["MASTER_PORT"] = port
        procs.append(subprocess.Popen(["bash", str(REPO / "run-llama.sh"), *FLAGS], env=env, cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    results = [_finish(p) for p in procs]
    assert all(code != 0 for code, _ in results)
    err0 = results[0][1]
    assert "is not one directory shared by every node" in err0 and "Traceback" not in err0, err0[-3000:]
    assert not list((tmp_path / "out-0").glob("checkpoint-*"))


def test_a_second_signal_aborts_but_one_fanned_out_twice_does_not(tmp_path):
    """StopSignals in a process of its own: two SIGTERMs within DEDUPE_S are one request (a launcher fans one
    out); a second one later aborts at once with 128+signal and one line."""
    import sys

    script = ("import time\nfrom llama_ft.train.faults import StopSignals\ns = StopSignals().install()\n"
              "print('ready', flush=True)\nwhile True:\n    time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the same request, forwarded by a launcher
    time.sleep(1.0)
    assert proc.poll() is None
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)  # a real second signal
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT
    assert "llama-ft: error: second SIGINT: aborting without saving" in err


def test_disk_full_writing_the_final_adapters(tiny_model_dir, tmpfs):
    """The final adapter save on a full disk: one line naming the file, and the adapter files already there
    are not half-overwritten."""
    from llama_ft.adapters import ADAPTER_WEIGHTS, save_adapters
    from llama_ft.errors import UserError
    from llama_ft.lora import LoraSpec
    from llama_ft.model.build import build_lora_model

    spec = LoraSpec(r=8, alpha=16)
    model, _ = build_lora_model(tiny_model_dir, spec, None, torch.float32)
    out = tmpfs / "adapters"
    save_adapters(model, out, spec, str(tiny_model_dir))
    before = (out / ADAPTER_WEIGHTS).read_bytes()
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    (tmpfs / "filler").write_bytes(b"\0" * max(free - 4096, 0))
    with pytest.raises(UserError, match=rf"{ADAPTER_WEIGHTS}: disk full"):
        save_adapters(model, out, spec, str(tiny_model_dir))
    assert (out / ADAPTER_WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", ADAPTER_WEIGHTS]
