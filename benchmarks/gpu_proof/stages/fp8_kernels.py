"""Stage 4, fp8_kernels: benchmarks/fp8_lora_linear.py at the 8B and 70B layer shapes (q, gate, down; 4,096
tokens; r 16 and 64): ours weight-only, ours fp8 compute, bf16 F.linear + eager LoRA, forward + backward,
CUDA-event medians, and the float64 error check. Dry run: --smoke (tiny q_proj) with TRITON_INTERPRET=1, so
the Triton kernels themselves run, on CPU."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from ..runner import HERE, Proof, Stage, finite, shown

FP8_METHODS = "weight_only,fp8_compute,bf16_lora"
DRY_FP8_TOKENS = "64"  # one 64-row tile: the interpreter's cost grows with the programs it runs


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
    result.update(results={"models": models, "rows": report["rows"], "header": report["header"],
                           "autotune": report.get("autotune", [])},
                  table_md=ran.stdout.strip(), summary=summary)
    if unmeasured:
        return {**result, "status": "failed", "reason": f"not measured: {unmeasured[0]}"}
    return {**result, "status": "ok"}


STAGE = Stage("fp8_kernels", "FP8 LoRA linear kernels", stage_fp8_kernels, 110, 90)
