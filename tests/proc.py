"""Run a multi-process job from a test, and on a timeout kill all of it.

`subprocess.run(timeout=...)` kills only the direct child: the DeepSpeed launcher's or
torchrun's ranks would live on, holding ports and cores for the rest of the suite. The job
gets its own session here, and the whole process group is killed when time is up.
"""

from __future__ import annotations

import os
import signal
import subprocess


def run_job(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd[:4]))} ... timed out after {timeout} s; "
                                 f"stderr tail:\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
