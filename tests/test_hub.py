"""`llama-ft download` against a fake Hub on 127.0.0.1 (tests/hub_server.py), through the real huggingface_hub.

huggingface_hub reads HF_ENDPOINT (and HF_HUB_OFFLINE, which conftest sets for the suite) when it is
imported, so the command runs in a subprocess with HF_ENDPOINT pointing at the fake server. The repo
served is the tiny Llama checkpoint (bf16, 6 shards + index, config, tokenizer) plus the decoys a
real Llama 3.1 repo has (pytorch_model.bin, original/consolidated.00.pth) that the default must skip.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hub_server import COMMIT, FakeHub, Fault
from proc import run_job

from llama_ft.errors import UserError

REPO = "meta-llama/Tiny-Llama-3.1"
ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_tEsTsEcReT0123456789abcdefghij"
DECOYS = {"pytorch_model.bin": b"\x80\x02pickle" * 100, "original/consolidated.00.pth": b"\x80\x02pth" * 100,
          "original/params.json": b"{}", "README.md": b"# tiny\n"}
SHARD = "model-00003-of-00006.safetensors"

# Runs the CLI with shutil.disk_usage reporting argv[1] free bytes (a patch in the child, not of huggingface_hub).
DISK_SHIM = ("import shutil, sys\n"
             "real = shutil.disk_usage\n"
             "free = int(sys.argv.pop(1))\n"
             "shutil.disk_usage = lambda p: real(p)._replace(free=free)\n"
             "from llama_ft.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")


@pytest.fixture(scope="module")
def tiny_files(tiny_model_dir: Path) -> dict[str, bytes]:
    """The tiny checkpoint's files by name."""
    return {p.name: p.read_bytes() for p in sorted(tiny_model_dir.iterdir()) if p.is_file()}


@pytest.fixture
def hub(tiny_files: dict[str, bytes]):
    with FakeHub(REPO, {**tiny_files, **DECOYS}) as h:
        yield h


def cli_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    """The child's environment: the fake hub's endpoint, a private HF_HOME, online, no token of ours."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE",
                        "HF_HUB_DISABLE_XET", "HF_HUB_ENABLE_HF_TRANSFER", "HF_XET_HIGH_PERFORMANCE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def download(endpoint: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
             prefix: tuple[str, ...] = ("-m", "llama_ft.cli"), repo: str = REPO) -> subprocess.CompletedProcess:
    """Run `llama-ft download REPO --local-dir tmp_path/out ARGS` in a subprocess against `endpoint`."""
    cmd = [sys.executable, *prefix, "download", repo, "--local-dir", str(tmp_path / "out"), *args]
    return run_job(cmd, timeout=120, env=env or cli_env(endpoint, tmp_path), cwd=ROOT)


def error_line(r: subprocess.CompletedProcess, alone: bool = True) -> str:
    """The one `llama-ft: error:` line (alone on stderr for errors before the transfer); no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("llama-ft: error: ")]
    assert len(errors) == 1, r.stderr
    if alone:
        assert r.stderr.strip() == errors[0], r.stderr
    return errors[0]


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_selection(tiny_files: dict[str, bytes]) -> set[str]:
    """What the default patterns pick from the served repo."""
    return set(tiny_files)  # every file make_tiny_llama writes is one training/merging reads


# ------------------------------------------------------------------------------------------- success


