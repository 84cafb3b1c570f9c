"""NF4 (4-bit) LoRA linear, forward + backward, at Llama 3.1 layer shapes: ours vs the QLoRA path users run.

Reproduce (one CUDA GPU with bitsandbytes and peft installed, from the repository root):

    python benchmarks/nf4_lora_linear.py --json nf4_bench.json            # 70B q, gate, down; 4,096 tokens; r 16, 64
    python benchmarks/nf4_lora_linear.py --models 8b,70b --tokens 4096,16384 --json nf4_bench.json
    TRITON_INTERPRET=1 python benchmarks/nf4_lora_linear.py --smoke --json /tmp/smoke.json   # CPU check of the script

What one timed step is (one layer of one training step), the same for every method:
    x (M, K) bf16, requires_grad      W (N, K) frozen, NF4 (blocks of 64)      A (r, K), B (N, r) bf16, requires_grad
    y = x W^T + s (x A^T) B^T,  s = alpha / r;   (dx, dA, dB) = autograd.grad(y, (x, A, B), dy),  dy random
The time is the median over --iters steps after --warmup steps, each bracketed by CUDA events (wall clock on
CPU, where only --smoke runs).

Methods (one column each):
    ours_nf4     llama_ft.quant.quant_lora_linear with llama_ft.nf4.ops.NF4Ops: W as packed NF4 codes + fp32
                 absmax per 64 weights, decoded inside the Triton GEMMs (forward and dx), the LoRA up-projection
                 fused into the same output tile; dA, dB, t = x A^T, u = dy B in cuBLAS
    peft_qlora   PEFT's LoRA layer on a bitsandbytes `Linear4bit` (nf4, double-quantized absmax, bf16 compute):
                 peft.tuners.lora.bnb.Linear4bit, what `get_peft_model` puts on a model loaded with
                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") -- the QLoRA path; THE BASELINE
    bnb_matmul   bitsandbytes.matmul_4bit(x, W4^T, quant_state) + s * F.linear(F.linear(x, A), B): the same without
                 the module layers (what Linear4bit + LoRA reduce to)
    bf16_lora    F.linear(x, W_bf16) + s * F.linear(F.linear(x, A), B): the unquantized bf16 path, for scale
Speed-ups are time(peft_qlora) / time(method). Goal (issue 26): ours_nf4 >= 1.3x peft_qlora at 70B shapes.

FLOPs per step, counted the same for every method (decoding is not counted):
    4 M N K (frozen base: forward + input gradient) + 6 M r (N + K) (LoRA forward, dx share, dA, dB)

Accuracy: each 4-bit method's forward output on the first --err-rows tokens against float64 over ITS OWN
dequantized weights (ours: codes x fp32 absmax; bitsandbytes: dequantize_4bit, what its matmul multiplies),
y64 = x W_dq^T + s (x A^T) B^T, rel err = ||y - y64||_F / ||y64||_F. This is the kernels' arithmetic error, not
the quantization error (both formats round W to the same 16 levels; bitsandbytes also 8-bit-codes the absmax).

Output: one markdown table on stdout (progress on stderr); --json PATH writes every row.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from fp8_lora_linear import (  # the shapes, timing and table helpers are the FP8 benchmark's (same methodology)
    LAYERS,
    MODELS,
    Forward,
    LoRAOperands,
    Unavailable,
    base_header,
    bench_device,
    cell,
    err_cell,
    error_or_reason,
    fill_defaults,
    lora_operands,
    release_memory,
    run_shapes,
    shape_parser,
    step_flops,
    timed_results,
)

from llama_ft.nf4 import quantize_nf4_reference
from llama_ft.nf4.ops import NF4Ops, flat_rows
from llama_ft.quant import quant_lora_linear

METHODS = {
    "ours_nf4": "ours, NF4 Triton (decode in the GEMM)",
    "peft_qlora": "PEFT LoRA on bnb Linear4bit (QLoRA)",
    "bnb_matmul": "bnb.matmul_4bit + eager LoRA",
    "bf16_lora": "bf16 F.linear + eager LoRA",
}
BASELINE = "peft_qlora"
ERR_METHODS = ("ours_nf4", "peft_qlora")
GOAL = 1.3

DEFAULTS = dict(models="70b", tokens="4096", ranks="16,64", layers="q,gate,down", warmup=5, iters=20)
SMOKE_DEFAULTS = dict(models="tiny", tokens="64", ranks="16", layers="q,gate,down", warmup=1, iters=2)


@dataclass
class Problem(LoRAOperands):
    """The operands and W's NF4 storage in our layout (bitsandbytes quantizes W itself; bf16_lora uses it as is)."""

    packed: torch.Tensor  # (N * K / 2,) uint8, two codes a byte (bitsandbytes' order)
    absmax_bytes: torch.Tensor  # (N * K / 64 * 4,) uint8: the fp32 absmax per block of 64, as raw bytes


