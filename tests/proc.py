"""Run a multi-process job from a test, and on a timeout kill all of it.

`subprocess.run(timeout=...)` kills only the direct child: the DeepSpeed launcher's or
torchrun's ranks would live on, holding ports and cores for the rest of the suite. The job
gets its own session here, and when time is up its whole process tree is killed (run-llama.sh
starts the launcher in a session of its own, so the process group alone is not enough).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_common import kill_tree  # noqa: E402 - one process-tree kill for the tests and the benchmarks


def run_job(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd[:4]))} ... timed out after {timeout} s; "
                                 f"stderr tail:\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_jobs(jobs: list[tuple[list[str], dict[str, str]]], timeout: float,
             **kwargs) -> list[subprocess.CompletedProcess]:
    """Start several jobs at once (e.g. one launcher per "node" of a multi-node run on this machine), each
    `(cmd, env)` in a session of its own; wait for all of them, and kill every one's tree if time runs out."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, **kwargs) for cmd, env in jobs]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
            for p, (out, err) in zip(procs, outs, strict=True)]
