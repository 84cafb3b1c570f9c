"""The runner of the GPU proof: a stage's record (Stage), one command's outcome (Ran), the run itself (Proof: the
stages' environment, each command in its own process group stopped with all it started at its limit, the
results saved after every stage) and the markdown report. Stages live in gpu_proof/stages/, one module each;
the order they run in is the STAGES table of gpu_proof/stages/__init__.py. Standard library only."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):  # the benchmark scripts as modules; llama_ft.fsutil (stdlib only)
    if _p not in sys.path:
        sys.path.insert(0, _p)

from llama_ft.fsutil import atomic_write_text  # noqa: E402

GiB = 2**30
PROG = "gpu_proof"
LOG_TAIL_CHARS = 40_000  # per command, in gpu_proof.log (the whole output stays in the scratch folder)


class UsageError(Exception):
    """Bad input: printed as one line, exit 2, nothing written."""


class Interrupted(Exception):
    """SIGTERM / SIGINT / SIGHUP during the run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Stage:
    """One stage: its runner, its time limit on a GPU and in a dry run, and the least time worth starting it."""

    key: str
    title: str
    run: Callable[[Proof, float], dict[str, Any]]
    limit_s: float
    dry_limit_s: float
    min_s: float = 30.0


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def shown(cmd: list[str]) -> str:
    """A command as a reader would type it from the repository root."""
    parts = ["python" if c == sys.executable else os.path.relpath(c, REPO) if c.startswith(str(REPO) + "/")
             else c for c in cmd]
    return shlex.join(parts)


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _children_cpu_s() -> float:
    """User + system CPU seconds of every finished child process so far (the stages' commands and theirs)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (by parent links in /proc): the ranks a launcher started in sessions of their
    own are not in the stage's process group, and would hold the GPU into the next stage."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGINT first (the benchmark scripts then kill the jobs they started), then SIGKILL whatever is left."""
    family = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for pid in [proc.pid, *family, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Ran:
    """One command's outcome: exit code (124: stopped at its limit), seconds, its stdout and stderr tails."""

    rc: int
    seconds: float
    stdout: str
    stderr: str

    def why(self, limit: float) -> str:
        if self.rc == 124:
            return f"stopped at its {limit:.0f} s limit"
        lines = [ln.strip() for ln in (self.stderr + "\n" + self.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.search(r"(Error|error|Exception|FAILED)\b", ln)]
        return f"exit {self.rc}: {(errors or lines or ['no output'])[-1][:300]}"


class Proof:
    """The run: arguments, environment of the stages, results so far, and the files in OUTDIR."""

    def __init__(self, args: argparse.Namespace, stages: list[Stage]) -> None:
        self.args, self.stages = args, stages
        self.dry = args.dry_run
        self.out: Path = args.outdir
        self.scratch: Path = args.scratch
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.env = self._env()
        self.logs: list[str] = []
        self.current: subprocess.Popen | None = None
        self.env_info: dict[str, Any] = {}  # stage 1's probe: versions, the GPU, memory sizes
        self.report: dict[str, Any] = {
            "header": {"date": utc_now(), "dry_run": self.dry, "budget_s": args.budget,
                       "command": "bash benchmarks/gpu_proof.sh " + shlex.join(args.argv),
                       "commit": self._commit(), "host": platform.node(), "device": "(stage 1 not run)"},
            "stages": [{"stage": i + 1, "key": s.key, "title": s.title, "status": "pending"}
                       for i, s in enumerate(stages)],
        }

    # -- environment and commands -------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        site = self.scratch / "site"
        paths = ([str(site)] if self.args.wheels else []) + [str(REPO)]
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
        bins = [str(Path(sys.executable).parent)] + ([str(site / "bin")] if self.args.wheels else [])
        env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llama-ft" / "torch_extensions"))
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1")
        if self.dry:
            env["TRITON_INTERPRET"] = "1"  # Triton kernels run on CPU tensors (read when a kernel is defined)
            env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run stays on CPU even on a GPU machine
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    @staticmethod
    def _commit() -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    def run(self, cmd: list[str], limit: float, name: str) -> Ran:
        """Run `cmd` from the repository root in its own process group; at `limit` seconds stop it and all it
        started. Output goes to scratch/logs/NAME.{out,err}; the tails to gpu_proof.log."""
        logs = self.scratch / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
        t0 = time.monotonic()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            self.current = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = self.current.wait(timeout=max(1.0, limit))
            except subprocess.TimeoutExpired:
                stop_tree(self.current)
                rc = 124
            finally:
                if self.current.poll() is None:  # interrupted: take the stage down with us
                    stop_tree(self.current)
                self.current = None
        ran = Ran(rc, time.monotonic() - t0, out_path.read_text(errors="replace"),
                  err_path.read_text(errors="replace"))
        self.logs.append(f"===== {name}: {shown(cmd)}\n===== exit {rc} after {ran.seconds:.1f} s\n"
                         f"--- stdout (tail)\n{ran.stdout[-LOG_TAIL_CHARS // 4:]}\n"
                         f"--- stderr (tail)\n{ran.stderr[-LOG_TAIL_CHARS:]}\n")
        return ran

    # -- results ------------------------------------------------------------------------------------------------

    def stage_result(self, key: str) -> dict[str, Any]:
        return next(s for s in self.report["stages"] if s["key"] == key)

    def save(self) -> None:
        """Rewrite gpu_proof.json, gpu_proof.md and gpu_proof.log, each through a temporary file and a rename."""
        self.report["header"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
        atomic_write_text(self.out / "gpu_proof.json", json.dumps(self.report, indent=1, default=str) + "\n")
        atomic_write_text(self.out / "gpu_proof.md", markdown(self.report))
        atomic_write_text(self.out / "gpu_proof.log", "\n".join(self.logs))

    def run_stage(self, stage: Stage) -> None:
        res = self.stage_result(stage.key)
        remaining = self.deadline - time.monotonic()
        if stage.key not in self.args.stages:
            res.update(status="skipped", reason="not run (--stages)")
            return
        if stage.key != "env" and remaining < stage.min_s:
            res.update(status="skipped", reason=f"no time left: {max(0.0, remaining):.0f} s of the --budget "
                                                f"{self.args.budget:.0f} s remained, the stage needs at least "
                                                f"{stage.min_s:.0f} s")
            return
        limit = stage.dry_limit_s if self.dry else stage.limit_s
        if stage.key != "env":  # stage 1 always runs, in full: every later stage reads what it records
            limit = min(limit, max(remaining, 10.0))
        res.update(status="running", limit_s=round(limit), started=utc_now())
        self.save()  # a run killed now still shows where it was
        t0, cpu0 = time.monotonic(), _children_cpu_s()
        try:
            res.update(stage.run(self, limit))
        except Interrupted:
            res.update(status="interrupted", reason="the proof was stopped by a signal during this stage",
                       seconds=round(time.monotonic() - t0, 1))
            raise
        except Exception as e:  # noqa: BLE001 - a stage's own bug is its failure, not the end of the proof
            res.update(status="failed", reason=f"{type(e).__name__}: {e}"[:500])
        res["seconds"] = round(time.monotonic() - t0, 1)
        res["cpu_seconds"] = round(_children_cpu_s() - cpu0, 1)  # host CPU its commands used (user + system)
        print(f"[{PROG}] stage {res['stage']} {stage.key}: {res['status']}, {res['seconds']:.0f} s"
              + (f"; {res['summary']}" if res.get("summary") else "")
              + (f"; {res['reason']}" if res.get("reason") else ""), file=sys.stderr, flush=True)


# -- the markdown -------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    h = report["header"]
    v = h.get("versions", {})
    vers = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "deepspeed", "transformers", "peft", "datasets")
                     if k in v)
    out = [f"### GPU proof{' (dry run on CPU)' if h['dry_run'] else ''}: {h['device']}, {h['date']}", "",
           f"`{h['command']}` at commit {h['commit']}; {vers or 'versions: stage 1 not run'}"
           + (f"; CUDA {h['torch_cuda']}, NCCL {h['nccl']}" if h.get("torch_cuda") and h.get("nccl") else "")
           + (f"; nvidia-smi: {h['nvidia_smi']}" if h.get("nvidia_smi") else "")
           + f"; {h.get('elapsed_s', 0):.0f} s of the {h['budget_s']:.0f} s budget", "",
           "| stage | status | s | result |", "|---|---|--:|---|"]
    for s in report["stages"]:
        text = s.get("summary", "")
        if s.get("reason"):
            text = f"{text}; {s['reason']}" if text else s["reason"]
        text = text.replace("|", "\\|").replace("\n", " ")
        secs = f"{s['seconds']:.0f}" if "seconds" in s else ""
        out.append(f"| {s['stage']}. {s['title']} | {s['status']} | {secs} | {text} |")
    out += ["", "Commands (from the repository root, PYTHONPATH=.):", ""]
    for s in report["stages"]:
        for c in s.get("commands", []):
            out.append(f"- {s['stage']}: `{c}`")
    for s in report["stages"]:
        if s.get("table_md"):
            out += ["", f"#### {s['stage']}. {s['title']}", "", s["table_md"]]
    return "\n".join(out) + "\n"
