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
