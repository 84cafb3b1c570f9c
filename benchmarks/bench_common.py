"""What the benchmark scripts share (importable because a script's own folder is on sys.path): the repository root
on sys.path, their log and bad-input lines, the peak-memory probe of a rank, launching and stopping jobs, model
directories and data files of exact lengths, JSON / JSONL output, the run header and the report printer."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # llama_ft importable: a script runs from anywhere without installing


def script_messages(name: str | None = None) -> tuple[Callable[[str], None], Callable[[str], NoReturn]]:
    """log(msg) and die(msg) of a benchmark script: `[NAME] msg` on stderr, and for bad input the one line
    `NAME.py: error: msg` on stderr, exit code 2. NAME: `name`, or (None) the script that runs, read at each call,
    so that a script another one imports logs and refuses under the name of the one that runs."""

    def log(msg: str) -> None:
        print(f"[{name or Path(sys.argv[0]).stem}] {msg}", file=sys.stderr, flush=True)

    def die(msg: str) -> NoReturn:
        print(f"{f'{name}.py' if name else Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)
        sys.exit(2)

    return log, die


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send stdout (Python's and fd 1, for compiler subprocesses) to stderr: stdout carries only the table.

    DeepSpeed's logger writes to the sys.stdout of its import, and its op builder's JIT compile to fd 1.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


PROBE_ENV = "LLAMA_FT_BENCH_PROBE"
"""Where the probe writes; a sitecustomize.py of PROBE_SOURCE on the ranks' PYTHONPATH records each rank's peak RSS
(getrusage, the whole process life) and CUDA peak at exit."""
PROBE_SOURCE = '''"""llama-ft benchmark probe (benchmarks/bench_common.py): peak memory of a rank, at exit."""
import atexit
import json
import os
import resource
import sys

_out = os.environ.get("PROBE_ENV")
if _out and "RANK" in os.environ:
    def _llama_ft_bench_probe():
        rec = {"rank": int(os.environ["RANK"]), "pid": os.getpid(), "argv0": sys.argv[0] if sys.argv else "",
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                rec["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
                rec["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        except Exception:  # noqa: BLE001 - a probe never fails the run
            pass
        with open(os.path.join(_out, "rank{}-pid{}.json".format(rec["rank"], rec["pid"])), "w") as f:
            json.dump(rec, f)

    atexit.register(_llama_ft_bench_probe)

# Run a sitecustomize this one shadows, if any.
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _path = os.path.join(_entry or os.curdir, "sitecustomize.py")
    if os.path.abspath(_entry or os.curdir) != _here and os.path.isfile(_path):
        with open(_path) as _f:
            exec(compile(_f.read(), _path, "exec"), {"__name__": "_shadowed_sitecustomize", "__file__": _path})
        break
'''.replace("PROBE_ENV", PROBE_ENV)


def read_probes(probe_out: Path, nproc: int) -> list[dict[str, Any]]:
    """Per rank, the probe record of its largest process (the rank itself, not a helper it spawned)."""
    best: dict[int, dict[str, Any]] = {}
    for f in probe_out.glob("rank*-pid*.json"):
        rec = json.loads(f.read_text())
        if rec["rank"] not in best or rec["peak_rss_bytes"] > best[rec["rank"]]["peak_rss_bytes"]:
            best[rec["rank"]] = rec
    if sorted(best) != list(range(nproc)):
        raise RuntimeError(f"memory probe: records for ranks {sorted(best)}, expected 0..{nproc - 1}")
    return [best[r] for r in range(nproc)]


def install_probe(directory: Path) -> Path:
    """Write the probe as `directory`/sitecustomize.py (put `directory` first on the ranks' PYTHONPATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(PROBE_SOURCE)
    return directory


# ---------------------------------------------------------------------------------------------------------------
# launching jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float, cwd: Path) -> tuple[int, float]:
    """Run a (multi-process) job in its own session, stdout + stderr to `log_path`; on a timeout (or Ctrl-C) kill
    it and all its descendants. Returns (exit code, wall seconds); exit code 124 on a timeout."""
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            rc = 124
        except BaseException:
            kill_tree(proc.pid)  # Ctrl-C: take the ranks down too
            proc.wait()
            raise
    return rc, time.perf_counter() - t0


def kill_tree(pid: int) -> None:
    """SIGKILL a job's process group and every descendant: run-llama.sh starts the DeepSpeed launcher in a
    session of its own, so the job's process group alone does not reach the ranks."""
    import psutil  # a DeepSpeed dependency

    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def failure_reason(rc: int, log_path: Path, timeout: float) -> str:
    """One line for a failed job: the first exception a rank raised, else the last line that mentions an error."""
    if rc == 124:
        return f"timed out after {timeout:.0f} s (log: {log_path})"
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    lines = [re.sub(r"^\[(default)?rank\d+\]:\s*", "", ln) for ln in lines]  # torchrun's per-rank prefixes
    raised = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b.*:", ln)
              and "ChildFailedError" not in ln]  # a rank's exception, not the launcher's summary of it
    said = [ln for ln in lines if "error" in ln.lower()]
    line = (raised or said or lines or ["no output"])[0 if raised else -1]
    return f"exit {rc}: {line[:300]} (log: {log_path})"


