"""What the benchmark scripts share (importable because a script's own folder is on sys.path)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send stdout (Python's and fd 1, for compiler subprocesses) to stderr: stdout carries only the table.

    DeepSpeed's logger writes to the sys.stdout of its import, and its op builder's JIT compile to fd 1.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


PROBE_ENV = "LLAMA_FT_BENCH_PROBE"
"""Where the probe writes; a sitecustomize.py of PROBE_SOURCE on the ranks' PYTHONPATH records each rank's peak RSS
(getrusage, the whole process life) and CUDA peak at exit."""
PROBE_SOURCE = '''"""llama-ft benchmark probe (benchmarks/bench_common.py): peak memory of a rank, at exit."""
import atexit
import json
import os
import resource
import sys

_out = os.environ.get("PROBE_ENV")
if _out and "RANK" in os.environ:
    def _llama_ft_bench_probe():
        rec = {"rank": int(os.environ["RANK"]), "pid": os.getpid(), "argv0": sys.argv[0] if sys.argv else "",
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                rec["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
                rec["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        except Exception:  # noqa: BLE001 - a probe never fails the run
            pass
        with open(os.path.join(_out, "rank{}-pid{}.json".format(rec["rank"], rec["pid"])), "w") as f:
            json.dump(rec, f)

    atexit.register(_llama_ft_bench_probe)

# Run a sitecustomize this one shadows, if any.
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _path = os.path.join(_entry or os.curdir, "sitecustomize.py")
    if os.path.abspath(_entry or os.curdir) != _here and os.path.isfile(_path):
        with open(_path) as _f:
            exec(compile(_f.read(), _path, "exec"), {"__name__": "_shadowed_sitecustomize", "__file__": _path})
        break
'''.replace("PROBE_ENV", PROBE_ENV)


def read_probes(probe_out: Path, nproc: int) -> list[dict[str, Any]]:
    """Per rank, the probe record of its largest process (the rank itself, not a helper it spawned)."""
    best: dict[int, dict[str, Any]] = {}
    for f in probe_out.glob("rank*-pid*.json"):
        rec = json.loads(f.read_text())
        if rec["rank"] not in best or rec["peak_rss_bytes"] > best[rec["rank"]]["peak_rss_bytes"]:
            best[rec["rank"]] = rec
    if sorted(best) != list(range(nproc)):
        raise RuntimeError(f"memory probe: records for ranks {sorted(best)}, expected 0..{nproc - 1}")
    return [best[r] for r in range(nproc)]