def test_default_download_fetches_the_checkpoint_and_reports_it(hub, tiny_files, tiny_model_dir, tmp_path):
    r = download(hub.url, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = tmp_path / "out"
    for name, data in tiny_files.items():
        assert (out / name).read_bytes() == data, name
    assert not (out / "pytorch_model.bin").exists() and not (out / "original").exists()
    assert not (out / "README.md").exists()
    assert set(hub.fetched("GET")) == default_selection(tiny_files)
    assert all("authorization" not in q.headers for q in hub.requests)  # no token anywhere: none sent

    # Pinned to the commit `main` pointed to when the files were listed.
    assert all(f"/resolve/{COMMIT}/" in q.path for q in hub.requests if "/resolve/" in q.path)
    assert "transfer: hf-xet" in r.stdout or "transfer: plain HTTPS" in r.stdout

    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    printed = re.search(r"parameters: ([\d,]+) ", r.stdout)
    assert printed and int(printed.group(1).replace(",", "")) == n_params, r.stdout

    bf16 = 0
    for shard in tiny_model_dir.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                assert sl.get_dtype() == "BF16"
                bf16 += 2 * torch.Size(sl.get_shape()).numel()
    assert f"bytes per dtype: BF16 {bf16:,} bytes" in r.stdout, r.stdout
    assert "checkpoint verified: 6 shards" in r.stdout


def test_include_replaces_the_default_patterns(hub, tiny_files, tmp_path):
    r = download(hub.url, tmp_path, "--include", "*.json", "original/*")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    want = {n for n in tiny_files if n.endswith(".json")} | {"original/consolidated.00.pth", "original/params.json"}
    assert set(hub.fetched("GET")) == want
    for name in want:
        assert (out / name).is_file()
    assert not list(out.glob("*.safetensors")) and not (out / "pytorch_model.bin").exists()
    # The index came without its shards, on purpose: no checkpoint check, no error.
    assert "not a whole checkpoint" in r.stdout


@pytest.mark.parametrize("source", ["HF_TOKEN", "stored login"])
def test_token_reaches_the_hub_and_is_never_printed(hub, tmp_path, source):
    env = cli_env(hub.url, tmp_path)
    if source == "HF_TOKEN":
        env["HF_TOKEN"] = SECRET
    else:  # what `hf auth login` writes
        (tmp_path / "hf_home").mkdir()
        (tmp_path / "hf_home" / "token").write_text(SECRET)
    r = download(hub.url, tmp_path, "--include", "config.json", env=env)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert hub.requests and all(q.headers.get("authorization") == f"Bearer {SECRET}" for q in hub.requests)
    assert not any(SECRET in p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_there_is_no_token_flag(hub, tmp_path):
    r = download(hub.url, tmp_path, "--token", SECRET)
    assert "no --token flag" in error_line(r) and "HF_TOKEN" in r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert hub.requests == []


# ------------------------------------------------------------------------------------------- errors before the transfer


@pytest.mark.parametrize("with_token", [False, True])
def test_gated_repo_without_access(tiny_files, tmp_path, with_token):
    with FakeHub(REPO, tiny_files, gated=True, granted_tokens=("hf_someone_else",)) as hub:
        env = cli_env(hub.url, tmp_path, **({"HF_TOKEN": SECRET} if with_token else {}))
        r = download(hub.url, tmp_path, env=env)
        line = error_line(r)
        assert REPO in line and "gated" in line and "hf auth login" in line and "HF_TOKEN" in line
        assert f"{hub.url}/{REPO}" in line  # where to accept the terms
        assert ("has no access" in line) == with_token
        assert SECRET not in r.stdout + r.stderr
        assert hub.fetched("GET") == []
    assert not (tmp_path / "out").exists()


def test_gated_repo_with_access_downloads(tiny_files, tmp_path):
    with FakeHub(REPO, tiny_files, gated=True, granted_tokens=(SECRET,)) as hub:
        r = download(hub.url, tmp_path, "--include", "config.json",
                     env=cli_env(hub.url, tmp_path, HF_TOKEN=SECRET))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out" / "config.json").read_bytes() == tiny_files["config.json"]


@pytest.mark.parametrize("with_token", [False, True])
def test_private_repo_without_access(tiny_files, tmp_path, with_token):
    with FakeHub(REPO, tiny_files, private=True, granted_tokens=("hf_someone_else",)) as hub:
        env = cli_env(hub.url, tmp_path, **({"HF_TOKEN": SECRET} if with_token else {}))
        line = error_line(download(hub.url, tmp_path, env=env))
        assert f"{REPO}: access denied (HTTP 401): the repo is gated or private" in line
        assert "hf auth login" in line and "HF_TOKEN" in line
        assert ("has no access" in line) == with_token
        assert SECRET not in line
    assert not (tmp_path / "out").exists()


def test_rejected_token(hub, tmp_path):
    hub.rejected_tokens = (SECRET,)
    r = download(hub.url, tmp_path, env=cli_env(hub.url, tmp_path, HF_TOKEN=SECRET))
    line = error_line(r)
    assert "rejected the token" in line and "hf auth login" in line and "HF_TOKEN" in line
    assert SECRET not in r.stdout + r.stderr


def test_repo_not_found(hub, tmp_path):
    line = error_line(download(hub.url, tmp_path, repo="meta-llama/No-Such-Model"))
    assert "meta-llama/No-Such-Model" in line and "no such model repo" in line and "404" in line


def test_revision_not_found(hub, tmp_path):
    line = error_line(download(hub.url, tmp_path, "--revision", "v9.9"))
    assert "--revision v9.9" in line and "not found" in line and REPO in line


def test_unreachable_endpoint(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    line = error_line(download(url, tmp_path))
    assert f"the hub at {url} could not be reached" in line and "HF_ENDPOINT" in line
    assert not (tmp_path / "out").exists()


def test_offline_mode(hub, tmp_path):
    line = error_line(download(hub.url, tmp_path, env=cli_env(hub.url, tmp_path, HF_HUB_OFFLINE="1")))
    assert "offline" in line and "HF_HUB_OFFLINE" in line
    assert hub.requests == []


def test_not_enough_disk_space_stops_before_any_file(hub, tiny_files, tmp_path):
    need = sum(len(tiny_files[n]) for n in default_selection(tiny_files))
    r = download(hub.url, tmp_path, prefix=("-c", DISK_SHIM, "1000"))
    line = error_line(r)
    assert f"--local-dir {tmp_path / 'out'}" in line
    assert f"needs {need:,} bytes" in line and "1,000 bytes (1000 B) are available" in line
    assert not (tmp_path / "out").exists()
    assert hub.fetched("GET") == [] and hub.fetched("HEAD") == []


def test_check_free_space_counts_only_what_is_missing(tmp_path):
    from llama_ft import hub as hubmod

    (tmp_path / "a.safetensors").write_bytes(b"x" * 100)  # complete from an earlier run
    (tmp_path / "b.safetensors").write_bytes(b"x" * 10)  # cut off
    selected = {"a.safetensors": 100, "b.safetensors": 50, "c.json": 7}
    need = hubmod.bytes_to_fetch(tmp_path, selected)
    assert need == 57
    assert hubmod.check_free_space(tmp_path, need, free=57) == 57
    with pytest.raises(UserError, match=r"--local-dir .*: not enough free disk space: the download needs 57 bytes"):
        hubmod.check_free_space(tmp_path, need, free=56)
    # A directory that does not exist yet is measured at its nearest existing parent.
    assert hubmod.free_bytes(tmp_path / "new" / "dir") > 0


def test_default_patterns_skip_pickles_and_original():
    from llama_ft import hub as hubmod

    listed = {n: 1 for n in ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
                             "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "chat_template.jinja", "pytorch_model.bin",
                             "original/consolidated.00.pth", "original/tokenizer.model", "original/x.safetensors",
                             "README.md", "LICENSE", ".gitattributes"]}
    assert sorted(hubmod.select_files(listed, None)) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(hubmod.select_files(listed, ["original/*"])) == [
        "original/consolidated.00.pth", "original/tokenizer.model", "original/x.safetensors"]

    from llama_ft import shards

    # hub.py spells these out to stay torch-free until it reads weights; they must not drift.
    assert (hubmod.INDEX_NAME, hubmod.SINGLE_NAME, hubmod.CONFIG_NAME) == (
        shards.INDEX_NAME, shards.SINGLE_NAME, shards.CONFIG_NAME)


def test_disk_full_during_the_transfer_is_one_line(tmp_path):
    """The mapping of each form of a full disk; a real ENOSPC on a small tmpfs, through this fake hub, is
    tests/test_tool_faults.py::test_download_disk_full_then_resume."""
    from llama_ft import hub as hubmod

    w = hubmod.Where(REPO, None, tmp_path / "out", "http://hub", has_token=False, transferring=True)
    msg = str(hubmod.explain(OSError(errno.ENOSPC, "No space left on device", "x.incomplete"), w))
    assert msg.startswith(f"--local-dir {tmp_path / 'out'}: disk full while downloading (No space left on device)")
    assert "run the same command again to resume" in msg and "\n" not in msg
    # with what is still missing, and as hf_xet's Rust writer reports it (text, no errno)
    w.local_dir, w.still_needed = tmp_path, 5 * 2**20
    for exc in (OSError(errno.EDQUOT, "Disk quota exceeded"),
                RuntimeError("Data processing error: I/O error: No space left on device (os error 28)")):
        msg = str(hubmod.explain(exc, w))
        assert msg.startswith(f"--local-dir {tmp_path}: disk full while downloading ("), msg
        assert ": 5,242,880 bytes (5.0 MiB) still to fetch, " in msg and " free; free some space" in msg
        assert "\n" not in msg


def test_finished_files_are_fsynced_and_short_ones_dropped(tmp_path, monkeypatch):
    """What the transfer left is fsynced: files under their final names, their metadata, then their
    directories; a file shorter than listed (a crash after huggingface_hub's rename) is deleted."""
    from llama_ft import hub as hubmod

    meta = tmp_path / ".cache" / "huggingface" / "download"
    for p, data in {tmp_path / "a.safetensors": b"a" * 10, tmp_path / "original" / "params.json": b"{}",
                    meta / "a.safetensors.metadata": b"m", meta / "original" / "params.json.metadata": b"m",
                    tmp_path / "short.json": b"{", tmp_path / "unrelated.txt": b"u"}.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    selected = {"a.safetensors": 10, "original/params.json": 2, "short.json": 2, "not-yet.json": 5}
    assert hubmod.drop_wrong_sized(tmp_path, selected) == ["short.json"]
    assert not (tmp_path / "short.json").exists() and (tmp_path / "a.safetensors").exists()

    synced: list[Path] = []
    monkeypatch.setattr(hubmod, "fsync_path", lambda p: synced.append(Path(p)))
    hubmod.fsync_download(tmp_path, selected)
    files = [tmp_path / "a.safetensors", tmp_path / "original" / "params.json", meta / "a.safetensors.metadata",
             meta / "original" / "params.json.metadata"]
    dirs = [tmp_path / "original", meta / "original", meta, meta.parent, meta.parent.parent, tmp_path,
            tmp_path.parent]
    assert sorted(synced) == sorted(files + dirs)
    assert max(synced.index(f) for f in files) < min(synced.index(d) for d in dirs)  # names after contents
    assert synced.index(tmp_path / "original") < synced.index(tmp_path)  # deepest first


# ------------------------------------------------------------------------------------------- interrupted transfers


def test_dropped_connection_then_rerun_resumes(hub, tiny_files, tmp_path):
    # The connection drops mid-shard and the hub stays unreachable for that file: huggingface_hub's
    # retries give up and the run stops; the re-run fetches only what is missing.
    hub.faults[SHARD] = Fault("down", at=len(tiny_files[SHARD]) // 2)
    r = download(hub.url, tmp_path)
    line = error_line(r, alone=False)
    assert r.stderr.strip().endswith(line)
    assert "interrupted" in line and "run the same command again to resume" in line
    out = tmp_path / "out"
    assert not (out / SHARD).exists()
    done = {n for n in tiny_files if (out / n).is_file()}
    assert done == default_selection(tiny_files) - {SHARD}
    assert not list(out.rglob("*.incomplete"))  # huggingface_hub removed the cut-off temporary file

    hub.faults.clear()
    hub.clear_log()
    r = download(hub.url, tmp_path)
    assert r.returncode == 0, r.stderr
    assert hub.fetched("GET") == [SHARD]
    for name, data in tiny_files.items():
        assert (out / name).read_bytes() == data, name
    assert "parameters: " in r.stdout


def test_a_transient_drop_is_resumed_with_a_range_request(tmp_path):
    """Within one run huggingface_hub continues a dropped file from its last full 10 MiB chunk."""
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3 * 2**20, dtype=torch.float32)}, tmp_path / "big.safetensors")  # 12 MiB
    data = (tmp_path / "big.safetensors").read_bytes()
    with FakeHub("acme/big", {"model.safetensors": data}) as hub:
        hub.faults["model.safetensors"] = Fault("once", at=11 * 2**20)
        r = download(hub.url, tmp_path, repo="acme/big")
        assert r.returncode == 0, r.stderr
        gets = [q for q in hub.requests if q.method == "GET" and q.filename == "model.safetensors"]
        assert [q.headers.get("range") for q in gets] == [None, f"bytes={10 * 2**20}-"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == data


def test_ctrl_c_stops_the_transfer_cleanly(hub, tiny_files, tmp_path):
    fault = hub.faults[SHARD] = Fault("stall", at=len(tiny_files[SHARD]) // 2)
    out = tmp_path / "out"
    others = default_selection(tiny_files) - {SHARD}
    cmd = [sys.executable, "-m", "llama_ft.cli", "download", REPO, "--local-dir", str(out)]
    with subprocess.Popen(cmd, env=cli_env(hub.url, tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            assert fault.stalled.wait(60), "the shard download never started"
            deadline = time.monotonic() + 30
            while not all((out / n).is_file() for n in others) and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            fault.release.set()  # the rest of the shard arrives after Ctrl-C: it must not be kept
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    line = error_line(r, alone=False)
    assert "interrupted" in line and "run the same command again to resume" in line
    assert not (out / SHARD).exists() and not list(out.rglob("*.incomplete"))
    assert all((out / n).read_bytes() == tiny_files[n] for n in others)


# ------------------------------------------------------------------------------- verification after the transfer


def test_served_size_differs_from_the_listing(hub, tiny_files, tmp_path):
    hub.served[SHARD] = tiny_files[SHARD][:-100]
    line = error_line(download(hub.url, tmp_path), alone=False)
    size = len(tiny_files[SHARD])
    assert f"{tmp_path / 'out' / SHARD}: {size - 100:,} bytes, the hub lists {size:,}" in line
    assert "delete it and run the same command again" in line


def test_corrupt_shard_header(hub, tiny_files, tmp_path):
    hub.served[SHARD] = b"\xff" * 8 + tiny_files[SHARD][8:]  # same size, header length now absurd
    line = error_line(download(hub.url, tmp_path), alone=False)
    assert f"{tmp_path / 'out' / SHARD}: corrupt safetensors header" in line
    assert "delete it and run the same command again" in line


def test_index_names_a_shard_the_repo_lacks(tiny_files, tmp_path):
    index = json.loads(tiny_files["model.safetensors.index.json"])
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-00007-of-00006.safetensors"
    files = {**tiny_files, "model.safetensors.index.json": json.dumps(index).encode()}
    with FakeHub(REPO, files) as hub:
        line = error_line(download(hub.url, tmp_path), alone=False)
    assert "model-00007-of-00006.safetensors: shard named in model.safetensors.index.json is missing" in line
