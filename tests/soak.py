"""Fault soak: a requeued 2-rank CPU job, hit by a seeded random fault before each restart.

    python tests/soak.py --cycles 100 [--seed S] [--kinds kill9_rank sigterm_job ...] [--work DIR]

The job is run-llama.sh on the embedded tiny Llama with --resume_from_checkpoint auto and a save every few
steps, as a scheduler's requeue loop would run it. Each start gets one fault, drawn (with its moment: a uniform
delay after the start's first new step) from random.Random(seed):

  kill9_rank      kill -9 of one rank                       (OOM killer)
  sigterm_job     SIGTERM to run-llama.sh                   (preemption, scancel)
  kill9_all       kill -9 of every process of the job       (node loss, a cgroup kill)
  kill9_launcher  kill -9 of the DeepSpeed launcher alone   (its runner or its per-node process)
  enospc          the output disk (a tmpfs) fills up        (a full disk during the next save)
  sigstop_rank    SIGSTOP of one rank: a rank hung in a collective; the job must end after --dist_timeout

After every fault: `latest` names a complete checkpoint (or there is none yet), no process of the job is left
after a bound, nothing of the job is left in /dev/shm, its port is free. After the last fault the job is started
until it finishes; then its adapters, its final checkpoint (adapters, fp32 masters, Adam moments of both ranks)
and its per-step losses must equal those of an undisturbed run of the same options, bit for bit.
Prints a table: faults by kind, restarts, steps redone, time lost per fault.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc import kill_tree  # noqa: E402 - tests/ helpers, shared with the fault tests
from test_e2e import REPO, llama_env  # noqa: E402

KINDS = ["kill9_rank", "sigterm_job", "kill9_all", "kill9_launcher", "enospc", "sigstop_rank"]
FLAGS = ["--max_steps", "30", "--save_steps", "3", "--eval_dataset_size", "0", "--lora_r", "8", "--lora_alpha", "16",
         "--learning_rate", "5e-3", "--per_device_train_batch_size", "2", "--source_max_len", "128",
         "--target_max_len", "32", "--lora_dropout", "0.1", "--gradient_checkpointing", "false"]
DIST_TIMEOUT = 20  # s: how long a collective waits for a hung (SIGSTOPped) rank
GONE_BOUND = 20.0  # s after a fault (after the timeout for a hang) by which every process of the job must be gone
STEP_SLEEP = "0.3"  # s added to each step, so that a fault lands inside the run, not after it


@dataclass
class Fault:
    kind: str
    start: int
    delay: float
    reached: int = 0  # highest step logged before the fault
    resumed_at: int = 0  # the step `latest` named after it
    ended_s: float = 0.0  # fault -> every process of the job gone
    lost_s: float | None = None  # fault -> the next start logged a step past `reached`
    exit_code: int | None = None
    note: str = ""


@dataclass
class Soak:
    work: Path
    seed: int
    kinds: list[str]
    steps: int
    out: Path = field(init=False)
    faults: list[Fault] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    starts: int = 0
    chains: int = 0  # requeued runs that finished (each compared with the undisturbed one)
    tmpfs: bool = False
    dist_timeout: int = DIST_TIMEOUT

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        disk = self.work / "disk"
        disk.mkdir(exist_ok=True)
        self.tmpfs = "enospc" in self.kinds and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=48M", "tmpfs", str(disk)], capture_output=True).returncode == 0
        if "enospc" in self.kinds and not self.tmpfs:
            print("soak: cannot mount a tmpfs (needs root): no enospc faults", file=sys.stderr)
            self.kinds = [k for k in self.kinds if k != "enospc"]
        self.out = disk / "out"

    def flags(self) -> list[str]:
        return [*FLAGS[:1], str(self.steps), *FLAGS[2:], "--dist_timeout", str(self.dist_timeout)]

    def env(self, port: int) -> dict[str, str]:
        env = llama_env(self.work, self.out, LLAMA_FT_TEST_STEP_SLEEP=STEP_SLEEP)
        env["MASTER_PORT"] = str(port)
        return env


def _steps(out: Path) -> int:
    try:
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        return 0
    return max((r["step"] for r in rows if "loss" in r), default=0)


def _latest_step(out: Path) -> int:
    """The step of the checkpoint `latest` names (0: none yet); a violation if it names an incomplete one."""
    marker = out / "latest"
    if not marker.is_file():
        return 0
    name = marker.read_text().strip()
    if not (out / name / "trainer_state.json").is_file() or not (out / name / "adapter_model.safetensors").is_file():
        raise AssertionError(f"`latest` names {name}, which is not a complete checkpoint")
    return int(name.split("-")[1])


def _family(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _port_free(port: int) -> bool:
    """Nothing listens on it any more (connections of the dead job in TIME_WAIT are the kernel's, not a process's,
    and a new rank 0 binds over them: torch's store sets SO_REUSEADDR)."""
    return not any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                   for c in psutil.net_connections(kind="tcp"))


