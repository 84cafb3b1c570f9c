"""FP8 LoRA linear, forward + backward, at Llama 3.1 layer shapes: ours vs bf16 + eager LoRA vs DeepSpeed.

Reproduce (one CUDA GPU, from the repository root; the default set takes a few minutes on an H100):

    python benchmarks/fp8_lora_linear.py --json fp8_bench.json
    python benchmarks/fp8_lora_linear.py --models 70b --tokens 4096,8192,16384 --ranks 16,64 \
        --layers q,k,v,o,gate,up,down --json fp8_bench_70b.json
    python benchmarks/fp8_lora_linear.py --smoke --json /tmp/smoke.json     # CPU check of the script only
    python benchmarks/fp8_lora_linear.py --methods weight_only,fp8_compute,bf16_lora ...   # without DeepSpeed's

What one timed step is (one layer of one training step):
    x (M, K) bf16, requires_grad        W (N, K) frozen        A (r, K), B (N, r) bf16, requires_grad
    y = x W^T + s (x A^T) B^T,  s = alpha / r;   (dx, dA, dB) = autograd.grad(y, (x, A, B), dy),  dy random
The time is the median over --iters steps after --warmup steps, each step bracketed by CUDA events
(wall clock on CPU, where only --smoke runs).

Methods (one column each):
    weight_only    llama_ft.fp8.fp8_lora_linear, W as e4m3 bytes + 128x128 block scales, tiles widened
                   to bf16 in the Triton kernels (the default mode)
    fp8_compute    the same with fp8_compute=True: x and dy rounded to e4m3 per 1 x 128 tile, fp8 dots
    bf16_lora      F.linear(x, W) + s * F.linear(F.linear(x, A), B) with W bf16: what PEFT runs; the baseline
    deepspeed_fp8  deepspeed.linear.OptimizedLinear(K, N, lora_config=LoRAConfig(lora_r=r, lora_alpha=alpha,
                   base_weight_sharding=1), quantization_config=QuantizationConfig(q_bits=8)): FP8 weight with
                   one scale per 512 values, dequantized whole to bf16 every forward, then F.linear + eager LoRA.
                   Needs DeepSpeed's fp_quantizer CUDA op; where it cannot be built the row says why.

FLOPs per step, counted the same for every method (dequantization is not counted):
    base:  forward x W^T 2MNK + input gradient dy W 2MNK (W is frozen: no dW)             = 4 M N K
    LoRA:  forward  t = x A^T 2MKr,  t B^T 2MrN
           backward u = dy B 2MNr,  u A 2MrK,  dA = s u^T x 2rMK,  dB = s dy^T t 2NMr        = 6 M r (N + K)
    TFLOP/s = (4 M N K + 6 M r (N + K)) / time;  speed-up = time(bf16_lora) / time(method).

Accuracy: for each shape the forward output of our two modes on the first --err-rows tokens is compared with a
float64 reference over the same dequantized weights, y64 = x W_dq^T + s (x A^T) B^T:
rel err = ||y - y64||_F / ||y64||_F (DESIGN.md goal for weight-only: <= 1e-2). fp8_compute's error includes its
activation rounding.

Output: one markdown table on stdout (progress on stderr); --json PATH writes every row.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import stdout_to_stderr  # also puts the repository root on sys.path

with stdout_to_stderr():  # DeepSpeed's logger writes to the stdout of its import: import it here, not later
    import deepspeed  # noqa: F401 - the peer (OptimizedLinear) is imported from it below

    from llama_ft.fp8 import BLOCK, fp8_lora_linear, kernels, quantize_fp8, scales_from_bytes, scales_to_bytes


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    kv: int  # num_key_value_heads * head_dim (8 * 128 in all Llama 3.1 sizes)


MODELS = {
    "8b": ModelDims(4096, 14336, 1024),
    "70b": ModelDims(8192, 28672, 1024),
    "405b": ModelDims(16384, 53248, 1024),
    "tiny": ModelDims(256, 512, 128),  # --smoke only
}

# Llama linear layers as (N, K) = (out_features, in_features); q heads * head_dim == hidden in Llama 3.1
LAYERS: dict[str, Callable[[ModelDims], tuple[int, int]]] = {
    "q": lambda m: (m.hidden, m.hidden),
    "k": lambda m: (m.kv, m.hidden),
    "v": lambda m: (m.kv, m.hidden),
    "o": lambda m: (m.hidden, m.hidden),
    "gate": lambda m: (m.intermediate, m.hidden),
    "up": lambda m: (m.intermediate, m.hidden),
    "down": lambda m: (m.hidden, m.intermediate),
}

METHODS = {
    "weight_only": "ours, weight-only",
    "fp8_compute": "ours, fp8 compute",
    "bf16_lora": "bf16 F.linear + eager LoRA (PEFT)",
    "deepspeed_fp8": "DeepSpeed OptimizedLinear FP8",
}
BASELINE = "bf16_lora"

DEFAULTS = dict(models="8b,70b,405b", tokens="4096,16384", ranks="16,64", layers="q,gate,down", warmup=5, iters=20)
SMOKE_DEFAULTS = dict(models="tiny", tokens="128", ranks="16", layers="q,gate,down", warmup=1, iters=3)


def step_flops(m: int, n: int, k: int, r: int) -> int:
    """4MNK (frozen base: forward + input gradient) + 6Mr(N+K) (LoRA forward, dx share, dA, dB)."""
    return 4 * m * n * k + 6 * m * r * (n + k)


@dataclass
class LoRAOperands:
    """One layer's tensors, the same for every method: x, W, A, B, dy (bf16)."""

    x: torch.Tensor  # (M, K), requires_grad
    w: torch.Tensor  # (N, K), frozen
    a: torch.Tensor  # (r, K), requires_grad
    b: torch.Tensor  # (N, r), requires_grad
    dy: torch.Tensor  # (M, N)
    r: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def lora_operands(m: int, n: int, k: int, r: int, alpha: float, device: torch.device, seed: int = 0) -> dict:
    """LoRAOperands' fields, random with unit-variance outputs. B is random (not PEFT's zero init) so that the
    LoRA term is really in the output the error check sees."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(torch.bfloat16)

    return dict(x=randn(m, k, std=1.0).requires_grad_(), w=randn(n, k, std=k**-0.5),
                a=randn(r, k, std=k**-0.5).requires_grad_(), b=randn(n, r, std=r**-0.5).requires_grad_(),
                dy=randn(m, n, std=1.0), r=r, alpha=alpha)


@dataclass
class Problem(LoRAOperands):
    """The operands and W's FP8 form."""

    q: torch.Tensor  # (N, K) uint8 e4m3
    scale_bytes: torch.Tensor  # (ceil(N/128), ceil(K/128) * 4) uint8


