"""benchmarks/gpu_proof.sh rehearsed on CPU (--dry-run), so that the GPU run is known to work before a GPU is lent:
every stage runs its real command at tiny shapes and records a result; the JSON and the markdown say what each
measured. Also: a run cut short by its budget still records every stage, bad input is one line, and the wheel
list of benchmarks/gpu_wheels.sh covers what the GPU image lacks. Times are not checked here."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from proc import run_job

REPO = Path(__file__).resolve().parents[1]
PROOF = REPO / "benchmarks" / "gpu_proof.sh"
WHEELS = REPO / "benchmarks" / "gpu_wheels.sh"
STAGES = ["env", "compile", "gpu_tests", "fp8_kernels", "throughput", "capacity", "load", "nf4"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the proof sets it in a dry run
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "llama-ft" / "torch_extensions"))
    env["PYTHON"] = sys.executable
    return env


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _probe_wheel(folder: Path) -> Path:
    """A minimal valid wheel whose metadata asks for a torch that does not exist: installed by stage 1, its unmet
    requirement must show up in the stage's record (so the carried site really was installed and inspected)."""
    name, files = "llama_ft_proof_probe", {}
    dist = f"{name}-1.0.dist-info"
    files[f"{name}/__init__.py"] = b"VERSION = '1.0'\n"
    files[f"{dist}/METADATA"] = b"Metadata-Version: 2.1\nName: llama-ft-proof-probe\nVersion: 1.0\n" \
                                b"Requires-Dist: torch>=999\n"
    files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()}," \
              f"{len(data)}" for path, data in files.items()]
    files[f"{dist}/RECORD"] = ("\n".join(record + [f"{dist}/RECORD,,"]) + "\n").encode()
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
    return path


