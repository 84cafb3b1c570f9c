"""The command line of the GPU proof: its arguments (checked here, bad input is one line and exit 2), the
--help text (the package docstring, then each stage's own docstring in the order of STAGES), and main, which
runs every stage of STAGES through one Proof, saving the files after each, and stops cleanly on a signal."""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
from pathlib import Path

from . import __doc__ as DOC
from .runner import PROG, Interrupted, Proof, UsageError, markdown
from .stages import STAGES
from .stages.env import env_probe


def epilog() -> str:
    """The package docstring after its first two paragraphs, with what each stage measures after the first of
    them (each stage module's docstring, its "Stage N, key:" prefix left off)."""
    rest = DOC.split("\n\n", 2)[2].strip()
    lines = ["Stages (what is measured; the GPU form, then what --dry-run does instead on CPU):"]
    for i, stage in enumerate(STAGES, 1):
        doc = " ".join((sys.modules[stage.run.__module__].__doc__ or "").split())
        doc = doc.split(": ", 1)[1] if doc.startswith("Stage ") and ": " in doc else doc
        text = textwrap.wrap(doc, 96)
        lines.append(f"{i:2d}. {stage.key:<12} " + f"\n{' ' * 17}".join(text))
    first, more = rest.split("\n\n", 1)
    return "\n\n".join([first, "\n".join(lines), more])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog="gpu_proof.sh", description=DOC.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog())
    ap.add_argument("outdir", type=Path, metavar="OUTDIR", help="where gpu_proof.json, .md and .log go")
    ap.add_argument("--dry-run", action="store_true", help="the same stages on CPU, tiny shapes, TRITON_INTERPRET=1")
    ap.add_argument("--wheels", type=Path, metavar="DIR", help="install these .whl first (--no-index --no-deps)")
    ap.add_argument("--budget", type=float,
                    help="seconds for the whole run (default 520: a device call of timeout_s 560 holds it; 420 with "
                         "--dry-run)")
    ap.add_argument("--stages", default=",".join(s.key for s in STAGES),
                    help=f"comma list of {','.join(s.key for s in STAGES)} (default all; env always runs)")
    ap.add_argument("--scratch", type=Path, help="working folder: wheels' site, checkpoints, full logs (default "
                                                 "/tmp/llama-ft-gpu-proof, or OUTDIR/.scratch on --dry-run)")
    args = ap.parse_args(argv)
    args.argv = argv
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    keys = [s.key for s in STAGES]
    if not names or any(n not in keys for n in names):
        raise UsageError(f"--stages {args.stages}: expected a comma list of {', '.join(keys)}")
    args.stages = ["env", *names]  # always: the other stages read the versions and memory sizes it records
    if args.budget is None:
        args.budget = 420.0 if args.dry_run else 520.0
    if not args.budget > 0:
        raise UsageError(f"--budget {args.budget:g}: expected seconds > 0")
    if args.wheels is not None:
        if not args.wheels.is_dir():
            raise UsageError(f"--wheels {args.wheels}: not a directory (make one with: bash benchmarks/gpu_wheels.sh "
                             f"{args.wheels})")
        if not list(args.wheels.glob("*.whl")):
            raise UsageError(f"--wheels {args.wheels}: no .whl files in it (bash benchmarks/gpu_wheels.sh fills it)")
        args.wheels = args.wheels.resolve()
    if args.outdir.exists() and not args.outdir.is_dir():
        raise UsageError(f"OUTDIR {args.outdir}: exists and is not a directory")
    args.outdir = args.outdir.resolve()
    args.scratch = (args.scratch or (args.outdir / ".scratch" if args.dry_run else Path("/tmp/llama-ft-gpu-proof")))
    args.scratch = args.scratch.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--env-probe"] and len(argv) == 2:
        env_probe(Path(argv[1]))
        return 0
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"gpu_proof.sh: error: {e}", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    proof = Proof(args, STAGES)

    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        for stage in STAGES:
            proof.run_stage(stage)
            proof.save()
    except Interrupted as e:
        proof.report["header"]["stopped_by"] = e.args[0]
        proof.save()
        print(f"[{PROG}] stopped by {e.args[0]}; what finished is in {args.outdir}/gpu_proof.json", file=sys.stderr)
        return 128 + e.signum
    print(markdown(proof.report))
    bad = [s for s in proof.report["stages"] if s["status"] in ("failed", "timeout")]
    return 1 if bad else 0