def make_problem(m: int, n: int, k: int, r: int, alpha: float, device: torch.device, seed: int = 0) -> Problem:
    ops = lora_operands(m, n, k, r, alpha, device, seed)
    q, scales = quantize_fp8(ops["w"])
    return Problem(**ops, q=q, scale_bytes=scales_to_bytes(scales))


class Unavailable(Exception):
    """A method that cannot run here; its message is the reason shown in the table."""


def reason(e: BaseException) -> str:
    """One line for a table note: the exception's type and first line."""
    if isinstance(e, Unavailable):
        return str(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


# A method: given the problem, a forward function and the tensors autograd differentiates with respect to.
Forward = Callable[[], torch.Tensor]


def ours(fp8_compute: bool) -> Callable[[Problem], tuple[Forward, list[torch.Tensor]]]:
    def build(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
        return (lambda: fp8_lora_linear(p.x, p.q, p.scale_bytes, p.a, p.b, p.scaling, fp8_compute=fp8_compute),
                [p.x, p.a, p.b])

    return build


def bf16_lora(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    return lambda: F.linear(p.x, p.w) + p.scaling * F.linear(F.linear(p.x, p.a), p.b), [p.x, p.a, p.b]


def _new_deepspeed_layer(k: int, n: int, r: int, alpha: float, device: torch.device) -> torch.nn.Module:
    from deepspeed.linear import LoRAConfig, OptimizedLinear, QuantizationConfig

    # Built under the device context, so the bf16 weight is created on the GPU and QuantizedParameter quantizes
    # it at construction. (Built on CPU, it would be quantized by a later .to(device), which in DeepSpeed 0.19
    # first calls FP_Quantize.to on buffers that are still None.) The weight is DeepSpeed's own xavier init,
    # not ours: the values do not change the time.
    with torch.device(device):
        return OptimizedLinear(k, n, lora_config=LoRAConfig(lora_r=r, lora_alpha=alpha, base_weight_sharding=1),
                               quantization_config=QuantizationConfig(q_bits=8), dtype=torch.bfloat16)


_deepspeed_unavailable: str | None = None
_deepspeed_probed = False


def deepspeed_unavailable(device: torch.device) -> str | None:
    """Why DeepSpeed's FP8 OptimizedLinear cannot run here (op build, CPU backend, ...), or None. Probed once."""
    global _deepspeed_unavailable, _deepspeed_probed
    if not _deepspeed_probed:
        _deepspeed_probed = True
        try:
            with stdout_to_stderr():  # a first use may JIT-compile DeepSpeed's fp_quantizer op
                layer = _new_deepspeed_layer(512, 512, 16, 16.0, device)
            x = torch.randn(64, 512, device=device, dtype=torch.bfloat16, requires_grad=True)
            y = layer(x)
            torch.autograd.grad(y, [x, layer.lora_weight_1.weight, layer.lora_weight_2.weight], torch.ones_like(y))
        except Exception as e:  # noqa: BLE001 - any failure means "not available", with its reason
            _deepspeed_unavailable = reason(e)
    return _deepspeed_unavailable


def deepspeed_fp8(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    why = deepspeed_unavailable(p.x.device)
    if why is not None:
        raise Unavailable(why)
    n, k = p.w.shape
    layer = _new_deepspeed_layer(k, n, p.r, p.alpha, p.x.device)
    with torch.no_grad():
        layer.lora_weight_1.weight.copy_(p.a)
        layer.lora_weight_2.weight.copy_(p.b)
    return (lambda: layer(p.x)), [p.x, layer.lora_weight_1.weight, layer.lora_weight_2.weight]


BUILDERS: dict[str, Callable[[Problem], tuple[Forward, list[torch.Tensor]]]] = {
    "weight_only": ours(fp8_compute=False),
    "fp8_compute": ours(fp8_compute=True),
    "bf16_lora": bf16_lora,
    "deepspeed_fp8": deepspeed_fp8,
}


def median_ms(step: Callable[[], object], warmup: int, iters: int, cuda: bool) -> float:
    for _ in range(warmup):
        step()
    if not cuda:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median([start.elapsed_time(end) for start, end in events])


def time_method(name: str, p, warmup: int, iters: int, cuda: bool, builders: dict | None = None) -> dict:
    """{"ms": median ms per forward+backward} or {"unavailable": why}. `builders`: method name -> builder of
    (forward, inputs) for a problem (this benchmark's BUILDERS by default; the NF4 one passes its own)."""
    try:
        forward, inputs = (builders or BUILDERS)[name](p)
        return {"ms": median_ms(lambda: torch.autograd.grad(forward(), inputs, p.dy), warmup, iters, cuda)}
    except Exception as e:  # noqa: BLE001 - one failing method (OOM, no fp8 dot on this GPU...) is a table cell
        return {"unavailable": reason(e)}


def timed_results(p, flop: int, args: argparse.Namespace, cuda: bool, methods: dict, baseline: str,
                  builders: dict | None = None) -> dict[str, dict]:
    """Each method's time_method result (or "not run (--methods)"), with TFLOP/s and the speed-up over
    `baseline` as "speedup_vs_<baseline>"."""
    results = {}
    for name in methods:
        if name not in args.methods:
            results[name] = {"unavailable": "not run (--methods)"}
            continue
        results[name] = time_method(name, p, args.warmup, args.iters, cuda, builders)
        release_memory(cuda)  # the method's layer, closures and autograd buffers are gone once it returns
    base_ms = results[baseline].get("ms")
    for res in results.values():
        if "ms" in res:
            res["tflops"] = flop / (res["ms"] * 1e-3) / 1e12
            res[f"speedup_vs_{baseline}"] = base_ms / res["ms"] if base_ms else None
    return results


def release_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _dequantize_f64(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    s = scales.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    return q.view(torch.float8_e4m3fn).float().double() * s


@torch.no_grad()
def relative_error(p: Problem, fp8_compute: bool, rows: int, chunk: int = 16 * BLOCK) -> float:
    """||y - y64|| / ||y64|| on the first `rows` tokens; y64 in float64 over the same dequantized W."""
    x = p.x.detach()[:rows]
    y = fp8_lora_linear(x, p.q, p.scale_bytes, p.a.detach(), p.b.detach(), p.scaling, fp8_compute=fp8_compute)
    x64 = x.double()
    ref = p.scaling * (x64 @ p.a.detach().double().T) @ p.b.detach().double().T
    scales = scales_from_bytes(p.scale_bytes)
    for n0 in range(0, p.q.shape[0], chunk):  # W in float64 one stripe of rows at a time
        w64 = _dequantize_f64(p.q[n0:n0 + chunk], scales[n0 // BLOCK:(n0 + chunk) // BLOCK])
        ref[:, n0:n0 + chunk] += x64 @ w64.T
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def error_or_reason(error: Callable[[], float], cuda: bool) -> float | str:
    """error() (a relative error), or why it could not be computed."""
    try:
        return error()
    except Exception as e:  # noqa: BLE001
        return reason(e)
    finally:
        release_memory(cuda)


def run_row(model: str, layer: str, m: int, r: int, args: argparse.Namespace, device: torch.device) -> dict:
    n, k = LAYERS[layer](MODELS[model])
    cuda = device.type == "cuda"
    p = make_problem(m, n, k, r, args.alpha, device)
    flop = step_flops(m, n, k, r)
    results = timed_results(p, flop, args, cuda, METHODS, BASELINE)
    row = dict(model=model, layer=f"{layer}_proj", M=m, N=n, K=k, r=r, alpha=args.alpha, flop=flop,
               rel_err_weight_only=error_or_reason(partial(relative_error, p, False, args.err_rows), cuda),
               rel_err_fp8_compute=error_or_reason(partial(relative_error, p, True, args.err_rows), cuda),
               results=results)
    del p
    release_memory(cuda)
    return row


def _csv(kind: Callable[[str], object], choices: dict | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        bad = [i for i in items if choices is not None and i not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma list of {sorted(choices) if choices else kind}, "
                                             f"got {text!r}")
        return items

    return parse


def shape_parser(doc: str, methods: dict, defaults: dict, methods_help: str,
                 smoke_help: str) -> argparse.ArgumentParser:
    """The options both LoRA-linear benchmarks take: shapes, methods, steps, error rows, --json, --smoke."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=_csv(str, MODELS), help=f"default {defaults['models']}")
    ap.add_argument("--layers", type=_csv(str, LAYERS), help=f"of {','.join(LAYERS)}; default {defaults['layers']}")
    ap.add_argument("--tokens", type=_csv(int), help=f"M = batch x sequence; default {defaults['tokens']}")
    ap.add_argument("--ranks", type=_csv(int), help=f"LoRA r; default {defaults['ranks']}")
    ap.add_argument("--methods", type=_csv(str, methods), default=list(methods),
                    help=f"of {','.join(methods)}; default all{methods_help}")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / r); default 16")
    ap.add_argument("--warmup", type=int, help=f"untimed steps per method; default {defaults['warmup']}")
    ap.add_argument("--iters", type=int, help=f"timed steps per method (median); default {defaults['iters']}")
    ap.add_argument("--err-rows", type=int, default=2048, help="tokens in the float64 error check; default 2048")
    ap.add_argument("--json", type=Path, help="write every row and the run's header here")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    return ap


def fill_defaults(args: argparse.Namespace, defaults: dict, smoke_defaults: dict) -> argparse.Namespace:
    """The shape options not given, from `smoke_defaults` with --smoke, else `defaults`."""
    for key, value in (smoke_defaults if args.smoke else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, _csv(int if key in ("tokens", "ranks") else str)(value)
                    if isinstance(value, str) else value)
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = shape_parser(__doc__, METHODS, DEFAULTS, " (deepspeed_fp8 JIT-compiles DeepSpeed's fp_quantizer op on "
                      "first use: minutes)", "tiny shapes, few steps; runs without CUDA (PyTorch reference path) to "
                      "test the script")
    return fill_defaults(ap.parse_args(argv), DEFAULTS, SMOKE_DEFAULTS)


def base_header(device: torch.device, **versions: str) -> dict:
    """Device, torch, triton, CUDA, `versions`, date, timing and command of a kernel benchmark run."""
    import triton

    cpu = f"CPU ({platform.processor() or platform.machine()})"
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        torch=torch.__version__, triton=triton.__version__, **versions, cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        timing="CUDA events" if device.type == "cuda" else "wall clock",
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    )


def header(device: torch.device) -> dict:
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = "not installed"
    return base_header(device, deepspeed=ds_version)


def cell(res: dict, notes: list[str], speedup_key: str) -> str:
    """A table cell: "ms, TF/s, speed-up", or "n/a [i]" with the reason as note i."""
    if "ms" not in res:
        if res["unavailable"] not in notes:
            notes.append(res["unavailable"])
        return f"n/a [{notes.index(res['unavailable']) + 1}]"
    speedup = res.get(speedup_key)
    tflops = f"{res['tflops']:.0f}" if res["tflops"] >= 10 else f"{res['tflops']:.2g}"
    return f"{res['ms']:.3f} ms, {tflops} TF/s" + (f", {speedup:.2f}x" if speedup else "")


def err_cell(value: float | str, notes: list[str]) -> str:
    return f"{value:.1e}" if isinstance(value, float) else cell({"unavailable": value}, notes, "")


def markdown(head: dict, rows: list[dict], args: argparse.Namespace) -> str:
    notes: list[str] = []
    out = [f"FP8 LoRA linear, forward + backward: {head['device']}, torch {head['torch']}, triton {head['triton']}, "
           f"deepspeed {head['deepspeed']}, {head['date']}",
           f"`{head['command']}`; median of {args.iters} steps after {args.warmup} ({head['timing']}); "
           f"alpha {args.alpha:g}; TFLOP/s over 4MNK + 6Mr(N+K); speed-up vs {METHODS[BASELINE]}; "
           f"rel err vs float64 over the same dequantized W, first {args.err_rows} tokens",
           "",
           "| model | layer | M | N | K | r | " + " | ".join(METHODS.values()) + " | rel err weight-only | "
           "rel err fp8 compute |",
           "|---|---|--:|--:|--:|--:|" + "--:|" * (len(METHODS) + 2)]
    for row in rows:
        cells = [cell(row["results"][name], notes, f"speedup_vs_{BASELINE}") for name in METHODS]
        out.append(f"| {row['model']} | {row['layer']} | {row['M']} | {row['N']} | {row['K']} | {row['r']} | "
                   + " | ".join(cells) + f" | {err_cell(row['rel_err_weight_only'], notes)} | "
                   f"{err_cell(row['rel_err_fp8_compute'], notes)} |")
    out += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    out += [""] + summary(rows)
    return "\n".join(out)


def summary(rows: list[dict]) -> list[str]:
    """Per model: geometric-mean speed-up of each method over its rows, and the worst weight-only error."""
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        parts = []
        for name in METHODS:
            ups = [row["results"][name].get("speedup_vs_bf16_lora") for row in mine]
            ups = [u for u in ups if u]
            if ups and name != BASELINE:
                parts.append(f"{METHODS[name]} {math.exp(statistics.fmean(map(math.log, ups))):.2f}x")
        errs = [row["rel_err_weight_only"] for row in mine if isinstance(row["rel_err_weight_only"], float)]
        worst = f"; worst weight-only rel err {max(errs):.1e}" if errs else ""
        lines.append(f"- {model}: geometric-mean speed-up vs bf16 + eager LoRA: {', '.join(parts) or 'n/a'}{worst}")
    return lines


def bench_device(args: argparse.Namespace, script: str) -> torch.device | None:
    """The GPU; the CPU with --smoke; else None, after saying why on stderr."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if args.smoke:
        return torch.device("cpu")
    print(f"{script}: this benchmark needs a CUDA GPU (none found); use --smoke for a CPU check of the script",
          file=sys.stderr)
    return None


def run_shapes(args: argparse.Namespace, device: torch.device, row: Callable[..., dict]) -> list[dict]:
    """row(model, layer, M, r, args, device) for every shape the options name, with progress on stderr."""
    shapes = [(mo, la, m, r) for mo in args.models for la in args.layers for m in args.tokens for r in args.ranks]
    rows = []
    for i, (model, layer, m, r) in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] {model} {layer}_proj M={m} r={r}", file=sys.stderr, flush=True)
        rows.append(row(model, layer, m, r, args, device))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench_device(args, "fp8_lora_linear.py")
    if device is None:
        return 2
    head = header(device)
    rows = run_shapes(args, device, run_row)
    tuned = kernels.tuned_configs()  # what triton.autotune picked for each shape (empty without a GPU)
    print(markdown(head, rows, args))
    if tuned:
        print("\nTiles autotune picked (kernel, mode, M bucket, N K r dtypes: BLOCK_M x N x K, warps, stages):\n")
        for t in tuned:
            c = t["config"]
            print(f"- {t['kernel']} {t['mode']} M<={t['m_bucket']} {' '.join(t['key'])}: {c['BLOCK_M']} x "
                  f"{c['BLOCK_N']} x {c['BLOCK_K']}, {c['num_warps']} warps, {c['num_stages']} stages")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(header=head, methods=METHODS, baseline=BASELINE, rows=rows,
                                             autotune=tuned), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
