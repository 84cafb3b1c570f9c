"""Stage 3, gpu_tests: `pytest -m gpu -x -q` on the test files that have gpu-marked tests: the Triton kernels at
real sizes against PyTorch and float64, pinned offload. Dry run: the same command; every test skips without
CUDA, so the stage is "skipped" with that reason."""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ..runner import REPO, Proof, Stage, shown


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


STAGE = Stage("gpu_tests", "pytest -m gpu", stage_gpu_tests, 90, 90)
