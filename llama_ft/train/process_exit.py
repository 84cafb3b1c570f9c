"""Leave a rank's process without the interpreter's teardown, once everything it wrote is on disk.

Why: rarely (once in each of two CI runs of the suite, among some hundred rank exits) a rank died of SIGABRT
after its last line ("done: step 8", or the SIGTERM stop message), printing "terminate called without an active
exception": exit 250 instead of 0 or 143, seen in CI even with `destroy_process_group` called. The likely cause:
DeepSpeed's engine sits in reference cycles that still hold gloo process groups and tensors gloo's C++ worker
threads touch; freed during interpreter finalization, they make a worker take the GIL, Python ends that thread
with pthread_exit, and unwinding through a noexcept C++ frame aborts (pytorch#190489; the torch fix, an atexit
hook, was abandoned in pytorch#179291). Collecting the cycles before exit and then skipping finalization leaves
nothing to run at that point, whatever the thread.
Nothing is lost by skipping the teardown: adapters, checkpoints and metrics are written to a
temporary name, fsynced and renamed before `main` returns, and the reporter is closed on every way out.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def exit_code(e: SystemExit) -> int:
    """The status `sys.exit(e.code)` would give: None is 0, an int itself, anything else printed and 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """Run `main` and end the process with its status through `os._exit`, after the collector, the atexit
    handlers and stdout/stderr are done: a bug still prints its traceback (exit 1), Ctrl-C that reached
    Python is 130."""
    try:
        code = main() or 0
    except SystemExit as e:
        code = exit_code(e)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - a bug: the traceback Python would print, then the same exit 1
        traceback.print_exc()
        code = 1
    gc.collect()  # the engine's cycles go now, while every thread may still take the GIL
    # What the interpreter's exit runs before its teardown: atexit handlers (logging's flush, W&B, the
    # benchmarks' memory probe), while the interpreter is whole; only the teardown after them is skipped.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say there
            pass
    os._exit(code)