@pytest.mark.slow
def test_dry_run_records_every_stage(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = _probe_wheel(wheels)
    out = tmp_path / "proof"
    proc = run_job(["bash", str(PROOF), "--dry-run", "--wheels", str(wheels), str(out)], timeout=600, cwd=REPO,
                   env=_env())  # kills the launchers' ranks too on a timeout
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu_proof.json").read_text())
    md = (out / "gpu_proof.md").read_text()
    head = report["header"]
    assert head["dry_run"] is True and "no GPU" in head["device"] and head["date"] and head["commit"]
    assert "--dry-run" in head["command"] and head["versions"]["torch"] and head["versions"]["deepspeed"]
    stages = {s["key"]: s for s in report["stages"]}
    assert [s["key"] for s in report["stages"]] == STAGES and [s["stage"] for s in report["stages"]] == list(
        range(1, 9))
    for s in report["stages"]:
        assert s["status"] in ("ok", "skipped"), (s["key"], s["status"], s.get("reason"))
        assert _finite(s["seconds"]) and 0 <= s["seconds"] <= s["limit_s"] + 15, s["key"]
        assert s["commands"] and all(isinstance(c, str) and c for c in s["commands"]), s["key"]

    env = stages["env"]["results"]
    assert stages["env"]["status"] == "ok" and env["wheels_installed"] == [wheel.name]
    assert env["cuda_available"] is False and not env["import_errors"]
    assert any("llama-ft-proof-probe needs torch>=999" in u for u in env["carried_unmet_requirements"])
    assert "--no-index --no-deps" in stages["env"]["commands"][0]

    # the kernels compiled for sm_90 (the default configurations), the table in the markdown
    comp = stages["compile"]
    assert comp["status"] == "ok" and comp["results"]["arch"] == "sm_90", comp.get("reason")
    assert comp["results"]["rows"] and all(r["ok"] and r["arch"] == "sm_90" for r in comp["results"]["rows"])
    assert {r["mode"] for r in comp["results"]["rows"]} >= {"weight-only", "fp8-compute"}
    assert all(r["spill_stores"] == 0 for r in comp["results"]["rows"] if r["default"])
    assert "| fp8 fwd | weight-only |" in md

    # no CUDA: pytest ran the gpu-marked tests and skipped each; the stage says so
    tests = stages["gpu_tests"]
    assert tests["status"] == "skipped" and "no CUDA device" in tests["reason"]
    assert tests["results"]["counts"]["skipped"] == len(tests["results"]["cases"]) >= 3
    assert "tests/test_fp8.py" in tests["results"]["files"] and "-m gpu -x -q" in tests["commands"][0]

    fp8 = stages["fp8_kernels"]
    assert fp8["status"] == "ok" and fp8["commands"][0].startswith("TRITON_INTERPRET=1 ")
    for row in fp8["results"]["rows"]:
        for method in ("weight_only", "fp8_compute", "bf16_lora"):
            assert _finite(row["results"][method]["ms"]) and row["results"][method]["ms"] > 0, (method, row)
        assert row["results"]["deepspeed_fp8"] == {"unavailable": "not run (--methods)"}
        assert 0 < row["rel_err_weight_only"] <= 1e-2 and 0 < row["rel_err_fp8_compute"] <= 5e-2
    model = fp8["results"]["models"]["tiny"]
    assert _finite(model["weight_only_speedup"]) and model["goals"]["weight-only rel err <= 1e-2"] is True

    tput = stages["throughput"]
    assert tput["status"] == "ok"
    methods = tput["results"]["methods"]
    assert set(methods) == {"hf"}  # llama-ft's run is rehearsed by the capacity stage (the dry run's time)
    for name, m in methods.items():
        for key in ("trained_tokens_per_s", "tokens_per_s", "step_time_s", "model_tflops_per_s", "peak_memory_bytes"):
            assert _finite(m[key]) and m[key] > 0, (name, key, m[key])
        assert m["trained_tokens_per_s"] < m["tokens_per_s"] and m["mfu"] is None  # no GPU, no peak to divide by
        flops = tput["results"]["config"]["model_flops_per_token"]
        assert m["model_tflops_per_s"] == pytest.approx(flops * m["tokens_per_s"] / 1e12)

    cap = stages["capacity"]["results"]
    assert stages["capacity"]["status"] == "ok" and cap["flags_match"] is True
    assert {"--quantize", "--gradient_checkpointing", "--offload_ratio"} <= set(cap["train_flags"])
    assert _finite(cap["predicted_bytes"]) and _finite(cap["measured_bytes"]) and cap["measured_bytes"] > 0
    assert cap["measured_kind"] == "peak_rss_bytes" and cap["plan_fits"] is True
    assert cap["error"] == pytest.approx((cap["predicted_bytes"] - cap["measured_bytes"]) / cap["measured_bytes"])
    assert cap["offload_ratio_used"] == 0.0  # --offload_ratio auto on CPU ranks: nothing to move
    assert "llama_ft.cli plan" in stages["capacity"]["commands"][1]
    for key in ("trained_tokens_per_s", "tokens_per_s", "model_tflops_per_s"):
        assert _finite(cap["run"][key]) and cap["run"][key] > 0, key

    load = stages["load"]["results"]
    assert stages["load"]["status"] == "ok" and load["layers"] == 2 and load["page_cache"] == "warm"
    assert 0.99 <= load["read_vs_checkpoint"] <= 1.05  # the stream loader reads the checkpoint once
    assert load["offload"]["ratio"] == 0.5 and load["offload"]["offloaded_bytes"] > 0
    assert _finite(load["load_seconds"]) and load["load_seconds"] > 0
    assert load["formula_bytes_at_these_layers"] == load["checkpoint_bytes"]  # what the extrapolation stands on
    assert load["full_checkpoint_bytes"] > load["checkpoint_bytes"] and load["full_load_seconds_extrapolated"] > \
        load["load_seconds"]

    nf4 = stages["nf4"]
    assert nf4["status"] == "ok", nf4.get("reason")
    assert nf4["commands"][0].startswith("TRITON_INTERPRET=1 ") and "nf4_lora_linear.py" in nf4["commands"][0]
    assert "--methods ours_nf4,hf_qlora" in nf4["commands"][1]
    (row,) = nf4["results"]["kernels"]["rows"]
    for method in ("ours_nf4", "peft_qlora", "bnb_matmul", "bf16_lora"):
        assert _finite(row["results"][method]["ms"]) and row["results"][method]["ms"] > 0, (method, row)
    assert 0 < row["rel_err"]["ours_nf4"] <= 1e-2 and 0 < row["rel_err"]["peft_qlora"] <= 1e-2
    assert nf4["results"]["kernels"]["header"]["kernels"] == "Triton"  # the interpreter ran our kernels
    # train_throughput's 4-bit pair (tests/test_benchmark_scripts.py runs its other methods): llama-ft on its NF4
    # base and HF Trainer + PEFT on bitsandbytes Linear4bit layers (its worker checks 7 a layer, no ZeRO-3) train
    training = nf4["results"]["training"]
    assert set(training["methods"]) == {"ours_nf4", "hf_qlora"}, training["methods"]
    ours, qlora = training["methods"]["ours_nf4"], training["methods"]["hf_qlora"]
    for res in (ours, qlora):
        assert _finite(res["trained_tokens_per_s"]) and res["trained_tokens_per_s"] > 0, res
    assert training["ratio_ours_nf4_vs_hf_qlora"] == pytest.approx(ours["trained_tokens_per_s"] /
                                                                    qlora["trained_tokens_per_s"])

    lines = md.splitlines()
    assert "dry run" in lines[0] and head["device"] in lines[0] and head["date"] in lines[0]
    rows = [ln for ln in lines if ln.startswith("| ") and ln.split("|")[1].strip()[:2] in {f"{i}." for i in
                                                                                           range(1, 9)}]
    assert [r.split("|")[2].strip() for r in rows] == [stages[k]["status"] for k in STAGES]
    assert "no CUDA device" in rows[2]
    for s in report["stages"]:
        assert all(f"- {s['stage']}: `{c}`" in md for c in s["commands"])
    assert "rel err weight-only" in md and "trained tok/s" in md and "| stream | all |" in md  # the scripts' tables
    assert "===== fp8-kernels:" in (out / "gpu_proof.log").read_text()
    assert proc.stdout.strip() == md.strip()  # the table is printed too, for a caller that sees only stdout


def test_budget_cut_short_still_records_every_stage(tmp_path):
    """With no time left after stage 1, each later stage is skipped with that reason, and both files are written."""
    out = tmp_path / "proof"
    proc = subprocess.run(["bash", str(PROOF), "--dry-run", "--budget", "1", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_proof.json").read_text())
    assert [s["key"] for s in report["stages"]] == STAGES
    assert report["stages"][0]["status"] == "ok"
    for s in report["stages"][1:]:
        assert s["status"] == "skipped" and s["reason"].startswith("no time left"), s
    assert (out / "gpu_proof.md").read_text().count("| skipped |") == len(STAGES) - 1


@pytest.mark.parametrize("args,expect", [
    ([], "OUTDIR"),
    (["--wheels", "{tmp}/nowhere", "{tmp}/out"], "--wheels"),
    (["--wheels", "{tmp}", "{tmp}/out"], "no .whl files"),
    (["--stages", "env,bogus", "{tmp}/out"], "--stages env,bogus"),
    (["--budget", "0", "{tmp}/out"], "--budget 0"),
    (["{tmp}/file"], "is not a directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, expect):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run(["bash", str(PROOF), *argv], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_proof.sh: error:") and expect in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_wheels_list_covers_what_the_image_lacks():
    """gpu_wheels.sh --list (nothing fetched): deepspeed, datasets, bitsandbytes and the packages they need beyond
    the GPU image, one pinned version each; stage 1 of the proof imports the first four. The real download is done
    by hand."""
    proc = subprocess.run(["bash", str(WHEELS), "--list"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    pins = dict(line.split("==") for line in proc.stdout.split())
    assert set(pins) == {"deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                         "datasets", "dill", "multiprocess", "bitsandbytes"}
    assert all(v and v[0].isdigit() for v in pins.values())
    saved = list(sys.path)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_proof.stages.env import REQUIRED
    finally:
        sys.path[:] = saved
    assert {"deepspeed", "hjson", "pydantic", "datasets"} <= set(REQUIRED)


@pytest.mark.parametrize("args,expect", [([], "expected DIR"), (["--bogus"], "--bogus: unknown option"),
                                         (["a", "b"], "expected one DIR")])
def test_gpu_wheels_bad_arguments(args, expect):
    proc = subprocess.run(["bash", str(WHEELS), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_wheels.sh: error:") and expect in lines[0], proc.stderr