def bench_env(repo: Path, scratch: Path, probe_dir: Path, probe_out: Path, omp_threads: int | None) -> dict[str, str]:
    """The environment of a benchmark's ranks: this interpreter's bin first, the probe and the repository on
    PYTHONPATH, no launcher or run-llama.sh variables inherited, offline hub, the op cache; on CPU, OMP threads and
    the malloc setting of our CPU ranks for every job, ours and the peers'."""
    env = dict(os.environ)
    # This interpreter's bin first: DeepSpeed's JIT op build runs the first `ninja` on PATH, and two ninja versions
    # (pip's, the system's) do not read each other's build log, so alternating them rebuilds.
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
    for k in ("TRITON_INTERPRET", "DATA", "MODEL", "MERGE_DIR", "DS_CONFIG", "HOSTFILE", "NODE_RANK", "INCLUDE",
              "EXCLUDE", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(probe_dir), str(repo), os.environ.get("PYTHONPATH")) if p)
    env[PROBE_ENV] = str(probe_out)
    env["LLAMA_FT_CACHE"] = str(scratch / "cache")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llama-ft" / "torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
        # CPU ranks of ours fix glibc's mmap threshold (llama_ft/train/cpu_heap.py); a peer gets the same
        from llama_ft.train.cpu_heap import CPU_MMAP_THRESHOLD

        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(CPU_MMAP_THRESHOLD))
    return env


def deepspeed_launcher(scratch: Path) -> str:
    """The `deepspeed` launcher of this interpreter's environment; where it has none (an environment layered on
    another one), a two-line script that runs deepspeed.launcher.runner with this interpreter."""
    script = Path(sys.executable).parent / "deepspeed"
    if script.is_file():
        return str(script)
    wrapper = scratch / "deepspeed-launcher"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m deepspeed.launcher.runner "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


# ---------------------------------------------------------------------------------------------------------------
# model directories and data with exact token counts


