"""run-llama.sh inside a Slurm job, simulated: the SLURM_* variables srun sets and a stub `scontrol` on PATH.

The job's two nodes are two names of this machine (127.0.0.1, localhost); srun's one task per node is
run-llama.sh started twice, with SLURM_NODEID 0 and 1. The quick tests stop at a stand-in launcher that
records its arguments (and skip the memory plan, tested in test_plan.py); one slow test trains for real.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from proc import run_jobs
from test_e2e import REPO, _metrics, llama_env

NODES = ("127.0.0.1", "localhost")
# What a launcher whose run finished leaves: train_results.json in the (last) --output_dir. run-llama.sh takes a
# launcher's exit 0 without it for a killed launcher.
FINISHED = ('prev=; for a in "$@"; do [ "$prev" = --output_dir ] && out=$a; prev=$a; done\n'
            'mkdir -p "$out" && echo "{}" > "$out/train_results.json"')


def _bin(tmp: Path, scontrol: str | None = "ok", fake_launch: bool = True) -> Path:
    """A PATH folder with a stub scontrol ("ok": prints NODES; "fail": exits 1 like a bad node list; None:
    none) and, with fake_launch, a launcher that records its arguments and a python that skips the memory plan."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "scontrol").unlink(missing_ok=True)
    stubs = {}
    if fake_launch:
        stubs["deepspeed"] = f'printf "%s\\n" "$@" > "{tmp}/launched.txt"\n{FINISHED}'
        stubs["python"] = f'[ "$1 $2 $3" = "-m llama_ft.cli plan" ] && exit 0\nexec "{sys.executable}" "$@"'
    if scontrol == "ok":
        stubs["scontrol"] = ('[ "$1 $2" = "show hostnames" ] || exit 3\n'
                             f'printf "%s\\n" {" ".join(NODES)}')
    elif scontrol == "fail":
        stubs["scontrol"] = 'echo "scontrol: error: Invalid hostlist: $3" >&2\nexit 1'
    for name, body in stubs.items():
        (bindir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bindir / name).chmod(0o755)
    return bindir


def _slurm_env(tmp: Path, out: Path, job_id: int = 4242, node_id: int | None = 0, **extra: str) -> dict[str, str]:
    """What srun gives one task of a 2-node job, on top of the tests' run-llama.sh environment."""
    env = llama_env(tmp, out)
    env.pop("MASTER_PORT")  # derived from the job id unless set
    env.update(SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
               SLURM_STEP_NUM_NODES="2", SLURM_STEP_NUM_TASKS="2", TMPDIR=str(tmp))
    if node_id is not None:
        env["SLURM_NODEID"] = str(node_id)
    env.update(extra)
    return env


def _launch(tmp: Path, scontrol: str | None = "ok", **env_kw: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """run-llama.sh up to the (recorded) launcher call: its result and the launcher's arguments, if it got there."""
    bindir = _bin(tmp, scontrol)
    env = _slurm_env(tmp, tmp / "out", **env_kw)
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", PYTHON=str(bindir / "python"),
               DEEPSPEED=str(bindir / "deepspeed"), MODEL=str(tmp / "model"))
    if scontrol is None:
        assert shutil.which("scontrol", path=env["PATH"]) is None
    record = tmp / "launched.txt"
    record.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(REPO / "run-llama.sh"), "--max_steps", "1"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=120)
    return proc, record.read_text().splitlines() if record.exists() else []


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _cpu_only():
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi present: the slots would be its GPU count")


