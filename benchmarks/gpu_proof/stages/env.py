"""Stage 1, env: installs the wheels of --wheels DIR (`pip install --no-index --no-deps --target`, put on
PYTHONPATH: the GPU image lacks deepspeed, hjson, pydantic and datasets, see gpu_wheels.sh), then records the
versions of everything the later stages import, the GPU (name, memory, capability, CUDA, NCCL, driver), a bf16
matmul on it, and any carried wheel whose declared requirements the image does not meet. Failed if a package
does not import or (GPU form) CUDA is not available. Always runs, in full: the later stages read what it
records (Proof.env_info)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..runner import GiB, Proof, Stage, shown

PACKAGE = Path(__file__).resolve().parents[1]  # benchmarks/gpu_proof: `python PACKAGE --env-probe FILE`
REQUIRED = ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "deepspeed",
            "hjson", "pydantic", "datasets", "numpy", "psutil")
"""What the stages import; each is recorded with its version, or the error that stopped its import."""


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
    cmd = [sys.executable, str(PACKAGE), "--env-probe", str(probe_file)]
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


STAGE = Stage("env", "environment", stage_env, 90, 90, 0)