def make_problem(m: int, n: int, k: int, r: int, alpha: float, device: torch.device, seed: int = 0) -> Problem:
    ops = lora_operands(m, n, k, r, alpha, device, seed)
    packed, absmax = quantize_nf4_reference(ops["w"])
    return Problem(**ops, packed=packed, absmax_bytes=absmax.view(torch.uint8))


def ours_nf4(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    n, k = p.w.shape
    ops, storage = NF4Ops(n, k), (p.packed, p.absmax_bytes)
    return lambda: quant_lora_linear(p.x, ops, n, storage, p.a, p.b, p.scaling), [p.x, p.a, p.b]


def _bnb():
    try:
        with _quiet():
            import bitsandbytes
    except ImportError as e:
        raise Unavailable(f"bitsandbytes is not installed ({e})") from e
    return bitsandbytes


class _quiet:
    """Send stdout to stderr for a block (bitsandbytes prints on import when it finds no native kernel)."""

    def __enter__(self):
        self._out, sys.stdout = sys.stdout, sys.stderr

    def __exit__(self, *exc):
        sys.stdout = self._out


def linear4bit(p: Problem):
    """bitsandbytes.nn.Linear4bit holding W as QLoRA stores it: nf4, double-quantized absmax, bf16 compute;
    quantized by bitsandbytes itself when moved to the device."""
    bnb = _bnb()
    n, k = p.w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4", quant_storage=torch.uint8)
    lin.weight = bnb.nn.Params4bit(p.w.detach().cpu(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64, quant_storage=torch.uint8)
    return lin.to(p.x.device)


def peft_layer(p: Problem) -> torch.nn.Module:
    """PEFT's LoRA layer for bitsandbytes 4-bit bases around `linear4bit(p)`, with our A and B."""
    lin = linear4bit(p)
    try:
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError as e:
        raise Unavailable(f"peft's bitsandbytes LoRA layer does not import ({e})") from e
    config = LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=0.0)
    layer = LoraLinear4bit(lin, "default", config=config, r=p.r, lora_alpha=p.alpha)
    for mod, value in ((layer.lora_A["default"], p.a), (layer.lora_B["default"], p.b)):
        mod.to(device=p.x.device, dtype=torch.bfloat16)
        with torch.no_grad():
            mod.weight.copy_(value)
    return layer


def peft_qlora(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    layer = peft_layer(p)
    return (lambda: layer(p.x)), [p.x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def bnb_matmul(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    bnb = _bnb()
    weight = linear4bit(p).weight
    return (lambda: bnb.matmul_4bit(p.x, weight.t(), quant_state=weight.quant_state)
            + p.scaling * F.linear(F.linear(p.x, p.a), p.b)), [p.x, p.a, p.b]


def bf16_lora(p: Problem) -> tuple[Forward, list[torch.Tensor]]:
    return lambda: F.linear(p.x, p.w) + p.scaling * F.linear(F.linear(p.x, p.a), p.b), [p.x, p.a, p.b]


BUILDERS: dict[str, Callable[[Problem], tuple[Forward, list[torch.Tensor]]]] = {
    "ours_nf4": ours_nf4,
    "peft_qlora": peft_qlora,
    "bnb_matmul": bnb_matmul,
    "bf16_lora": bf16_lora,
}


@torch.no_grad()
def relative_error(name: str, p: Problem, rows: int, chunk: int = 2048) -> float:
    """||y - y64|| / ||y64|| on the first `rows` tokens; y64 in float64 over the method's own dequantized W."""
    n, k = p.w.shape
    x = p.x.detach()[:rows]
    a, b = p.a.detach(), p.b.detach()
    x64 = x.double()
    ref = p.scaling * (x64 @ a.double().T) @ b.double().T
    if name == "ours_nf4":
        y = quant_lora_linear(x, NF4Ops(n, k), n, (p.packed, p.absmax_bytes), a, b, p.scaling)
        absmax = p.absmax_bytes.view(torch.float32)
        stripe = lambda rs: flat_rows(p.packed, absmax, n, k, rs, torch.float32)  # noqa: E731
    else:
        layer = peft_layer(p)
        y = layer(x)
        bnb = _bnb()
        weight = layer.base_layer.weight
        w_dq = bnb.functional.dequantize_4bit(weight, weight.quant_state)  # (N, K) bf16: what its matmul uses
        stripe = lambda rs: w_dq[rs]  # noqa: E731
    for n0 in range(0, n, chunk):  # W in float64 one stripe of rows at a time
        rs = slice(n0, min(n0 + chunk, n))
        ref[:, rs] += x64 @ stripe(rs).double().T
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_row(model: str, layer: str, m: int, r: int, args: argparse.Namespace, device: torch.device) -> dict:
    n, k = LAYERS[layer](MODELS[model])
    cuda = device.type == "cuda"
    p = make_problem(m, n, k, r, args.alpha, device)
    flop = step_flops(m, n, k, r)
    results = timed_results(p, flop, args, cuda, METHODS, BASELINE, BUILDERS)
    errors = {name: error_or_reason(partial(relative_error, name, p, args.err_rows), cuda) if name in args.methods
              else "not run (--methods)" for name in ERR_METHODS}
    row = dict(model=model, layer=f"{layer}_proj", M=m, N=n, K=k, r=r, alpha=args.alpha, flop=flop,
               rel_err=errors, results=results)
    del p
    release_memory(cuda)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = shape_parser(__doc__, METHODS, DEFAULTS, "", "tiny shapes, few steps, runs without CUDA (set "
                      "TRITON_INTERPRET=1 to run our Triton kernels under the interpreter; otherwise their PyTorch "
                      "reference) to test the script")
    args = fill_defaults(ap.parse_args(argv), DEFAULTS, SMOKE_DEFAULTS)
    if BASELINE not in args.methods:
        ap.error(f"--methods: the baseline {BASELINE} must be one of them (the speed-ups are against it)")
    return args


def header(device: torch.device) -> dict:
    import os

    def version(module: str) -> str:
        try:
            with _quiet():
                return __import__(module).__version__
        except ImportError:
            return "not installed"

    kernels = "Triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "PyTorch reference"
    return base_header(device, bitsandbytes=version("bitsandbytes"), peft=version("peft"), kernels=kernels)


def geomean(xs: list) -> float | None:
    xs = [x for x in xs if isinstance(x, float) and math.isfinite(x) and x > 0]
    return math.exp(statistics.fmean(map(math.log, xs))) if xs else None


def summary(rows: list[dict]) -> dict:
    """Per model: geometric-mean speed-up of ours over PEFT + bitsandbytes, the goal, the worst errors."""
    out = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        up = geomean([row["results"]["ours_nf4"].get("speedup_vs_peft_qlora") for row in mine])
        errs = {name: [row["rel_err"][name] for row in mine if isinstance(row["rel_err"][name], float)]
                for name in ERR_METHODS}
        out[model] = {"ours_vs_peft_qlora": up, "goal_1_3x": None if up is None else up >= GOAL,
                      "worst_rel_err": {name: max(v) if v else None for name, v in errs.items()}}
    return out


def markdown(head: dict, rows: list[dict], args: argparse.Namespace, totals: dict) -> str:
    notes: list[str] = []
    out = [f"NF4 LoRA linear, forward + backward: {head['device']}, torch {head['torch']}, triton {head['triton']}, "
           f"bitsandbytes {head['bitsandbytes']}, peft {head['peft']}, {head['date']}",
           f"`{head['command']}`; our kernels: {head['kernels']}; median of {args.iters} steps after {args.warmup} "
           f"({head['timing']}); alpha {args.alpha:g}; TFLOP/s over 4MNK + 6Mr(N+K); speed-up vs "
           f"{METHODS[BASELINE]}; rel err vs float64 over each method's own dequantized W, first {args.err_rows} "
           "tokens",
           "",
           "| model | layer | M | N | K | r | " + " | ".join(METHODS.values()) + " | rel err ours | rel err PEFT |",
           "|---|---|--:|--:|--:|--:|" + "--:|" * (len(METHODS) + 2)]
    for row in rows:
        cells = [cell(row["results"][name], notes, f"speedup_vs_{BASELINE}") for name in METHODS]
        out.append(f"| {row['model']} | {row['layer']} | {row['M']} | {row['N']} | {row['K']} | {row['r']} | "
                   + " | ".join(cells) + " | " + " | ".join(err_cell(row["rel_err"][n], notes) for n in ERR_METHODS)
                   + " |")
    out += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)] + [""]
    for model, s in totals.items():
        up = s["ours_vs_peft_qlora"]
        goal = "n/a" if up is None else ("holds" if s["goal_1_3x"] else "does not hold")
        errs = ", ".join(f"{n} {e:.1e}" for n, e in s["worst_rel_err"].items() if e is not None)
        out.append(f"- {model}: ours vs PEFT + bitsandbytes (geometric mean) "
                   f"{'n/a' if up is None else f'{up:.2f}x'} (goal >= {GOAL}x: {goal}); worst rel err {errs or 'n/a'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench_device(args, "nf4_lora_linear.py")
    if device is None:
        return 2
    head = header(device)
    rows = run_shapes(args, device, run_row)
    totals = summary(rows)
    print(markdown(head, rows, args, totals))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(header=head, methods=METHODS, baseline=BASELINE, goal=GOAL, rows=rows,
                                             summary=totals), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