def _rank_pid(out: Path, rank: int, family: dict[int, psutil.Process]) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = json.loads((out / ".llama-ft" / "ranks" / f"rank{rank}.json").read_text())["pid"]
        return pid if pid in family else None  # this start's rank, not an earlier one's
    return None


def _apply(soak: Soak, f: Fault, proc: subprocess.Popen, family: dict[int, psutil.Process], rng: random.Random) -> str:
    """Do the fault; a note of what exactly was hit."""
    if f.kind == "sigterm_job":
        proc.send_signal(signal.SIGTERM)
        return "run-llama.sh"
    if f.kind == "kill9_all":
        for p in [psutil.Process(proc.pid), *family.values()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        return f"{len(family) + 1} processes"
    if f.kind == "kill9_launcher":
        launchers = [p for p in family.values() if _is_launcher(p, proc.pid)]
        victim = rng.choice(sorted(launchers, key=lambda p: p.pid)) if launchers else None
        if victim is None:
            return "no launcher process found"
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
        return "deepspeed runner" if victim.pid in {c.pid for c in psutil.Process(proc.pid).children()} \
            else "per-node launch.py"
    if f.kind == "enospc":
        st = os.statvfs(soak.out.parent)
        with open(soak.out.parent / "filler", "wb") as fh:
            with contextlib.suppress(OSError):
                fh.write(b"\0" * max(st.f_bavail * st.f_frsize - 4096, 0))
        return "disk filled"
    rank = rng.randrange(2)
    pid = _rank_pid(soak.out, rank, family)
    if pid is None:
        return f"rank {rank} not found"
    try:
        os.kill(pid, signal.SIGKILL if f.kind == "kill9_rank" else signal.SIGSTOP)
    except ProcessLookupError:  # it exited between finding it and the signal (the run's last step): no fault
        return f"rank {rank} gone before the signal"
    return f"rank {rank}"


def _is_launcher(p: psutil.Process, script: int) -> bool:
    """DeepSpeed's runner (run-llama.sh's child once training runs) or its per-node launch.py, alive."""
    with contextlib.suppress(psutil.Error):
        return p.is_running() and (p.ppid() == script or "deepspeed.launcher.launch" in " ".join(p.cmdline()))
    return False


def run_start(soak: Soak, fault: Fault | None, rng: random.Random, timeout: float = 900) -> tuple[int, Fault | None]:
    """One start of the job, with `fault` (None: run to the end). Returns the exit code of run-llama.sh."""
    soak.starts += 1
    port = _free_port()
    env = soak.env(port)
    log = open(soak.work / f"start-{soak.starts}.log", "w")
    proc = subprocess.Popen(["bash", str(REPO / "run-llama.sh"), *soak.flags(), "--resume_from_checkpoint", "auto"],
                            env=env, cwd=soak.work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    family: dict[int, psutil.Process] = {}
    begin = _steps(soak.out)
    t0, t_first, t_fault = time.time(), None, None
    previous = soak.faults[-2] if fault is not None and len(soak.faults) > 1 else (
        soak.faults[-1] if fault is None and soak.faults else None)
    try:
        while True:
            for p in _family(proc.pid):
                family.setdefault(p.pid, p)
            step = _steps(soak.out)
            now = time.time()
            # lost until this start logs a step past the fault's and past any the killed job logged after it
            if previous is not None and previous.lost_s is None and step > max(previous.reached, begin):
                previous.lost_s = now - previous.t_fault  # type: ignore[attr-defined]
            if t_first is None and step > begin:
                t_first = now
            if fault is not None and t_fault is None and t_first is not None and now - t_first >= fault.delay:
                fault.reached = step
                fault.note = _apply(soak, fault, proc, family, rng)
                t_fault = fault.t_fault = now  # type: ignore[attr-defined]
            if proc.poll() is not None and t_fault is None:
                break  # ended before its fault (done, or failed)
            if proc.poll() is not None:
                break
            if now - t0 > timeout:
                soak.violations.append(f"start {soak.starts}: no end after {timeout} s")
                kill_tree(proc.pid)
                break
            time.sleep(0.1)
        code = proc.wait()
        if fault is not None and t_fault is None:
            fault = None  # the job ended first: no fault this start
        if fault is not None:
            fault.exit_code = code
            bound = GONE_BOUND + (soak.dist_timeout + 30 if fault.kind == "sigstop_rank" else 0)
            _, alive = psutil.wait_procs(list(family.values()), timeout=max(bound - (time.time() - t_fault), 1))
            fault.ended_s = time.time() - t_fault
            if alive:
                soak.violations.append(f"start {soak.starts} ({fault.kind}): {len(alive)} process(es) left "
                                       f"{bound:.0f} s after the fault: {[p.pid for p in alive]}")
                for p in alive:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
            try:
                fault.resumed_at = _latest_step(soak.out)
            except AssertionError as e:
                soak.violations.append(f"start {soak.starts} ({fault.kind}): {e}")
            shm = list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*"))
            if shm:
                soak.violations.append(f"start {soak.starts} ({fault.kind}): left in /dev/shm: {[p.name for p in shm]}")
            if not _port_free(port):
                soak.violations.append(f"start {soak.starts} ({fault.kind}): port {port} still in use")
            (soak.out.parent / "filler").unlink(missing_ok=True)  # the operator frees the disk before the requeue
        return code, fault
    finally:
        log.close()
        if proc.poll() is None:
            kill_tree(proc.pid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(work: Path, steps: int) -> Path:
    """The undisturbed run of the same options (cached by step count in `work`)."""
    out = work / f"reference-{steps}"
    if not (out / f"checkpoint-{steps}" / "trainer_state.json").is_file():
        env = llama_env(work, out)
        flags = [*FLAGS[:1], str(steps), *FLAGS[2:], "--dist_timeout", str(DIST_TIMEOUT)]
        with open(work / "reference.log", "w") as log:
            code = subprocess.run(["bash", str(REPO / "run-llama.sh"), *flags, "--overwrite_output_dir"], env=env,
                                  cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  timeout=900).returncode
        if code != 0:
            raise AssertionError(f"the undisturbed run failed ({code}); see {work / 'reference.log'}")
    return out


def compare(ref: Path, out: Path, steps: int) -> list[str]:
    """What differs between the soaked run and the reference: adapters, final checkpoint tensors, losses."""
    diffs = []
    pairs = [(ref / "adapter_model.safetensors", out / "adapter_model.safetensors")]
    final = f"checkpoint-{steps}"
    pairs += [(p, out / final / p.name) for p in sorted((ref / final).glob("*.safetensors"))]
    for a, b in pairs:
        if not b.is_file():
            diffs.append(f"{b}: missing")
            continue
        ta, tb = load_file(str(a)), load_file(str(b))
        if ta.keys() != tb.keys():
            diffs.append(f"{b.name}: other tensors")
        diffs += [f"{b.name}: {k} differs" for k in ta if k in tb and not torch.equal(ta[k], tb[k])]

    def losses(d: Path) -> dict[int, float]:
        rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    if losses(ref) != losses(out):
        diffs.append("per-step losses differ")
    return diffs


def soak(cycles: int, seed: int, work: Path, kinds: list[str], steps: int, in_order: bool = False,
         dist_timeout: int = DIST_TIMEOUT) -> tuple[Soak, list[str]]:
    """`cycles` faults drawn from `kinds` (with in_order: the kinds in turn, for a CI slice that must see each)."""
    rng = random.Random(seed)
    s = Soak(work, seed, list(kinds), steps, dist_timeout=dist_timeout)
    ref = reference(work, steps)
    tries = 0
    while len(s.faults) < cycles and tries < 3 * cycles:  # a start that finishes before its fault does not count
        tries += 1
        kind = s.kinds[len(s.faults) % len(s.kinds)] if in_order else rng.choice(s.kinds)
        # a moment within the expected run: up to 1.5 saves' worth of steps after the start's first new step
        f = Fault(kind, s.starts + 1, rng.uniform(0, 1.5 * 3 * (float(STEP_SLEEP) + 0.5)))
        s.faults.append(f)
        code, hit = run_start(s, f, rng)
        if hit is not None:
            print(f"start {f.start}: {f.kind} ({f.note}) {f.delay:.1f} s after its first step: at step {f.reached}, "
                  f"exit {f.exit_code}, job gone after {f.ended_s:.1f} s, resumed from step {f.resumed_at}", flush=True)
        else:
            s.faults.pop()
            if code == 0:  # the job finished before its fault: check it, and start over so that the faults go on
                s.chains += 1
                s.violations += [f"run {s.chains}: {d}" for d in compare(ref, s.out, steps)]
                _reset(s.out)
    for _ in range(5):  # the requeue loop after the last fault: until the job finishes
        code, _ = run_start(s, None, rng)
        if code == 0:
            break
    else:
        s.violations.append("the job did not finish in 5 starts after the last fault")
    s.chains += 1
    return s, s.violations + [f"run {s.chains}: {d}" for d in compare(ref, s.out, steps)]


def _reset(out: Path) -> None:
    import shutil

    shutil.rmtree(out, ignore_errors=True)


def report(s: Soak) -> str:
    rows = ["| fault | count | steps redone (total) | job gone after fault, s (mean / max) | time lost, s (mean) |",
            "|---|---|---|---|---|"]
    for kind in KINDS:
        fs = [f for f in s.faults if f.kind == kind]
        if not fs:
            continue
        redone = sum(max(f.reached - f.resumed_at, 0) for f in fs)
        ended = [f.ended_s for f in fs]
        lost = [f.lost_s for f in fs if f.lost_s is not None]
        rows.append(f"| {kind} | {len(fs)} | {redone} | {sum(ended) / len(ended):.1f} / {max(ended):.1f} | "
                    + (f"{sum(lost) / len(lost):.1f}" if lost else "-") + " |")
    rows.append(f"\nfaults {len(s.faults)}, starts {s.starts} (restarts {s.starts - 1}), finished runs {s.chains} "
                f"(each compared with the undisturbed run), seed {s.seed}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cycles", type=int, default=6, help="faults to inject")
    p.add_argument("--seed", type=int, default=None, help="default: drawn, and printed")
    p.add_argument("--kinds", nargs="*", choices=KINDS, default=KINDS)
    p.add_argument("--steps", type=int, default=30, help="--max_steps of the job")
    p.add_argument("--work", type=Path, default=Path("/tmp/llama-ft-soak"))
    p.add_argument("--in_order", action="store_true", help="the kinds in turn instead of drawn (moments still drawn)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"soak: seed {seed}, {args.cycles} faults of {args.kinds}", flush=True)
    t0 = time.time()
    try:
        s, problems = soak(args.cycles, seed, args.work, args.kinds, args.steps, args.in_order)
    finally:
        subprocess.run(["umount", "-l", str(args.work / "disk")], capture_output=True)
    print(report(s))
    print(f"soak: {time.time() - t0:.0f} s; " + ("bit-identical to the undisturbed run, no violation" if not problems
                                                  else "PROBLEMS:\n  " + "\n  ".join(problems)))
    return int(bool(problems))


if __name__ == "__main__":
    sys.exit(main())
