"""Faults of the standalone tools, on real filesystems and real processes.

- a full disk (a tmpfs smaller than the output) during `llama-ft merge`, `llama-ft quantize` and
  `llama-ft download`: one `llama-ft: error:` line naming the path, exit 2, nothing half-written under a
  final name, no temporary left, a previous output untouched;
- kill -9 in the middle of a merge or a quantize: the final name never holds a partial output, and the
  re-run removes the dead run's temporary and writes exactly what an uninterrupted run writes;
- the stale-temporary cleanup (fsutil.remove_stale_temps) touches nothing it does not own.

Mounting a tmpfs needs root; without it those tests are skipped with the reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from proc import run_job

from llama_ft import fsutil
from llama_ft.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HUB_REPO = "meta-llama/Tiny-Llama-3.1"

# `python -c CHILD MODE llama-ft-args...`: the CLI with one patch in the child process.
#   nocheck: no free-space check before writing, so the writes themselves meet the full disk (what happens
#            when another writer fills the disk during the run, or a quota the free space does not show)
#   stall:   sleep after the first shard is written, so the test can kill -9 the run in the middle
#   plain:   no patch
CHILD = """
import sys, time
mode = sys.argv.pop(1)
if mode == "nocheck":
    import llama_ft.fsutil, llama_ft.hub
    llama_ft.fsutil.check_free_space = lambda path, needed: None
    llama_ft.hub.check_free_space = lambda local_dir, needed, free=None: 1 << 50
elif mode == "stall":
    import llama_ft.shards
    real = llama_ft.shards.save_file
    def save_then_stall(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        time.sleep(300)
    llama_ft.shards.save_file = save_then_stall
from llama_ft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child_cmd(mode: str, *args: str | Path) -> list[str]:
    return [sys.executable, "-c", CHILD, mode, *map(str, args)]


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback, exactly one `llama-ft: error:` line on stderr; that line."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("llama-ft: error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def tree(d: Path) -> dict[str, bytes]:
    """Every file under `d` by relative path, with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def on_tmpfs(sizes: list[int]) -> int:
    """Bytes these files take on a tmpfs: whole pages each (4 KiB on x86, often 64 KiB on aarch64)."""
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(-(-n // page) * page for n in sizes)


def kib(n: int) -> int:
    return -(-n // 1024)


def temps(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.tmp-*"))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter for the tiny Llama with non-zero B, so the merge changes every targeted weight."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=PROJS, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """mount(KiB) -> a fresh tmpfs of that size (unmounted after the test); skips where mount is refused."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)],
                               capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("no mount command: a small tmpfs is needed to fill the disk for real")
        if r.returncode != 0:
            pytest.skip(f"mount of a small tmpfs refused ({r.stderr.strip() or r.returncode}): needs root")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def remount(d: Path, kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(d)], check=True, capture_output=True)


# ------------------------------------------------------------------------------------------- disk full


