"""What the benchmark scripts share (importable because a script's own folder is on sys.path)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


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
