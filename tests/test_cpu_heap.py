"""CPU ranks fix glibc's mmap threshold (llama_ft/train/cpu_heap.py). Checked against glibc's own account
(mallinfo2's mapped bytes), with glibc's default behaviour as the control: after a 4 MiB block is freed, the
default threshold rises to 4 MiB and a 2 MiB block comes from the heap; fixed at 1 MiB it is mapped."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

SCRIPT = """
import ctypes, sys
from llama_ft.train.cpu_heap import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else None
libc.free(libc.malloc(4 << 20))  # glibc's default: the threshold rises to 4 MiB here
before = libc.mallinfo2().hblkhd
p = libc.malloc(2 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(p)
print(fixed, mapped >= 2 << 20)
"""


def _run(mode: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=full,
                          check=True, timeout=60).stdout.split()


def test_fixed_threshold_maps_what_glibc_would_keep_in_the_heap():
    assert _run("default") == ["None", "False"]  # the control: glibc's adjusted threshold, the heap
    assert _run("fix") == ["True", "True"]


def test_a_users_malloc_setting_is_left_alone():
    assert _run("fix", MALLOC_MMAP_THRESHOLD_=str(8 << 20)) == ["False", "False"]
