"""The GPU proof: every GPU measurement llama-ft owes, in one command of about 9 minutes on one H100 / H200.

    bash benchmarks/gpu_proof.sh [--dry-run] [--wheels DIR] [--budget S] [--stages LIST] OUTDIR

A GPU is lent to few sessions, for minutes, on a machine that reaches no package registry. So the run is
made of stages, each with its own time limit; each writes its result as it finishes (OUTDIR/gpu_proof.json,
rewritten atomically, and OUTDIR/gpu_proof.md, a table ready for BENCHMARKS.md with the device, date and
commands; OUTDIR/gpu_proof.log holds the tail of every command's output). A stage that fails or runs out of
time is recorded with its reason and the next one starts; a stage that no longer fits in --budget is
skipped with that reason. A run cut short therefore still returns every stage that finished.

Stages, in the order of the STAGES table (gpu_proof/stages/__init__.py), one module each in gpu_proof/stages/
whose docstring says what it measures on a GPU and what --dry-run does instead on CPU: env, gpu_tests,
fp8_kernels, throughput, capacity, load. The runner (gpu_proof/runner.py) gives each its time limit, records
its result and writes the files; gpu_proof/cli.py reads the arguments. Run as `python benchmarks/gpu_proof`
(what gpu_proof.sh does) or, with benchmarks/ on sys.path, `python -m gpu_proof`.

Exit status: 0 when every stage run is ok (or skipped for lack of CUDA in a dry run), 1 when one failed or
timed out, 2 for bad input (one line), 128 + N when stopped by signal N (the JSON says which stage).
"""
