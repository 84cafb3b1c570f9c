#!/usr/bin/env bash
# The GPU proof in one command (benchmarks/gpu_proof/, one module a stage in its stages/, says what each measures):
#
#   bash benchmarks/gpu_proof.sh [--dry-run] [--wheels DIR] [--budget S] [--stages LIST] OUTDIR
#
# On a GPU machine: about 9 minutes on one H100 / H200, results in OUTDIR/gpu_proof.{json,md,log}, written
# after every stage. --wheels DIR: the packages the GPU image lacks (bash benchmarks/gpu_wheels.sh DIR makes
# it). --dry-run: the same stages on CPU with tiny shapes and TRITON_INTERPRET=1, in a minute or two.
# The orchestrator needs nothing but the Python standard library, so a missing package fails one stage,
# never the whole run. PYTHON picks the interpreter (default: python3).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || { echo "gpu_proof.sh: error: PYTHON=$PYTHON: not found" >&2; exit 2; }
cd "$HERE/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$HERE/gpu_proof" "$@"
