"""Entry point: `python benchmarks/gpu_proof ARGS` (what gpu_proof.sh runs; also the stage env's
`--env-probe FILE`), or `python -m gpu_proof ARGS` with benchmarks/ on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a folder: import it as the package gpu_proof, from benchmarks/
    _pkg = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _pkg]
    sys.path.insert(0, str(_pkg.parent))
    from gpu_proof.cli import main
else:
    from .cli import main

sys.exit(main())
