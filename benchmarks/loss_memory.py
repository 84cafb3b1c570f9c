"""Peak memory of the LM head + cross-entropy, forward + backward: full logits (transformers) vs llama-ft's chunks.

    python benchmarks/loss_memory.py --json loss-mem.json                 # 8,192 tokens x 128,256 vocab
    python benchmarks/loss_memory.py --smoke --json /tmp/smoke.json       # small sizes: a check of the script

One micro-batch of --tokens positions, hidden states h (1, T, H) that need a gradient (the model's output)
and a frozen LM head W (V, H) (LoRA never trains it); labels random in [0, V), every position trained. Each
path runs once, forward + backward (dL/dh), in its own subprocess, on the same inputs (same seed):

    full     what transformers' LlamaForCausalLM + Trainer do: logits = F.linear(h, W) (T x V in the model's
             dtype), then transformers' own ForCausalLMLoss (logits.float(), shifted labels, F.cross_entropy,
             sum / number of trained tokens); the model output holding the logits is dropped before backward,
             as Trainer.compute_loss does
    chunked  llama-ft: llama_ft.train.loss.lm_head_nll_sum (the trained positions through the head --chunk at a
             time, each chunk's gradient computed as it goes), divided by the same token count

Measured per path: peak memory above the subprocess's baseline (inputs allocated, libraries imported), i.e.
what the loss itself adds. On CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs just before the loss,
when the kernel allows) minus RSS before it; on CUDA: torch.cuda.max_memory_allocated minus memory_allocated
before it (peak stats reset). Also the wall time of that one run, the loss and |dL/dh|, which must agree between
the paths (a check, not a result). Goal (issue): chunked peak <= 1/8 of the full path's.

Defaults: on CUDA, bf16 and hidden 4096 (Llama 3.1 8B); on CPU fp32 and hidden 256 (the logits, the memory
that matters, are T x V whatever H is; a small H keeps the two T x V x H matmuls affordable on a CPU).
The full path on CPU needs about 3.5 x T x V x 4 bytes (15 GB at the defaults); it is skipped, with the reason,
when the machine has less memory available.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = dict(tokens=8192, vocab=128256, chunk=1024)
SMOKE_DEFAULTS = dict(tokens=4096, vocab=8192, chunk=1024, hidden=64)
PATHS = {"full": "full logits (transformers ForCausalLMLoss)", "chunked": "llama-ft chunked (lm_head_nll_sum)"}
GOAL = 1 / 8


def die(msg: str) -> None:
    """Bad input: one line, exit code 2."""
    print(f"loss_memory.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# the worker: one path, one run, in its own process


def _status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build the inputs, then run one path (args.worker) forward + backward once and measure what it adds."""
    import torch
    import torch.nn.functional as F

    if args.worker == "full":
        from transformers.loss.loss_utils import ForCausalLMLoss
    else:
        sys.path.insert(0, str(REPO))
        from llama_ft.train.loss import lm_head_nll_sum, loss_targets

    cuda = args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    hidden = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    weight = torch.nn.Parameter((torch.randn(args.vocab, args.hidden, generator=g) * args.hidden**-0.5)
                                .to(device, dtype), requires_grad=False)
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g).to(device)
    n = args.tokens - 1  # trained tokens: position t predicts label t + 1
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        reset = True
    else:
        reset = _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024
        base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if args.worker == "full":
        logits = F.linear(hidden, weight)  # LlamaForCausalLM's lm_head
        loss = ForCausalLMLoss(logits, labels, args.vocab, num_items_in_batch=torch.tensor(n))
        del logits  # Trainer.compute_loss returns the loss only: the output holding the logits goes
    else:
        positions, targets = loss_targets(labels.cpu())
        loss = lm_head_nll_sum(hidden, weight, positions.to(device), targets.to(device), args.chunk) / n
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    elif reset:
        peak = _status_kib("VmHWM") * 1024 - base
    else:  # the high-water mark could not be reset: it may include an earlier peak
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(base, base_maxrss))
    return {"path": args.worker, "peak_bytes": int(peak), "baseline_bytes": int(base), "peak_reset": reset,
            "seconds": seconds, "loss": float(loss), "grad_norm": float(hidden.grad.float().norm()),
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------
# the parent


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_path(path: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One path in a subprocess; {"unavailable": why} where it cannot run here."""
    if path == "full" and args.device == "cpu":
        need = int(3.5 * args.tokens * args.vocab * 4)  # logits, log-softmax output, gradients: ~3 T x V fp32
        avail = available_bytes()
        if avail is not None and need > 0.95 * avail:
            return {"unavailable": f"needs about {need / 2**30:.1f} GiB, the machine has {avail / 2**30:.1f} GiB "
                                   "available"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--out", str(out),
           "--device", args.device, "--dtype", args.dtype, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--seed", str(args.seed)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("PYTHONPATH", str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else lines[-1][:300]
        return {"failed": why}
    return json.loads(out.read_text())


def header(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device == "cuda":
        device = torch.cuda.get_device_name(0)
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, no GPU)"
    from importlib.metadata import version

    return dict(device=device, torch=torch.__version__, transformers=version("transformers"),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                measure="torch.cuda.max_memory_allocated - memory_allocated before" if args.device == "cuda"
                else "peak RSS (VmHWM) - RSS before")


def markdown(report: dict[str, Any]) -> str:
    h, c = report["header"], report["config"]
    gib = 2**30
    out = [f"LM head + cross-entropy, forward + backward: {h['device']}, torch {h['torch']}, transformers "
           f"{h['transformers']}, {h['date']}",
           f"`{h['command']}`",
           f"{c['tokens']:,} tokens x {c['vocab']:,} vocab, hidden {c['hidden']}, {c['dtype']}, chunk {c['chunk']}; "
           f"peak = {h['measure']}, one run per path in its own process",
           "",
           "| path | peak above baseline GiB | vs full | seconds | loss | abs dL/dh |",
           "|---|--:|--:|--:|--:|--:|"]
    full = report["paths"]["full"].get("peak_bytes")
    for name, label in PATHS.items():
        r = report["paths"][name]
        if "peak_bytes" not in r:
            out.append(f"| {label} | {'failed' if 'failed' in r else 'n/a'}: {r.get('failed') or r.get('unavailable')}"
                       " | | | | |")
            continue
        vs = f"{r['peak_bytes'] / full:.3f}" if full else ""
        out.append(f"| {label} | {r['peak_bytes'] / gib:.3f} | {vs} | {r['seconds']:.1f} | {r['loss']:.4f} | "
                   f"{r['grad_norm']:.4e} |")
    out.append("")
    ratio = report["ratio"]
    if ratio is None:
        out.append(f"- goal chunked <= 1/8 of full: not measured (size of the full logits alone: "
                   f"{report['full_logits_fp32_bytes'] / gib:.2f} GiB in fp32)")
    else:
        out.append(f"- goal chunked <= 1/8 of full: {ratio:.3f} (1/{1 / ratio:.1f}), "
                   f"{'holds' if ratio <= GOAL else 'does not hold'}")
    if report.get("agree") is not None:
        out.append(f"- the paths agree (loss and |dL/dh| within 1e-3 relative): {'yes' if report['agree'] else 'NO'}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, help=f"positions in the micro-batch; default {DEFAULTS['tokens']}")
    ap.add_argument("--vocab", type=int, help=f"vocabulary size; default {DEFAULTS['vocab']}")
    ap.add_argument("--hidden", type=int, help="hidden size; default 4096 on CUDA, 256 on CPU")
    ap.add_argument("--chunk", type=int, help=f"llama-ft's --loss_chunk_size; default {DEFAULTS['chunk']}")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="model dtype; default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default cuda when available")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", default="full,chunked", help="comma list of full,chunked; default both")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per path")
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--smoke", action="store_true", help="small sizes (4,096 x 8,192, hidden 64): a check of the "
                                                         "script")
    ap.add_argument("--worker", choices=list(PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, value in {**DEFAULTS, **(SMOKE_DEFAULTS if args.smoke else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        return args
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: no CUDA GPU found")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.hidden is None:
        args.hidden = 4096 if args.device == "cuda" else 256
    for key in ("tokens", "vocab", "hidden", "chunk", "timeout"):
        if getattr(args, key) <= 0:
            die(f"--{key} {getattr(args, key)}: expected a number > 0")
    if args.tokens < 2:
        die(f"--tokens {args.tokens}: expected at least 2 (a position predicts the next label)")
    names = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not names or any(p not in PATHS for p in names):
        die(f"--paths {args.paths!r}: expected a comma list of {', '.join(PATHS)}")
    args.paths = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.out is None:
            die("--worker needs --out")
        args.out.write_text(json.dumps(worker(args)))
        return 0
    import tempfile

    head = header(args)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="loss-memory-") as tmp:
        for name in PATHS:
            if name not in args.paths:
                results[name] = {"unavailable": "not run (--paths)"}
                continue
            print(f"[loss_memory] {name} ...", file=sys.stderr, flush=True)
            results[name] = run_path(name, args, Path(tmp) / f"{name}.json")
    full, chunked = results["full"].get("peak_bytes"), results["chunked"].get("peak_bytes")
    ratio = chunked / full if full and chunked is not None else None
    agree = None
    if "loss" in results["full"] and "loss" in results["chunked"]:
        agree = all(math.isclose(results["full"][k], results["chunked"][k], rel_tol=1e-3)
                    for k in ("loss", "grad_norm"))
    config = {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "chunk": args.chunk,
              "dtype": args.dtype, "device": args.device, "seed": args.seed}
    report = {"header": head, "config": config, "paths": results, "labels": PATHS, "ratio": ratio, "goal": GOAL,
              "goal_holds": None if ratio is None else ratio <= GOAL, "agree": agree,
              "full_logits_fp32_bytes": args.tokens * args.vocab * 4}
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    failed = any("failed" in r for r in results.values()) or agree is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
