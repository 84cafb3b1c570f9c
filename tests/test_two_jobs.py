"""Two run-llama.sh jobs on one machine: the rendezvous port.

With every rank on this machine and no MASTER_PORT, run-llama.sh picks a free port (as `torchrun --standalone`
does) and logs it, so that a second job does not die on DeepSpeed's default 29500 with torch's EADDRINUSE
traceback; an explicit MASTER_PORT that is in use is refused in one line before anything starts. Several
nodes keep 29500 (they must agree without talking; Slurm derives one from the job id, tests/test_slurm.py).
The quick tests stop at a stand-in launcher that records its arguments (tests/test_slurm.py's); one slow
test runs two real 2-rank CPU jobs at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from proc import run_jobs
from test_e2e import REPO, llama_env
from test_slurm import _bin, _flag

PICKED = re.compile(r"^run-llama\.sh: MASTER_PORT (\d+) \(a free port; set MASTER_PORT to choose\)$", re.M)


def _env(tmp: Path, out: Path, **extra: str) -> dict[str, str]:
    env = llama_env(tmp, out, **extra)
    if "MASTER_PORT" not in extra:
        del env["MASTER_PORT"]  # llama_env gives every test job a free port of its own; these pick their own
    return env


def _launch(tmp: Path, **extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """run-llama.sh up to a launcher that records its arguments (no memory plan): the result and the arguments,
    if it got that far."""
    bindir = _bin(tmp, scontrol=None)
    env = _env(tmp, tmp / "out", **extra)
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", PYTHON=str(bindir / "python"),
               DEEPSPEED=str(bindir / "deepspeed"), MODEL=str(tmp / "model"))
    record = tmp / "launched.txt"
    record.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(REPO / "run-llama.sh"), "--max_steps", "1"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)
    return proc, record.read_text().splitlines() if record.exists() else []


def _hostfile(tmp: Path, text: str) -> str:
    (tmp / "hosts").write_text(text)
    return str(tmp / "hosts")


def test_one_node_without_master_port_picks_a_free_one(tmp_path):
    ports = []
    for _ in range(2):
        proc, args = _launch(tmp_path)
        assert proc.returncode == 0, proc.stderr
        logged = PICKED.findall(proc.stderr)
        assert len(logged) == 1 and _flag(args, "--master_port") == logged[0], proc.stderr
        ports.append(int(logged[0]))
        with socket.socket() as s:
            s.bind(("0.0.0.0", ports[-1]))  # free: the store can listen there
    # every host a name of this machine, no NODE_RANK: one node too, whatever the launcher reaches it by
    proc, args = _launch(tmp_path, HOSTFILE=_hostfile(tmp_path, "localhost slots=1\n127.0.0.1 slots=1\n"))
    assert proc.returncode == 0 and PICKED.search(proc.stderr), proc.stderr
    # a set one is used as it is, and not logged
    port = str(ports[0])
    proc, args = _launch(tmp_path, MASTER_PORT=port)
    assert proc.returncode == 0 and _flag(args, "--master_port") == port and not PICKED.search(proc.stderr)


@pytest.mark.parametrize("env", [
    {"HOSTFILE": "localhost slots=1\n127.0.0.1 slots=1\n", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
    {"HOSTFILE": "node9 slots=2\n"},
])
def test_several_nodes_keep_29500(tmp_path, env):
    """Each node's launcher (NODE_RANK), or ranks on another machine: the port must be the same everywhere."""
    proc, args = _launch(tmp_path, **{**env, "HOSTFILE": _hostfile(tmp_path, env["HOSTFILE"])})
    assert proc.returncode == 0, proc.stderr
    assert _flag(args, "--master_port") == "29500" and not PICKED.search(proc.stderr)


def test_busy_or_bad_master_port_is_one_line_and_nothing_starts(tmp_path):
    with socket.socket() as srv:  # another job's rank 0, as a port check sees it
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        proc, args = _launch(tmp_path, MASTER_PORT=str(port))
    assert proc.returncode == 2 and not args and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"run-llama.sh: error: MASTER_PORT={port}: the port is in use on this "
                                        "machine (another job?); unset MASTER_PORT to pick a free one, or choose "
                                        "another"], proc.stderr
    for bad in ("http", "0", "65536", "08080"):
        proc, args = _launch(tmp_path, MASTER_PORT=bad)
        assert proc.returncode == 2 and not args
        assert proc.stderr == f"run-llama.sh: error: MASTER_PORT={bad}: expected a port number 1..65535\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_jobs_on_one_machine_both_finish(tmp_path, tiny_model_dir):
    """Two 2-rank CPU jobs of the embedded default started together, MASTER_PORT unset for both: each picks its
    own port (29500 for both was a DistNetworkError traceback for the second) and both train to the end."""
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / "tiny-llama")  # the embedded default, made once per session
    flags = ("--max_steps", "3", "--save_steps", "3", "--eval_dataset_size", "0")
    jobs = [(["bash", str(REPO / "run-llama.sh"), *flags], _env(tmp_path, tmp_path / f"out{i}", NPROC="2",
                                                                 OMP_NUM_THREADS="1")) for i in (0, 1)]
    procs = run_jobs(jobs, timeout=600, cwd=tmp_path)
    ports = []
    for i, p in enumerate(procs):
        assert p.returncode == 0, p.stderr[-5000:]
        assert "Traceback" not in p.stderr
        ports += PICKED.findall(p.stderr)
        results = json.loads((tmp_path / f"out{i}" / "train_results.json").read_text())
        assert results["global_step"] == 3 and results["world_size"] == 2
    assert len(ports) == 2 and ports[0] != ports[1], ports
