"""Stage 2, compile: `llama-ft kernels --compile sm_XY --json` for the GPU in hand (its compute capability as
stage 1 recorded it), before anything is timed: every Triton kernel at the configurations its dispatcher
uses for training shapes (`--defaults`), with ok or the compile error, registers, spill stores and shared memory;
the table is printed. Failed when a row does not compile. The full sweep (every configuration autotune can pick)
gives the same table on any machine with the same Triton, so it is in BENCHMARKS.md from the CPU machine and the
proof spends its seconds on the defaults with the GPU image's own Triton. Dry run: sm_90 (the GPU the proof is
written for)."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..runner import Proof, Stage, shown

DRY_ARCH = "sm_90"


def stage_compile(p: Proof, limit: float) -> dict[str, Any]:
    cap = p.env_info.get("capability")
    if not p.dry and not cap:
        return {"status": "failed", "commands": [], "reason": "stage 1 recorded no compute capability (no CUDA?)"}
    arch = f"sm_{cap[0]}{cap[1]}" if cap and not p.dry else DRY_ARCH
    out = p.scratch / "kernels.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "llama_ft.cli", "kernels", "--compile", arch, "--json", str(out), "--defaults"]
    ran = p.run(cmd, limit, "compile")
    result: dict[str, Any] = {"commands": [shown(cmd)], "table_md": ran.stdout.strip()}
    if not out.exists():
        return {**result, "status": "timeout" if ran.rc == 124 else "failed", "reason": ran.why(limit)}
    rows = json.loads(out.read_text())["rows"]
    print(ran.stdout.strip(), file=sys.stderr, flush=True)  # the table, before the timed stages start
    bad = [r for r in rows if not r["ok"]]
    spills = [r for r in rows if r["default"] and r["spill_stores"]]
    result.update(results={"arch": arch, "rows": rows}, summary=f"{arch}: {len(rows)} configurations, {len(bad)} "
                  f"do not compile, {len(spills)} default ones spill")
    if bad:
        return {**result, "status": "failed", "reason": f"{bad[0]['kernel']} {bad[0]['tiles']}: {bad[0]['error']}"}
    return {**result, "status": "ok"}


STAGE = Stage("compile", "every Triton kernel compiled for this GPU", stage_compile, 60, 90, 20)
