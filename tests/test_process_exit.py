"""A rank's process ends through os._exit (llama_ft/train/process_exit.py): the exit status must be the one
Python would give, atexit handlers must run, and what was printed or logged must still reach a pipe, which
os._exit does not flush."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, logging, sys
from llama_ft.errors import StopRun, UserError, user_errors_exit
from llama_ft.train.process_exit import run_and_exit

logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
sys.stdout = open(sys.stdout.fileno(), "w", buffering=1 << 16, closefd=False)  # block-buffered, even for a line

atexit.register(lambda: print("an atexit handler ran", file=sys.stderr))

@user_errors_exit
def main():
    print("printed before the end")
    logging.getLogger("t").info("logged before the end")
    how = sys.argv[1]
    if how == "stop":
        raise StopRun(143, "stopped by SIGTERM")
    if how == "user":
        raise UserError("--flag: expected a number")
    if how == "bug":
        raise ZeroDivisionError("a bug")
    if how == "exit-text":
        sys.exit("a message")
    return 0 if how == "ok" else int(how)

run_and_exit(main)
"""


@pytest.mark.parametrize("how,code,err", [("ok", 0, ""), ("7", 7, ""), ("stop", 143, "llama-ft: stopped by SIGTERM"),
                                          ("user", 2, "llama-ft: error: --flag: expected a number"),
                                          ("bug", 1, "ZeroDivisionError: a bug"), ("exit-text", 1, "a message")])
def test_exit_status_and_output_survive_os_exit(how, code, err):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "printed before the end\n"
    assert "logged before the end" in proc.stderr and err in proc.stderr
    assert proc.stderr.rstrip().endswith("an atexit handler ran")
    assert ("Traceback" in proc.stderr) == (how == "bug")