def test_merge_disk_full_keeps_the_previous_output(tiny_model_dir, adapter_dir, small_disk):
    from llama_ft.merge import merge_adapters, output_bytes
    from llama_ft.shards import open_checkpoint

    needed = output_bytes(open_checkpoint(tiny_model_dir), None)
    previous = on_tmpfs([p.stat().st_size for p in tiny_model_dir.iterdir()] + [1])
    disk = small_disk(kib(previous + needed // 2))  # the previous output and half a new one
    out = disk / "merged"
    shutil.copytree(tiny_model_dir, out)  # a previous output, to be replaced with --overwrite
    (out / "previous.txt").write_text("the run before")
    before = tree(out)
    assert needed > shutil.disk_usage(disk).free

    # The check made before any shard is read refuses it in a second.
    mib = f"{needed / 2**20:.1f}".replace(".", r"\.")
    with pytest.raises(UserError, match=rf"^{out}: not enough free disk space: about {mib} MiB needed") as e:
        merge_adapters(tiny_model_dir, adapter_dir, out, overwrite=True, progress=False)
    assert "\n" not in str(e.value)
    assert tree(out) == before and temps(out) == []

    # The disk fills up while the shards are written: safetensors' writer fails with ENOSPC mid-shard.
    r = run_job(child_cmd("nocheck", "merge", "--base", tiny_model_dir, "--adapter", adapter_dir, "--output", out,
                          "--overwrite", "--no-progress"), timeout=120, env=child_env(), cwd=REPO)
    line = one_error_line(r)
    assert r.stderr.strip() == line
    assert line.startswith(f"llama-ft: error: {out}: disk full (")
    assert f"about {needed / 2**20:.1f} MiB needed); nothing was written under the final name" in line
    assert tree(out) == before, "the previous output changed"
    assert temps(out) == [], "the temporary directory was left behind"


def test_quantize_disk_full_leaves_nothing(tiny_model_dir, small_disk, monkeypatch, capsys):
    from llama_ft.quantize import LLAMA_LINEAR_NAMES, main, output_bytes
    from llama_ft.shards import open_checkpoint

    needed = output_bytes(open_checkpoint(tiny_model_dir), LLAMA_LINEAR_NAMES)
    disk = small_disk(kib(needed // 2))
    out = disk / "fp8"
    assert needed > shutil.disk_usage(disk).free
    args = ["--model", str(tiny_model_dir), "--output", str(out), "--no-progress"]

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"llama-ft: error: {out}: not enough free disk space: about ")

    monkeypatch.setattr(fsutil, "check_free_space", lambda path, needed: None)  # see CHILD's nocheck
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"llama-ft: error: {out}: disk full (")
    assert f"about {needed / 2**20:.1f} MiB needed); nothing was written under the final name" in err[0]
    assert not out.exists() and temps(out) == []
    assert list(disk.iterdir()) == []  # and the space the partial output took is free again


def test_download_disk_full_then_resume(tiny_model_dir, small_disk, tmp_path):
    """ENOSPC from huggingface_hub's own writer, through the fake hub; then the re-run fetches only what is
    missing, and a file a crash left short under its final name is fetched again instead of trusted."""
    files = {p.name: p.read_bytes() for p in sorted(tiny_model_dir.iterdir()) if p.is_file()}
    # half the checkpoint and huggingface_hub's metadata file per file: the small files and a shard or two fit
    disk = small_disk(kib(on_tmpfs([len(b) for b in files.values()]) // 2 + on_tmpfs([1] * len(files))))
    out = disk / "out"
    with FakeHub(HUB_REPO, files) as hub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_XET="1", PYTHONPATH=str(REPO))
        cmd = ["download", HUB_REPO, "--local-dir", out, "--no-progress"]
        r = run_job(child_cmd("nocheck", *cmd), timeout=120, env=env, cwd=REPO)
        line = one_error_line(r)
        assert r.stderr.strip() == line  # not a warning per file from huggingface_hub before it
        assert line.startswith(f"llama-ft: error: --local-dir {out}: disk full while downloading "
                               "(No space left on device): ")
        done = {n for n in files if (out / n).is_file()}
        assert done and done != set(files)
        missing = sum(len(files[n]) for n in set(files) - done)
        assert f": {missing:,} bytes (" in line and "still to fetch" in line and "run the same command again" in line
        for n in done:  # nothing half-written under a final name
            assert (out / n).read_bytes() == files[n], n
        assert not list(out.rglob("*.incomplete"))

        # A power cut after huggingface_hub's rename (it does not fsync) can leave a short file whose
        # metadata says it is done: simulated by truncating one, mtime kept.
        short = sorted(done)[0]
        st = (out / short).stat()
        os.truncate(out / short, st.st_size // 2)
        os.utime(out / short, ns=(st.st_atime_ns, st.st_mtime_ns))

        remount(disk, 4096)
        hub.clear_log()
        r = run_job(child_cmd("plain", *cmd), timeout=120, env=env, cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert set(files) - done | {short} <= set(hub.fetched("GET"))
        assert {n: (out / n).read_bytes() for n in files} == files


# ------------------------------------------------------------------------------------------- kill -9


def kill_after_first_shard(cmd: list[str], out: Path, shard: str) -> int:
    """Start `cmd` (a CHILD in stall mode), kill -9 it once its first shard is in its temporary directory;
    return its pid."""
    with subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            deadline = time.monotonic() + 120
            while not list(out.parent.glob(f".{out.name}.tmp-*/{shard}")):
                if proc.poll() is not None:
                    raise AssertionError(f"the run ended before it was killed: {proc.communicate()}")
                assert time.monotonic() < deadline, "no shard was written within 120 s"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


def test_merge_killed_mid_way_then_rerun(tiny_model_dir, adapter_dir, tmp_path, capsys):
    from llama_ft.merge import main, merge_adapters

    ref = tmp_path / "ref"
    merge_adapters(tiny_model_dir, adapter_dir, ref, progress=False)
    out = tmp_path / "merged"
    args = ["--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--output", str(out), "--no-progress"]
    first_shard = sorted(p.name for p in tiny_model_dir.glob("model-*.safetensors"))[0]

    pid = kill_after_first_shard(child_cmd("stall", "merge", *args), out, first_shard)
    assert not out.exists(), "a partial output under the final name"
    [leftover] = temps(out)
    assert leftover.name.startswith(f".merged.tmp-{fsutil._host_tag()}-{pid}-")

    capsys.readouterr()
    assert main(args) == 0  # the same command again
    note = f"llama-ft merge: removed {leftover} (the temporary output of a run that was killed)"
    assert note in capsys.readouterr().err
    assert not leftover.exists() and temps(out) == []
    assert tree(out) == tree(ref)


def test_quantize_killed_mid_way_keeps_the_previous_output(tiny_model_dir, tmp_path):
    from llama_ft.quantize import main, quantize_checkpoint

    out = tmp_path / "fp8"
    quantize_checkpoint(tiny_model_dir, out, progress=False)
    ref = tree(out)
    (out / "previous.txt").write_text("the run before")
    before = tree(out)
    args = ["--model", str(tiny_model_dir), "--output", str(out), "--overwrite", "--no-progress"]
    first_shard = sorted(p.name for p in tiny_model_dir.glob("model-*.safetensors"))[0]

    kill_after_first_shard(child_cmd("stall", "quantize", *args), out, first_shard)
    assert tree(out) == before, "the previous output changed"
    assert len(temps(out)) == 1

    assert main(args) == 0
    assert temps(out) == []
    assert tree(out) == ref  # replaced as a whole: the old extra file is gone


# ------------------------------------------------------------------------------------------- stale temporaries


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_only_dead_runs_temporaries_of_this_host_are_removed(tmp_path):
    final = tmp_path / "out"
    host, dead = fsutil._host_tag(), dead_pid()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8

    def make(name: str, is_dir: bool = True) -> Path:
        p = tmp_path / name
        if is_dir:
            p.mkdir()
            (p / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
        else:
            p.write_bytes(b"x")
        return p

    stale = make(f".out.tmp-{host}-{dead}-abc_1234")
    kept = [
        make(f".out.tmp-{host}-{os.getpid()}-abcd1234"),  # a live process (this one)
        make(f".out.tmp-{other_host}-{dead}-abcd1234"),  # another host's: its pid means nothing here
        make(f".out.tmp-{host}-{dead}-abcd123"),  # not exactly the pattern
        make(f".out.tmp-{host}-{dead}-abcd1234.x"),
        make(".out.tmp-abcd1234"),  # the older unnamed form: owner unknown
        make(f".outx.tmp-{host}-{dead}-abcd1234"),  # another output's
        make(f".out.tmp-{host}-{dead}-abcdefgh", is_dir=False),  # not a directory
        make(f"out.tmp-{host}-{dead}-abcd1234"),
    ]
    locked = make(f".out.tmp-{host}-{dead}-lockedxx")  # owner in another pid namespace: lock held
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with fsutil.atomic_dir(final) as tmp:
            assert tmp.name.startswith(fsutil.temp_dir_prefix(final)) and f"-{os.getpid()}-" in tmp.name
            (tmp / "a.txt").write_text("new")
    finally:
        os.close(fd)
    assert not stale.exists()
    assert all(p.exists() for p in [*kept, locked])
    assert (final / "a.txt").read_text() == "new"
    assert fsutil.remove_stale_temps(final) == [locked]  # its lock is free now


def test_space_check_before_writing(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UserError, match=r"out: not enough free disk space: about .* MiB needed, .* MiB free"):
        with fsutil.atomic_dir(tmp_path / "out", needed=free + 2**30):
            raise AssertionError("entered despite too little space")
    assert not (tmp_path / "out").exists() and temps(tmp_path / "out") == []
    with fsutil.atomic_dir(tmp_path / "out", needed=1) as tmp:
        (tmp / "a").write_text("x")
    assert (tmp_path / "out" / "a").exists()