def write_model_dir(out: Path, dims: dict[str, Any], dtype: str) -> dict[str, Any]:
    """config.json of a Llama shape `dims` + the tiny byte-level BPE tokenizer: what `--init random` and
    `from_config` need. vocab_size defaults to the tokenizer's. Written to a temporary name, then renamed."""
    from transformers import LlamaConfig

    from llama_ft.tiny import build_tokenizer

    tok = build_tokenizer()
    dims = dict(dims)
    dims.setdefault("vocab_size", len(tok))
    if dims["vocab_size"] < len(tok):
        raise RuntimeError(f"vocab_size {dims['vocab_size']} < tokenizer length {len(tok)}")
    config = LlamaConfig(**dims, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype=dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return dims


# Candidate words; those the tokenizer encodes as exactly one token (with their leading space) build the texts.
WORDS = ("the", "of", "and", "in", "is", "an", "has", "sum", "two", "three", "five", "six", "times", "number",
         "numbers", "word", "words", "letters", "answer", "capital", "color", "opposite")


def single_token_words(tokenizer: Any) -> list[str]:
    """WORDS that encode as exactly one token with a leading space (so a text of n of them is n tokens)."""
    words = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < 4:
        raise RuntimeError(f"the tokenizer encodes only {words} of {WORDS} as one token each")
    return words


def exact_length_rows(tokenizer: Any, source: list[int], target: list[int], rng: Any) -> list[dict[str, str]]:
    """Input-output rows whose llama-ft tokenization has exactly the given counts: row i's BOS + input is
    source[i] tokens and its output + EOS target[i] (each >= 2). Random single-token words drawn from `rng` (a
    numpy Generator); checked by tokenizing every text."""
    words = single_token_words(tokenizer)
    rows = []
    for s, t in zip(source, target, strict=True):
        pick = rng.integers(0, len(words), s - 1 + t - 1).tolist()  # BOS and EOS are the other two tokens
        text = [" " + words[k] for k in pick]
        rows.append({"input": "".join(text[:s - 1]), "output": "".join(text[s - 1:])})
    got_s = [len(ids) for ids in tokenizer([r["input"] for r in rows])["input_ids"]]
    got_t = [len(ids) for ids in tokenizer([r["output"] for r in rows], add_special_tokens=False)["input_ids"]]
    if got_s != list(source) or [g + 1 for g in got_t] != list(target):
        raise RuntimeError("synthetic texts do not tokenize to their drawn lengths")
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object a line, written to a temporary name and renamed (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written to a temporary name and renamed (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# what a run reports


def metrics_steps(metrics_jsonl: Path, steps: int, count: str = "trained_tokens") -> list[dict[str, Any]]:
    """The per-step records of a llama-ft run logged every step (--logging_steps 1), each with `time_s`: the
    recipe's own logging window, i.e. that optimizer step's wall time (`count` / `count`_per_s: trained tokens
    for SFT, "pairs" for --objective dpo)."""
    rows = [json.loads(ln) for ln in metrics_jsonl.read_text().splitlines()]
    rows = [r for r in rows if f"{count}_per_s" in r]
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        raise RuntimeError(f"{metrics_jsonl}: steps {[r['step'] for r in rows]}, expected 1..{steps}")
    return [{**r, "time_s": r[count] / r[f"{count}_per_s"]} for r in rows]


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "n/a"


def run_header(cuda: bool) -> dict[str, Any]:
    """What a report's header says of the run: device, versions, date (UTC), the command that reproduces it."""
    import torch

    if cuda:
        device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU)"
    return dict(device=device, torch=torch.__version__, deepspeed=package_version("deepspeed"),
                transformers=package_version("transformers"), python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))


def print_report(run: Callable[[Any], dict[str, Any]], markdown: Callable[[dict[str, Any]], str], args: Any) -> int:
    """`run(args)` with stdout sent to stderr, its report written to args.json (where given), then as a markdown
    table on stdout. Exit code 1 when a method failed (report["methods"][name] has "failed"), else 0."""
    with stdout_to_stderr():
        report = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, report)
    print(markdown(report), flush=True)
    return 1 if any("failed" in m for m in report["methods"].values()) else 0


def remove_shm_buffers(port: int) -> list[Path]:
    """Remove DeepSpeed's CPU all-reduce buffers (/dev/shm/deepspeed_*_127.0.0.1_PORT_*, 64 MiB each) of a finished
    job on `port` that no live process maps: DeepSpeed never unlinks them, so every CPU job would leave its own."""
    found = list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*"))
    mapped: set[str] = set()
    if found:
        for maps in Path("/proc").glob("[0-9]*/maps"):
            with contextlib.suppress(OSError):
                mapped.update(ln.split()[-1] for ln in maps.read_text().splitlines() if "/dev/shm/deepspeed_" in ln)
    gone = [p for p in found if str(p) not in mapped]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
