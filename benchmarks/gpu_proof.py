"""The GPU proof: every GPU measurement llama-ft owes, in one command of about 9 minutes on one H100 / H200.

    bash benchmarks/gpu_proof.sh [--dry-run] [--wheels DIR] [--budget S] [--stages LIST] OUTDIR

A GPU is lent to few sessions, for minutes, on a machine that reaches no package registry. So the run is
made of stages, each with its own time limit; each writes its result as it finishes (OUTDIR/gpu_proof.json,
rewritten atomically, and OUTDIR/gpu_proof.md, a table ready for BENCHMARKS.md with the device, date and
commands; OUTDIR/gpu_proof.log holds the tail of every command's output). A stage that fails or runs out of
time is recorded with its reason and the next one starts; a stage that no longer fits in --budget is
skipped with that reason. A run cut short therefore still returns every stage that finished.

Stages (what is measured; the GPU form, then what --dry-run does instead on CPU):
 1. env          installs the wheels of --wheels DIR (`pip install --no-index --no-deps --target`, put on
                 PYTHONPATH: the GPU image lacks deepspeed, hjson, pydantic and datasets, see gpu_wheels.sh),
                 then records the versions of everything the later stages import, the GPU (name, memory,
                 capability, CUDA, NCCL, driver), a bf16 matmul on it, and any carried wheel whose declared
                 requirements the image does not meet. Failed if a package does not import or (GPU form) CUDA
                 is not available.
 2. gpu_tests    `pytest -m gpu -x -q` on the test files that have gpu-marked tests: the Triton kernels at
                 real sizes against PyTorch and float64, pinned offload. Dry run: the same command; every
                 test skips without CUDA, so the stage is "skipped" with that reason.
 3. fp8_kernels  benchmarks/fp8_lora_linear.py at the 8B and 70B layer shapes (q, gate, down; 4,096 tokens;
                 r 16 and 64): ours weight-only, ours fp8 compute, bf16 F.linear + eager LoRA, forward +
                 backward, CUDA-event medians, and the float64 error check. Dry run: --smoke (tiny q_proj)
                 with TRITON_INTERPRET=1, so the Triton kernels themselves run, on CPU.
 4. throughput   benchmarks/train_throughput.py --shape 8b (random weights) on one GPU: llama-ft packed bf16,
                 llama-ft packed FP8, HF Trainer + PEFT + ZeRO-3: trained and all tokens/s, model TFLOP/s,
                 MFU (against the device's dense bf16 peak), peak torch.cuda.max_memory_allocated.
                 Dry run: the tiny shape, one CPU rank, 3 steps, HF only (llama-ft's run: stage 5).
 5. capacity     a 70B-shape FP8 LoRA run (r 64, one packed row of 2,048 tokens, gradient checkpointing,
                 --offload_ratio auto) for 4 steps on one GPU, beside `llama-ft plan --json` for the very
                 same flags: predicted vs measured peak memory (max_memory_allocated against the plan's total
                 less its CUDA context and fragmentation margin; max_memory_reserved against the total less the
                 context), the offload ratio auto chose, step time. Dry run: the tiny shape, one CPU rank, peak
                 RSS against the CPU-rank plan.
 6. load         benchmarks/load.py writes a random 70B-shape FP8 checkpoint (llama-ft's pre-quantized layout)
                 to the machine's local disk, with 16 of the 80 layers (8 or 4 when less time is left: a whole
                 one is ~70 GB, more than the disk and the minutes allow), empties the page cache, and times
                 streaming it into one GPU with half of the frozen base partitions offloaded to pinned host
                 memory; the 80-layer time is extrapolated from the bytes, and labelled so. Dry run: 2 layers
                 of a tiny shape, page cache left warm.

Exit status: 0 when every stage run is ok (or skipped for lack of CUDA in a dry run), 1 when one failed or
timed out, 2 for bad input (one line), 128 + N when stopped by signal N (the JSON says which stage).
"""

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
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):  # the benchmark scripts as modules; llama_ft.fsutil (stdlib only)
    if _p not in sys.path:
        sys.path.insert(0, _p)

import load as load_bench  # noqa: E402 - stdlib-only at import, like train_throughput
import train_throughput  # noqa: E402

from llama_ft.fsutil import atomic_write_text  # noqa: E402

