"""The stages of the GPU proof, in the order they run: the STAGES table.

A new stage is one module here, `stages/NAME.py`, with a module docstring that says what it measures (GPU
form, then what --dry-run does instead; `gpu_proof.sh --help` lists these docstrings), a function
`stage_NAME(p: Proof, limit: float) -> dict` that returns at least {"status": ..., "commands": [...]} (plus
"reason", "summary", "results", "table_md" as it has them), and `STAGE = Stage(key, title, stage_NAME,
limit_s, dry_limit_s, min_s)`; then one line in STAGES below, where it should run. Stage numbers in the
report and the --stages choices follow this table. env stays first: every later stage reads what it records.
"""

from __future__ import annotations

from ..runner import Stage
from . import capacity, compile_kernels, env, fp8_kernels, gpu_tests, load, nf4, throughput

STAGES: list[Stage] = [
    env.STAGE,
    compile_kernels.STAGE,
    gpu_tests.STAGE,
    fp8_kernels.STAGE,
    throughput.STAGE,
    capacity.STAGE,
    load.STAGE,
    nf4.STAGE,  # last: added after the others' budgets; it runs on what is left (rerun: --stages nf4)
]