@pytest.mark.parametrize("gpu_env,slots,source", [
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_JOB_GPUS": "0"}, 8, "SLURM_GPUS_ON_NODE"),
    ({"SLURM_GPUS_PER_NODE": "h100:4", "SLURM_JOB_GPUS": "0"}, 4, "SLURM_GPUS_PER_NODE"),
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "3"}, 3, "SLURM_GPUS_PER_NODE"),
    ({"SLURM_JOB_GPUS": "0,1,4-7"}, 6, "SLURM_JOB_GPUS"),
    ({}, 2, "CPU ranks"),
    ({"NPROC": "1"}, 1, "CPU ranks"),
])
def test_hostfile_from_scontrol(tmp_path, gpu_env, slots, source):
    """The job's nodes from scontrol, in its order, with the GPUs per node; node 1 launches its own ranks only."""
    if "SLURM" not in "".join(gpu_env):
        _cpu_only()
    proc, args = _launch(tmp_path, node_id=1, **gpu_env)
    assert proc.returncode == 0, proc.stderr
    hostfile = tmp_path / "llama-ft-slurm-4242.hostfile"
    lines = hostfile.read_text().splitlines()
    assert lines[0].startswith("# Slurm job 4242: SLURM_JOB_NODELIST=node[1-2]")
    assert lines[1:] == [f"{n} slots={slots}" for n in NODES]
    assert not list(tmp_path.glob("llama-ft-slurm-4242.hostfile.*")), "temporary file left behind"
    assert _flag(args, "--hostfile") == str(hostfile) and "--no_ssh" in args
    assert _flag(args, "--node_rank") == "1" and _flag(args, "--master_addr") == NODES[0]
    assert _flag(args, "--master_port") == str(10000 + 4242)
    assert f"{slots} slot(s) per node from {source}" in proc.stderr


def test_explicit_variables_win(tmp_path):
    hostfile = tmp_path / "mine"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")  # the job's nodes, in another order
    # SLURM_NODEID 0 is 127.0.0.1: line 2 of this hostfile
    proc, args = _launch(tmp_path, HOSTFILE=str(hostfile), SLURM_GPUS_ON_NODE="8")
    assert proc.returncode == 0, proc.stderr
    assert _flag(args, "--hostfile") == str(hostfile) and _flag(args, "--node_rank") == "1"
    assert _flag(args, "--master_addr") == "localhost"  # its first host: NODE_RANK 0
    assert not list(tmp_path.glob("llama-ft-slurm-*")), "no hostfile derived when HOSTFILE is set"

    proc, args = _launch(tmp_path, HOSTFILE=str(hostfile), NODE_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="23456", NPROC="1")
    assert proc.returncode == 0, proc.stderr
    assert [_flag(args, f) for f in ("--node_rank", "--master_addr", "--master_port", "--num_gpus")] == \
        ["0", "127.0.0.1", "23456", "1"]
    assert "NODE_RANK=0 (set), MASTER_ADDR=127.0.0.1 (set), MASTER_PORT=23456 (set)" in proc.stderr