GiB = 2**30
PROG = "gpu_proof"
LOG_TAIL_CHARS = 40_000  # per command, in gpu_proof.log (the whole output stays in the scratch folder)
REQUIRED = ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "deepspeed",
            "hjson", "pydantic", "datasets", "numpy", "psutil")
"""What the stages import; each is recorded with its version, or the error that stopped its import."""
# Dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity), for MFU; matched against the device
# name in this order. A device not listed gets no MFU (model TFLOP/s are still reported).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0))
FP8_METHODS = "weight_only,fp8_compute,bf16_lora"
DRY_FP8_TOKENS = "64"  # one 64-row tile: the interpreter's cost grows with the programs it runs


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


def peak_bf16_tflops(device: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS:
        if name in device:
            return peak
    return None


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


# ---------------------------------------------------------------------------------------------------------------
# stage 1: environment


def env_probe(path: Path) -> None:
    """Run by stage 1 in the stages' environment: versions, import errors, the GPU; written as JSON to `path`."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable, "versions": {},
                            "import_errors": {}, "cpus": os.cpu_count()}
    for mod in REQUIRED:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import
                m = __import__(mod)
            try:
                info["versions"][mod] = version(mod)
            except PackageNotFoundError:
                info["versions"][mod] = str(getattr(m, "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - recorded, the stage decides
            info["import_errors"][mod] = f"{type(e).__name__}: {e}"[:300]
    with contextlib.suppress(OSError, ValueError):
        mem = Path("/proc/meminfo").read_text()
        info["host_memory_bytes"] = int(re.search(r"MemTotal:\s+(\d+)", mem).group(1)) * 1024
    info["scratch_free_bytes"] = shutil.disk_usage(Path(path).parent).free
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                        gpu_memory_bytes=props.total_memory, capability=list(torch.cuda.get_device_capability(0)),
                        nccl=".".join(map(str, torch.cuda.nccl.version())))
            x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = x @ x
            torch.cuda.synchronize()
            info["bf16_matmul_4096_ms"] = (time.perf_counter() - t0) * 1e3  # includes the first cuBLAS call
            info["bf16_matmul_finite"] = bool(torch.isfinite(y).all())
    except Exception as e:  # noqa: BLE001
        info["cuda_error"] = f"{type(e).__name__}: {e}"[:300]
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                                                 "--format=csv,noheader"], capture_output=True, text=True,
                                                timeout=20).stdout.strip()
    site = os.environ.get("LLAMA_FT_PROOF_SITE")
    if site:  # declared requirements of the carried wheels that the image does not meet (a mismatch, not a stop)
        try:
            from packaging.requirements import Requirement

            unmet = []
            for dist in distributions(path=[site]):
                for text in dist.requires or []:
                    req = Requirement(text)
                    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                        continue
                    try:
                        have = version(req.name)
                    except PackageNotFoundError:
                        have = None
                    if have is None or not req.specifier.contains(have, prereleases=True):
                        unmet.append(f"{dist.metadata['Name']} needs {text} (found {have or 'nothing'})")
            info["carried_unmet_requirements"] = sorted(set(unmet))
        except Exception as e:  # noqa: BLE001
            info["carried_unmet_requirements"] = [f"not checked: {type(e).__name__}: {e}"]
    Path(path).write_text(json.dumps(info))


def stage_env(p: Proof, limit: float) -> dict[str, Any]:
    commands, installed = [], []
    t0 = time.monotonic()
    if p.args.wheels:
        wheels = sorted(p.args.wheels.glob("*.whl"))
        site = p.scratch / "site"
        shutil.rmtree(site, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
        commands.append(f"python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                        f"--target {site} {p.args.wheels}/*.whl")
        ran = p.run(cmd, limit, "env-pip")
        if ran.rc != 0:
            return {"status": "timeout" if ran.rc == 124 else "failed", "commands": commands,
                    "reason": f"pip install of {len(wheels)} wheels from {p.args.wheels}: {ran.why(limit)}"}
        installed = [w.name for w in wheels]
        p.env["LLAMA_FT_PROOF_SITE"] = str(site)
    probe_file = p.scratch / "env.json"
    probe_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--env-probe", str(probe_file)]
    commands.append(shown(cmd))
    ran = p.run(cmd, max(5.0, limit - (time.monotonic() - t0)), "env-probe")
    if ran.rc != 0 or not probe_file.exists():
        return {"status": "timeout" if ran.rc == 124 else "failed", "commands": commands,
                "reason": f"environment probe: {ran.why(limit)}"}
    info = json.loads(probe_file.read_text())
    info["wheels_installed"] = installed
    head = p.report["header"]
    head.update(python=info["python"], versions=info["versions"], torch_cuda=info.get("torch_cuda"),
                nccl=info.get("nccl"), nvidia_smi=info.get("nvidia_smi"))
    if info.get("cuda_available"):
        head["device"] = f"{info['device_count']}x {info['device']}, {info['gpu_memory_bytes'] / GiB:.1f} GiB"
        head["gpu_name"] = info["device"]
    else:
        head["device"] = (f"CPU ({platform.machine()}, {info['cpus']} cores, "
                          f"{info.get('host_memory_bytes', 0) / GiB:.0f} GiB), no GPU")
    p.env_info = info
    missing = sorted(info["import_errors"])
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k in ("torch", "triton", "deepspeed",
                                                                            "transformers", "peft", "datasets"))
    summary = f"{head['device']}; {vers}" + (f"; {len(installed)} wheels installed" if installed else "")
    result = {"commands": commands, "results": info, "summary": summary}
    if missing:
        errors = ", ".join(f"{m} ({info['import_errors'][m]})" for m in missing)
        return {**result, "status": "failed", "reason": f"does not import: {errors}; carry it with "
                                                        "`bash benchmarks/gpu_wheels.sh DIR` and --wheels DIR"}
    if not p.dry and not info.get("cuda_available"):
        return {**result, "status": "failed",
                "reason": f"torch.cuda.is_available() is False ({info.get('cuda_error', 'no CUDA device')})"}
    if info.get("cuda_available") and not info.get("bf16_matmul_finite"):
        return {**result, "status": "failed", "reason": "a bf16 matmul on the GPU gave non-finite values"}
    return {**result, "status": "ok"}


# ---------------------------------------------------------------------------------------------------------------
# stage 2: pytest -m gpu


def gpu_test_files() -> list[Path]:
    """Test files with gpu-marked tests: collecting only these keeps the stage from importing the whole suite."""
    return sorted(f for f in (REPO / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())


def junit_cases(path: Path) -> list[dict[str, Any]]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), (el.get("message") or "")[:300]
                break
        cases.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return cases


def stage_gpu_tests(p: Proof, limit: float) -> dict[str, Any]:
    xml = p.scratch / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    files = [str(f) for f in gpu_test_files()]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *files]
    ran = p.run(cmd, limit, "gpu-tests")
    cases = junit_cases(xml) if xml.exists() else []
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    result = {"commands": [shown(cmd)], "results": {"files": [os.path.relpath(f, REPO) for f in files],
                                                    "counts": counts, "cases": cases}}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no tests"
    result["summary"] = summary
    if ran.rc == 124:
        return {**result, "status": "timeout", "reason": f"{ran.why(limit)} ({summary} by then)"}
    if counts["failed"] or counts["error"]:
        first = next(c for c in cases if c["outcome"] in ("failed", "error"))
        return {**result, "status": "failed", "reason": f"{first['test']}: {first['message']}"}
    if ran.rc not in (0, 5):  # 5: nothing collected
        return {**result, "status": "failed", "reason": ran.why(limit)}
    if cases and counts["skipped"] == len(cases):
        whys = sorted({c["message"] for c in cases})
        return {**result, "status": "skipped",
                "reason": f"no CUDA device: pytest ran the {len(cases)} gpu-marked tests of {len(files)} files "
                          f"and skipped each ({'; '.join(whys)})"}
    if not cases:
        return {**result, "status": "failed", "reason": "no gpu-marked test was collected"}
    return {**result, "status": "ok"}


# ---------------------------------------------------------------------------------------------------------------
# stage 3: FP8 kernel table


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if finite(x) and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def stage_fp8_kernels(p: Proof, limit: float) -> dict[str, Any]:
    out = p.scratch / "fp8_lora_linear.json"
    out.unlink(missing_ok=True)
    shape = (["--smoke", "--layers", "q", "--tokens", DRY_FP8_TOKENS, "--warmup", "1", "--iters", "1"] if p.dry else
             ["--models", "8b,70b", "--layers", "q,gate,down", "--tokens", "4096", "--ranks", "16,64"])
    cmd = [sys.executable, str(HERE / "fp8_lora_linear.py"), *shape, "--methods", FP8_METHODS, "--json", str(out)]
    ran = p.run(cmd, limit, "fp8-kernels")
    result: dict[str, Any] = {"commands": [("TRITON_INTERPRET=1 " if p.dry else "") + shown(cmd)]}
    if ran.rc != 0 or not out.exists():
        return {**result, "status": "timeout" if ran.rc == 124 else "failed", "reason": ran.why(limit)}
    report = json.loads(out.read_text())
    models = {}
    for model in dict.fromkeys(r["model"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["model"] == model]
        errs = [r["rel_err_weight_only"] for r in rows if finite(r["rel_err_weight_only"])]
        wo = geomean([r["results"]["weight_only"].get("speedup_vs_bf16_lora") for r in rows])
        f8 = geomean([r["results"]["fp8_compute"].get("speedup_vs_bf16_lora") for r in rows])
        models[model] = {"weight_only_speedup": wo, "fp8_compute_speedup": f8,
                         "worst_rel_err_weight_only": max(errs) if errs else None,
                         "goals": {"weight_only >= 1.0x bf16 + eager LoRA": None if wo is None else wo >= 1.0,
                                   "fp8_compute >= 1.4x": None if f8 is None else f8 >= 1.4,
                                   "weight-only rel err <= 1e-2": max(errs) <= 1e-2 if errs else None}}
    unmeasured = [f"{r['model']} {r['layer']} r={r['r']} {m}: {r['results'][m]['unavailable']}"
                  for r in report["rows"] for m in FP8_METHODS.split(",") if "ms" not in r["results"][m]]
    summary = "; ".join(f"{m}: weight-only {v['weight_only_speedup'] or float('nan'):.2f}x, fp8 compute "
                        f"{v['fp8_compute_speedup'] or float('nan'):.2f}x vs bf16 + eager LoRA (geomean), worst "
                        f"weight-only rel err {v['worst_rel_err_weight_only'] or float('nan'):.1e}"
                        for m, v in models.items())
    result.update(results={"models": models, "rows": report["rows"], "header": report["header"]},
                  table_md=ran.stdout.strip(), summary=summary)
    if unmeasured:
        return {**result, "status": "failed", "reason": f"not measured: {unmeasured[0]}"}
    return {**result, "status": "ok"}


# ---------------------------------------------------------------------------------------------------------------
# stages 4 and 5: training runs (benchmarks/train_throughput.py)

THROUGHPUT_GPU = ["--shape", "8b", "--methods", "ours_packed,ours_fp8,hf", "--nproc", "1", "--steps", "8",
                  "--warmup", "3"]
# The dry run (a CI test) trains only the HF peer here: each training run costs about 20 CPU seconds of process
# start-up on 2 cores, and llama-ft's FP8 run, the same path as its bf16 one with --quantize, is rehearsed by
# the capacity stage.
THROUGHPUT_DRY = ["--smoke", "--methods", "hf", "--nproc", "1", "--steps", "3", "--warmup", "1"]
CAPACITY_GPU = ["--shape", "70b", "--methods", "ours_fp8", "--nproc", "1", "--batch", "1", "--seq", "2048",
                "--lora-r", "64", "--gradient-checkpointing", "--offload-ratio", "auto", "--steps", "4",
                "--warmup", "2"]
CAPACITY_DRY = ["--smoke", "--methods", "ours_fp8", "--nproc", "1", "--batch", "1", "--seq", "256",
                "--gradient-checkpointing", "--offload-ratio", "auto", "--steps", "3", "--warmup", "1"]


def run_training(p: Proof, limit: float, name: str, flags: list[str]) -> tuple[dict[str, Any], dict | None, Ran]:
    out, work = p.scratch / f"{name}.json", p.scratch / name
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "train_throughput.py"), *flags, "--timeout", f"{limit:.0f}", "--dir",
           str(work), "--json", str(out)]
    ran = p.run(cmd, limit, name)
    # The checkpoints the runs end with (optimizer states: 10 GiB at the 70B shape) are not needed: free the disk
    # for the load stage's checkpoint. Logs and metrics stay.
    for ckpt in work.glob("runs/*/output/checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"commands": [shown(cmd)]}, (json.loads(out.read_text()) if out.exists() else None), ran


def method_figures(p: Proof, res: dict[str, Any]) -> dict[str, Any]:
    """The figures of one measured method, with MFU where the device's peak is known."""
    peak = peak_bf16_tflops(p.report["header"].get("gpu_name", ""))
    return {"trained_tokens_per_s": res["trained_tokens_per_s"], "tokens_per_s": res["tokens_per_s"],
            "step_time_s": res["step_time_s"], "model_tflops_per_s": res["model_tflops_per_s"],
            "mfu": res["model_tflops_per_s"] / peak if peak else None, "peak_bf16_tflops": peak,
            "peak_memory_bytes": res["peak_memory_bytes"], "peak_memory_kind": res["peak_memory_kind"]}


def stage_throughput(p: Proof, limit: float) -> dict[str, Any]:
    result, report, ran = run_training(p, limit, "throughput", THROUGHPUT_DRY if p.dry else THROUGHPUT_GPU)
    if report is None:
        return {**result, "status": "timeout" if ran.rc == 124 else "failed", "reason": ran.why(limit)}
    asked = report["config"]["methods"]
    methods = {m: method_figures(p, report["methods"][m]) for m in asked
               if "trained_tokens_per_s" in report["methods"][m]}
    r = report["ratios"]
    c = report["config"]
    summary = f"shape {c['shape']}, {c['dtype']}, {c['nproc']} rank(s): " + "; ".join(
        f"{report['method_labels'][m]} {f['trained_tokens_per_s']:,.0f} trained tok/s"
        + (f", MFU {100 * f['mfu']:.1f}%" if f["mfu"] is not None else f", {f['model_tflops_per_s']:.3g} TFLOP/s")
        + f", {f['peak_memory_bytes'] / GiB:.1f} GiB" for m, f in methods.items())
    if r.get("ours_packed_vs_hf") is not None:
        summary += f"; ours/HF {r['ours_packed_vs_hf']:.2f}x bf16, {r['ours_fp8_vs_hf'] or float('nan'):.2f}x FP8"
    result.update(results={"methods": methods, "ratios": r, "config": report["config"], "header": report["header"],
                           "goal_ours_vs_hf_1_5x": None if r.get("ours_packed_vs_hf") is None
                           else r["ours_packed_vs_hf"] >= 1.5},
                  table_md=ran.stdout.strip(), summary=summary)
    missing = [f"{m}: {report['methods'][m].get('failed') or report['methods'][m].get('unavailable')}"
               for m in asked if m not in methods]
    if missing:
        return {**result, "status": "failed", "reason": "; ".join(missing)[:500]}
    return {**result, "status": "ok"}


def capacity_flags(p: Proof) -> tuple[argparse.Namespace, list[str]]:
    """The capacity run's arguments as train_throughput parses them, and the training flags of its run: the
    planner is asked about exactly these."""
    try:
        args = train_throughput.parse_args(CAPACITY_DRY if p.dry else CAPACITY_GPU)
    except SystemExit as e:  # its one-line refusal is on stderr already
        raise RuntimeError(f"train_throughput.py refused the capacity flags (exit {e.code})") from None
    args.bf16 = not p.dry  # what train_throughput's device_setup decides: bf16 on a GPU, fp32 on CPU
    return args, train_throughput.ours_flags(args, "ours_fp8")


def stage_capacity(p: Proof, limit: float) -> dict[str, Any]:
    args, flags = capacity_flags(p)
    result, report, ran = run_training(p, max(10.0, limit - 15), "capacity", CAPACITY_DRY if p.dry else CAPACITY_GPU)
    info = p.env_info
    model_dir = p.scratch / "capacity" / f"model-{args.shape}"
    model = str(model_dir) if (model_dir / "config.json").exists() else args.shape
    # the machine as the run's own `--offload_ratio auto` sees it (llama_ft/train/memory_plan.py this_machine)
    machine = ["--host_memory_gb", f"{info.get('host_memory_bytes', 0) / GiB:.4f}"] + (
        ["--device", "cpu"] if p.dry else ["--gpu_memory_gb", f"{info.get('gpu_memory_bytes', 0) / GiB:.4f}"])
    plan_cmd = [sys.executable, "-m", "llama_ft.cli", "plan", model, "--json", "--nodes", "1", "--gpus_per_node",
                "1", *machine, "--", *flags, "--deepspeed", str(REPO / "ds_configs" / "zero3.json")]
    result["commands"].append(shown(plan_cmd))
    planned = p.run(plan_cmd, 60, "capacity-plan")
    plan = None
    with contextlib.suppress(ValueError):
        plan = json.loads(planned.stdout) if planned.rc in (0, 1) else None  # 1: "does not fit", still a plan
    res: dict[str, Any] = {"shape": args.shape, "train_flags": flags}
    if plan is not None:
        from llama_ft.train.memory_plan import planned_peak_bytes  # torch: after stage 1's wheels

        per = plan["per_gpu"]
        # max_memory_allocated against the plan less the CUDA context and the fragmentation margin
        # (llama_ft/train/memory_plan.py planned_peak_bytes), max_memory_reserved against the total less the
        # context. A CPU rank's RSS holds it all.
        context = per.get("cuda_context_bytes", 0)
        predicted = planned_peak_bytes(per, "cpu" if p.dry else "cuda")
        res.update(predicted_bytes=predicted, predicted_reserved_bytes=per["total_bytes"] - context,
                   predicted_total_bytes=per["total_bytes"], plan_fits=plan["fits"],
                   plan_min_offload_ratio=plan["min_offload_ratio"], plan_peak_at=plan["peak_at"],
                   plan_dominant_term=plan["dominant_term"], plan_per_gpu=per)
    else:
        res["plan_error"] = planned.why(60)
    measured = report["methods"].get("ours_fp8", {}) if report else {}
    if "trained_tokens_per_s" in measured:
        res.update(measured_bytes=measured["peak_memory_bytes"], measured_kind=measured["peak_memory_kind"],
                   run=method_figures(p, measured), flags_match=measured["train_flags"] == flags)
        reserved = [b for b in measured.get("cuda_max_reserved_bytes_per_rank", []) if b]
        if reserved:
            res["measured_reserved_bytes"] = max(reserved)
        log = p.scratch / "capacity" / "runs" / "ours_fp8" / "log.txt"
        used = re.search(r"--offload_ratio auto: ([0-9.]+)", log.read_text(errors="replace")) if log.exists() else None
        res["offload_ratio_used"] = float(used.group(1)) if used else None
    if "predicted_bytes" in res and "measured_bytes" in res:
        res["error"] = (res["predicted_bytes"] - res["measured_bytes"]) / res["measured_bytes"]
        res["goal"] = 0.15 if p.dry else 0.10  # DESIGN.md: within 10% on GPU, 15% on CPU
        res["within_goal"] = abs(res["error"]) <= res["goal"]
        if "measured_reserved_bytes" in res:
            res["error_reserved"] = ((res["predicted_reserved_bytes"] - res["measured_reserved_bytes"])
                                     / res["measured_reserved_bytes"])
    result["results"] = res
    if report is not None:
        result["table_md"] = ran.stdout.strip()
    what = "peak RSS" if p.dry else "max_memory_allocated"
    if "measured_bytes" in res:
        result["summary"] = (f"{args.shape} FP8, {what} {res['measured_bytes'] / GiB:.2f} GiB"
                             + (f" vs planner {res['predicted_bytes'] / GiB:.2f} GiB ({100 * res['error']:+.1f}%)"
                                if "error" in res else "")
                             + f", offload ratio {res.get('offload_ratio_used')}, "
                             f"step {res['run']['step_time_s']:.2f} s")
    if ran.rc == 124:
        return {**result, "status": "timeout", "reason": ran.why(limit)}
    if "measured_bytes" not in res:
        why = measured.get("failed") if report else ran.why(limit)
        return {**result, "status": "failed", "reason": f"the 70B-shape run: {why or 'no figures'}"}
    if plan is None:
        return {**result, "status": "failed", "reason": f"llama-ft plan: {res['plan_error']}"}
    if not res["flags_match"]:  # then the prediction would be for another run than the one measured
        return {**result, "status": "failed", "reason": f"the run's training flags {measured['train_flags']} "
                                                        f"differ from those the planner was given {flags}"}
    return {**result, "status": "ok"}


# ---------------------------------------------------------------------------------------------------------------
# stage 6: load


def full_fp8_bytes(shape: str, layers: int) -> int:
    """Bytes of the llama-ft FP8 checkpoint of `shape` with `layers` layers (the quantized linears at 1 byte
    plus their float32 128x128 block scales, norms, embeddings and LM head in bf16)."""
    d = load_bench.SHAPES[shape]
    h, i, v = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    kv = d["num_key_value_heads"] * (h // d["num_attention_heads"])
    linears = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    blocks = sum(-(-n // 128) * -(-k // 128) for n, k in linears)
    per_layer = sum(n * k for n, k in linears) + 4 * blocks + 2 * 2 * h
    head = 2 * v * h * (1 if d["tie_word_embeddings"] else 2) + 2 * h
    return layers * per_layer + head


def stage_load(p: Proof, limit: float) -> dict[str, Any]:
    out = p.scratch / "load.json"
    out.unlink(missing_ok=True)
    if p.dry:
        shape, layers, extra = "tiny", 2, []
    else:  # fewer layers when less time or disk is left: the write and a cold read both scale with them
        free = shutil.disk_usage(p.scratch).free
        fits = [n for n, secs in ((16, 140), (8, 90), (4, 0))
                if limit >= secs and 1.2 * full_fp8_bytes("70b", n) < free]
        if not fits:
            return {"status": "skipped", "reason": f"{free / GiB:.1f} GiB free at {p.scratch}: not enough for 4 layers "
                                                   f"of the 70B shape ({full_fp8_bytes('70b', 4) / GiB:.1f} GiB)"}
        shape, layers, extra = "70b", fits[0], ["--drop-caches"]
    cmd = [sys.executable, str(HERE / "load.py"), "--shape", shape, "--layers", str(layers), "--fp8", "--nproc", "1",
           "--loaders", "stream", "--offload-ratio", "0.5", *extra, "--dir", str(p.scratch / "load"),
           "--json", str(out)]
    ran = p.run(cmd, limit, "load")
    result: dict[str, Any] = {"commands": [shown(cmd)]}
    if ran.rc != 0 or not out.exists():
        return {**result, "status": "timeout" if ran.rc == 124 else "failed", "reason": ran.why(limit)}
    report = json.loads(out.read_text())
    row = report["rows"][0]
    full_layers = load_bench.SHAPES[shape]["num_hidden_layers"]
    ckpt = report["checkpoint_bytes"]
    full = full_fp8_bytes(shape, full_layers)
    res = {"shape": shape, "layers": layers, "of_layers": full_layers, "checkpoint_bytes": ckpt,
           "write_seconds": report["write_seconds"], "load_seconds": row["seconds"],
           "gib_per_s": ckpt / GiB / row["seconds"], "bytes_read": row["bytes_read"],
           "read_vs_checkpoint": row["bytes_read"] / ckpt, "peak_rss_bytes": row["peak_rss_bytes"],
           "cuda_max_allocated_bytes": row.get("cuda_max_allocated_bytes"),
           "partition_bytes_gpu": row.get("partition_bytes_gpu"),
           "partition_bytes_host": row.get("partition_bytes_host"),
           "offload": row.get("offload"), "page_cache": report["page_cache"].get("stream"),
           # the formula the extrapolation uses, at the layers written: equal to the checkpoint's bytes
           "formula_bytes_at_these_layers": full_fp8_bytes(shape, layers),
           "full_checkpoint_bytes": full, "full_load_seconds_extrapolated": row["seconds"] * full / ckpt}
    result.update(results=res, table_md=ran.stdout.strip(),
                  summary=f"{layers} of {full_layers} layers, {ckpt / GiB:.2f} GiB in {row['seconds']:.1f} s "
                          f"({res['gib_per_s']:.2f} GiB/s, page cache {res['page_cache']}), read "
                          f"{res['read_vs_checkpoint']:.2f}x; all {full_layers} layers ({full / GiB:.1f} GiB) "
                          f"~{res['full_load_seconds_extrapolated']:.0f} s extrapolated, not measured")
    return {**result, "status": "ok"}


STAGES = [
    Stage("env", "environment", stage_env, 90, 90, 0),
    Stage("gpu_tests", "pytest -m gpu", stage_gpu_tests, 90, 90),
    Stage("fp8_kernels", "FP8 LoRA linear kernels", stage_fp8_kernels, 110, 90),
    Stage("throughput", "training throughput, 8B shape, one GPU", stage_throughput, 200, 200, 60),
    Stage("capacity", "capacity: 70B-shape FP8 LoRA on one GPU vs the planner", stage_capacity, 170, 150, 60),
    Stage("load", "load: 70B-shape FP8 checkpoint into one GPU with offload", stage_load, 150, 90, 45),
]


# ---------------------------------------------------------------------------------------------------------------
# the markdown


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


# ---------------------------------------------------------------------------------------------------------------
# arguments and main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog="gpu_proof.sh", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
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


if __name__ == "__main__":
    sys.exit(main())