@pytest.mark.parametrize("scontrol,env,line", [
    (None, {}, "Slurm job 4242: scontrol not on PATH; it expands SLURM_JOB_NODELIST=node[1-2] into host names"),
    ("fail", {}, "Slurm job 4242: 'scontrol show hostnames node[1-2]' failed (exit 1): scontrol: error: Invalid "
                 "hostlist: node[1-2]"),
    ("ok", {"SLURM_NODEID": "2"}, "SLURM_NODEID=2: expected 0..1, one per node of Slurm job 4242 (127.0.0.1 "
                                  "localhost)"),
    ("ok", {"node_id": None}, "Slurm job 4242: SLURM_NODEID is not set: start run-llama.sh with srun"),
    ("ok", {"HOSTFILE": "node9 slots=8\n"}, "host 'node9' is not a node of Slurm job 4242 (SLURM_JOB_NODELIST="
                                            "node[1-2]: 127.0.0.1 localhost)"),
    ("ok", {"HOSTFILE": "localhost slots=8\n"}, "SLURM_JOB_NUM_NODES=2: expected 1, one per host of HOSTFILE"),
    ("ok", {"HOSTFILE": "localhost slots=8\n", "SLURM_JOB_NUM_NODES": "", "SLURM_NNODES": "",
            "SLURM_STEP_NUM_NODES": "", "SLURM_STEP_NUM_TASKS": ""},
     "1 host(s) (localhost), but Slurm job 4242 has 2 nodes (127.0.0.1 localhost)"),
    ("ok", {"SLURM_NNODES": "3"}, "SLURM_NNODES=3: expected 2, one per host of SLURM_JOB_NODELIST=node[1-2]"),
    ("ok", {"SLURM_STEP_NUM_TASKS": "16"}, "SLURM_STEP_NUM_TASKS=16: expected 2, one per host of "
                                           "SLURM_JOB_NODELIST=node[1-2] (127.0.0.1 localhost); start run-llama.sh "
                                           "with srun, one task per node"),
    ("ok", {"SLURM_GPUS_PER_NODE": "lots"}, "SLURM_GPUS_PER_NODE=lots: expected N or TYPE:N GPUs"),
    ("ok", {"SLURM_JOB_GPUS": "0,x"}, "SLURM_JOB_GPUS=0,x: expected GPU indices"),
    ("ok", {"INCLUDE": "localhost:0"}, "INCLUDE/EXCLUDE in Slurm job 4242: NODE_RANK cannot come from SLURM_NODEID"),
])
def test_bad_slurm_input_is_one_line(tmp_path, scontrol, env, line):
    if "HOSTFILE" in env:
        (tmp_path / "hosts").write_text(env["HOSTFILE"])
        env = {**env, "HOSTFILE": str(tmp_path / "hosts")}
    proc, args = _launch(tmp_path, scontrol, **env)
    assert proc.returncode == 2 and not args
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("run-llama.sh: error: ") and line in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("llama-ft-slurm-4242.hostfile.*"))


def _free_slurm_port() -> int:
    """A job id whose derived MASTER_PORT (10000 + id % 10000) is free here now."""
    for job_id in range(70000 + os.getpid() % 9000, 80000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 10000 + job_id % 10000))
            except OSError:
                continue
            return job_id
    raise AssertionError("no free port in 10000-19999")


@pytest.mark.slow
def test_two_node_job_trains(tmp_path, tiny_model_dir):
    """srun's two tasks of a 2-node job (one CPU rank each): both finish, one ZeRO-3 run of world size 2."""
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / "tiny-llama")  # the embedded default, made once per session
    bindir = _bin(tmp_path, fake_launch=False)
    job_id, out = _free_slurm_port(), tmp_path / "out"
    flags = ("--max_steps", "3", "--save_steps", "3", "--eval_dataset_size", "0")
    nodes = []
    for node_id in (0, 1):
        env = _slurm_env(tmp_path, out, job_id, node_id, SLURM_GPUS_ON_NODE="1", OMP_NUM_THREADS="1")
        env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
        nodes.append((["bash", str(REPO / "run-llama.sh"), *flags], env))
    procs = run_jobs(nodes, timeout=600, cwd=tmp_path)
    for node_id, p in enumerate(procs):
        assert p.returncode == 0, p.stderr[-5000:]
        hostfile = tmp_path / f"llama-ft-slurm-{job_id}.hostfile"
        assert f"run-llama.sh: Slurm job {job_id}: hosts 127.0.0.1 localhost (hostfile {hostfile} from " \
               f"SLURM_JOB_NODELIST, 1 slot(s) per node from SLURM_GPUS_ON_NODE), NODE_RANK={node_id} " \
               f"(SLURM_NODEID={node_id}), MASTER_ADDR=127.0.0.1 (the first host), MASTER_PORT=" \
               f"{10000 + job_id % 10000} (SLURM_JOB_ID)" in p.stderr
    assert "INFO llama_ft: done: step 3" in procs[0].stderr
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 3 and results["world_size"] == 2
    assert (out / "adapter_model.safetensors").stat().st_size > 0 and (out / "adapter_config.json").is_file()
    assert len([r for r in _metrics(out) if "loss" in r]) == 3
