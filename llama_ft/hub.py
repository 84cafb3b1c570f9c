"""`llama-ft download`: fetch a checkpoint from the Hugging Face Hub, checked before and after the transfer.

    llama-ft download meta-llama/Llama-3.1-8B --local-dir /data/Llama-3.1-8B [--revision R] [--include PAT ...]

Before any byte is fetched: one API call lists the repo's files with their sizes (at one commit, which
the download is then pinned to), the files training and merging read are selected, their total is
checked against the free space at --local-dir, and one HEAD request proves the files can be read
(a gated repo fails here, not after the first hundred GB).

The transfer is huggingface_hub's own `snapshot_download` into --local-dir, which keeps every finished
file (with its commit and etag under --local-dir/.cache/huggingface/), so running the same command
again after an interruption fetches only what is missing. In huggingface_hub 2.x a file that was cut
off is not continued across runs: its temporary file is removed and the re-run fetches that file
again from its first byte; within one run a dropped connection is retried with a Range request.

Durability: huggingface_hub writes each file as `.cache/huggingface/download/*.incomplete` and renames it
into place, so a cut-off file never sits under its final name while the command runs; it does not fsync.
When the transfer ends (finished or not), every selected file under its final name, its download
metadata and their directories are fsynced, so what the command reports as done survives a power cut.
A file that a crash left under its final name with the wrong size is deleted before the next transfer,
so it is fetched again instead of being trusted by huggingface_hub's metadata.

Afterwards: every selected file has the size the hub listed, every safetensors file has a readable
header, and a whole checkpoint (config + index + all its shards) goes through `open_checkpoint`, the
check the loader and the merge use. Then the parameter count (the model built from config.json on the
meta device, no remote code) and the checkpoint bytes per dtype are printed.

Transfer path: huggingface_hub 2.x no longer uses hf_transfer (HF_HUB_ENABLE_HF_TRANSFER only gives a
deprecation warning); its fast path is hf-xet, for the files the hub stores on Xet, made faster by
HF_XET_HIGH_PERFORMANCE, which we turn on unless the user set it. Every other file goes over HTTPS.

Token: HF_TOKEN or the stored `hf auth login` token (huggingface_hub's get_token), never argv (there is
no --token flag: a command-line token ends up in shell history and process lists) and never printed.

Every failure a user can meet (gated or private repo, wrong name or revision, no network, offline
mode, a full disk, an interrupted transfer, a damaged file) is one `llama-ft: error: ...` line, exit 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from llama_ft.errors import UserError, user_errors_exit
from llama_ft.fsutil import fsync_path, is_disk_full

if TYPE_CHECKING:  # llama_ft.shards imports torch: not needed for the errors that end a run early
    from llama_ft.shards import Checkpoint

PROG = "llama-ft download"

# The names llama_ft.shards uses, spelled out here: importing it imports torch, a second and a half
# that a run which stops early (or downloads no weights) should not pay.
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# What training and merging read (top level only): safetensors weights + index, config, generation
# config, tokenizer and chat template. Not .bin/.pth (pickle) and not original/ (Meta's consolidated
# .pth copy, which doubles the download).
DEFAULT_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.json",
    "*.jinja",
)

# As huggingface_hub.constants parses its boolean variables.
_TRUE = {"1", "ON", "YES", "TRUE"}


def _truthy(name: str) -> bool:
    return (os.environ.get(name) or "").upper() in _TRUE


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({_human(n)})"


# ----------------------------------------------------------------------------------------- transfer path


def choose_transfer_path() -> str:
    """Switch on the fastest transfer this huggingface_hub really uses and describe it in one line.

    Must run before huggingface_hub is imported: it reads its environment at import (hf_xet reads
    HF_XET_HIGH_PERFORMANCE itself as well).
    """
    hub_major = _version("huggingface_hub").split(".")[0]
    if hub_major == "0" and find_spec("hf_transfer") is not None:
        # huggingface_hub 0.x still downloads through hf_transfer when asked to
        os.environ.setdefault("HF_HUB_ENABLE_HF_TRANSFER", "1")
        if _truthy("HF_HUB_ENABLE_HF_TRANSFER"):
            return f"hf_transfer {_version('hf_transfer')} (huggingface_hub {_version('huggingface_hub')})"
    if _truthy("HF_HUB_DISABLE_XET"):
        path = "plain HTTPS (HF_HUB_DISABLE_XET is set)"
    elif find_spec("hf_xet") is None:
        path = "plain HTTPS (hf_xet is not installed; `pip install hf_xet` for the Xet fast path)"
    else:
        os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")
        mode = "high-performance" if _truthy("HF_XET_HIGH_PERFORMANCE") else "standard"
        path = f"hf-xet {_version('hf_xet')} ({mode} mode) for files the hub stores on Xet, HTTPS for the rest"
    if find_spec("hf_transfer") is not None:
        path += f"; hf_transfer is installed but huggingface_hub {_version('huggingface_hub')} no longer uses it"
    return path


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------------------- errors


@dataclass
class Where:
    """What a failure is about, for its message."""

    repo_id: str
    revision: str | None
    local_dir: Path
    endpoint: str
    has_token: bool
    transferring: bool = False  # True once files are being written: a re-run resumes
    still_needed: int | None = None  # bytes not yet under their final names when the transfer stopped


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.endswith("Client Error."):
            return line
    return type(e).__name__


def _resume_hint(w: Where) -> str:
    return "; run the same command again to resume (finished files are kept)" if w.transferring else ""


def explain(exc: BaseException, w: Where) -> UserError:
    """Turn an exception raised while listing or downloading into a one-line UserError.

    Maps huggingface_hub's own classes (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
    LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError), httpx(2) transport errors, OSError
    (ENOSPC) and KeyboardInterrupt.
    """
    try:  # huggingface_hub 2.x speaks httpx2; 1.x (the GPU image's) httpx
        import httpx2 as httpx
    except ImportError:
        import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, page = w.repo_id, f"{w.endpoint}/{w.repo_id}"
    login = f"accept its terms on {page} and log in with `hf auth login` (or set HF_TOKEN)"
    who = ("the token found (HF_TOKEN or `hf auth login`) has no access to it" if w.has_token
           else "no Hugging Face token was found")
    if isinstance(exc, (KeyboardInterrupt, _Stopped)):
        return UserError(f"download of {repo} interrupted; run the same command again to resume "
                         "(finished files are kept)")
    if isinstance(exc, OfflineModeIsEnabled) or (
            isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, OfflineModeIsEnabled)):
        return UserError(f"offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): "
                         f"unset it to download {repo} from {w.endpoint}")
    if isinstance(exc, GatedRepoError):
        return UserError(f"{repo} is a gated repo and {who}: {login}")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"--revision {w.revision}: not found in {repo} (expected a branch, tag or commit hash "
                         "of the repo)")
    if isinstance(exc, RemoteEntryNotFoundError):
        return UserError(f"{repo}: the hub listed a file it does not serve ({_first_line(exc)}){_resume_hint(w)}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        message = exc.response.headers.get("X-Error-Message", "") if exc.response is not None else ""
        if status == 401 and message == "Invalid credentials in Authorization header":
            return UserError("the hub rejected the token (HF_TOKEN or the `hf auth login` one) as invalid: "
                             "log in again with `hf auth login` or set a valid HF_TOKEN")
        if status in (401, 403):
            # The hub answers 401 for private and gated repos alike when it cannot tell who asks.
            return UserError(f"{repo}: access denied (HTTP {status}): the repo is gated or private and {who}; "
                             f"check the name, then {login}")
        if isinstance(exc, RepositoryNotFoundError) or status == 404:
            return UserError(f"{repo}: no such model repo at {w.endpoint} (HTTP 404); check REPO_ID "
                             "(namespace/name, e.g. meta-llama/Llama-3.1-8B)")
        return UserError(f"the hub at {w.endpoint} answered HTTP {status} for {repo} ({_first_line(exc)}); "
                         f"try again later{_resume_hint(w)}")
    # huggingface_hub raises LocalEntryNotFoundError (cause: the transport error) when a file's HEAD
    # request finds no hub and no local copy.
    unreachable = (exc.__cause__ or exc) if isinstance(exc, LocalEntryNotFoundError) else None
    if isinstance(exc, httpx.TransportError) and (
            not w.transferring or isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError))):
        unreachable = exc
    if unreachable is not None:
        return UserError(f"the hub at {w.endpoint} could not be reached ({type(unreachable).__name__}: "
                         f"{_first_line(unreachable)}): check the network and any proxy, or HF_ENDPOINT"
                         f"{_resume_hint(w)}")
    if isinstance(exc, httpx.TransportError):
        # A connection that dropped or stalled mid-file, after huggingface_hub's own retries.
        return UserError(f"download of {repo} interrupted ({type(exc).__name__}: {_first_line(exc)}); "
                         "run the same command again to resume (finished files are kept)")
    if isinstance(exc, HFValidationError):
        return UserError(f"REPO_ID {repo!r}: not a valid repo id ({_first_line(exc)})")
    if is_disk_full(exc):  # OSError ENOSPC/EDQUOT, or hf_xet's Rust I/O error text
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "No space left on device"
        sizes = ""
        if w.still_needed is not None:
            try:
                free = f", {_human(free_bytes(w.local_dir))} free"
            except OSError:
                free = ""
            sizes = f": {_bytes(w.still_needed)} still to fetch{free}"
        return UserError(f"--local-dir {w.local_dir}: disk full while downloading ({why}){sizes}; free some "
                         "space and run the same command again to resume (finished files are kept)")
    if isinstance(exc, OSError):
        if exc.errno is None and "Consistency check failed" in str(exc):
            # http_get's check that the bytes received match the announced size.
            return UserError(f"download of {repo} interrupted ({_first_line(exc)}); run the same command "
                             "again to resume (finished files are kept)")
        where = f" ({exc.filename})" if exc.filename else ""
        return UserError(f"--local-dir {w.local_dir}: {exc.strerror or _first_line(exc)}{where}")
    return UserError(f"download of {repo} failed ({type(exc).__name__}: {_first_line(exc)}){_resume_hint(w)}")


# ----------------------------------------------------------------------------------------- before the transfer


def list_repo_files(repo_id: str, revision: str | None, token: str | None) -> tuple[str, dict[str, int]]:
    """The commit `revision` points to, and {path: size in bytes} of every file in the repo at it."""
    from huggingface_hub import HfApi, constants

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token,
                              timeout=constants.HF_HUB_ETAG_TIMEOUT)
    if not info.sha:
        raise UserError(f"{repo_id}: the hub at {constants.ENDPOINT} did not say which commit "
                        f"{revision or 'main'} is (is HF_ENDPOINT a Hugging Face Hub?)")
    files: dict[str, int] = {}
    for s in info.siblings or []:
        size = s.lfs.size if s.lfs is not None else s.size
        if size is None:
            raise UserError(f"{repo_id}: the hub listed {s.rfilename} without its size")
        files[s.rfilename] = size
    return info.sha, files


def select_files(files: dict[str, int], include: list[str] | None) -> dict[str, int]:
    """The files to download: --include patterns (huggingface_hub's matching, where `*` crosses `/`) or
    by default the top-level files of DEFAULT_PATTERNS."""
    if include:
        from huggingface_hub.utils import filter_repo_objects

        return {name: files[name] for name in filter_repo_objects(files, allow_patterns=include)}
    return {name: size for name, size in files.items()
            if "/" not in name and any(fnmatchcase(name, p) for p in DEFAULT_PATTERNS)}


def bytes_to_fetch(local_dir: Path, selected: dict[str, int]) -> int:
    """Bytes still missing: files already complete in `local_dir` (a previous, interrupted run) count 0."""
    missing = 0
    for name, size in selected.items():
        p = local_dir / name
        if not (p.is_file() and p.stat().st_size == size):
            missing += size
    return missing


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would hold it: its nearest existing parent)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(local_dir: Path, needed: int, free: int | None = None) -> int:
    """Raise a one-line UserError if `needed` bytes do not fit at `local_dir`; return the free bytes.

    `free` is measured (shutil.disk_usage) when not given. huggingface_hub writes each file next to
    its final place and renames it, so a file needs its own size once.
    """
    free = free_bytes(local_dir) if free is None else free
    if needed > free:
        raise UserError(f"--local-dir {local_dir}: not enough free disk space: the download needs {_bytes(needed)}, "
                        f"{_bytes(free)} are available")
    return free


def check_access(repo_id: str, sha: str, filename: str, token: str | None) -> None:
    """HEAD one file: a gated repo the token cannot read fails here, before anything is written."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=sha), token=token)


# ----------------------------------------------------------------------------------------- the transfer


class _Stopped(Exception):
    """Raised in a download thread after Ctrl-C, to end its file early."""


@contextmanager
def _stop_on_ctrl_c() -> Iterator[type]:
    """A tqdm class for snapshot_download that makes Ctrl-C stop the transfer within one chunk.

    On Ctrl-C the main thread gets KeyboardInterrupt and huggingface_hub cancels the queued files, but
    its thread pool still waits for every file in flight, which can be minutes of a 5 GB shard each.
    Every worker updates the byte bars for every chunk it receives: from the first Ctrl-C on, that update
    raises, so each in-flight file ends at its next chunk (huggingface_hub deletes its temporary file).
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    stop = threading.Event()

    class StopOnCtrlC(hf_tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            if stop.is_set():
                raise _Stopped()
            return super().update(n)

    def on_sigint(signum: int, frame: object) -> None:
        stop.set()
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        yield StopOnCtrlC
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def fetch(repo_id: str, sha: str, local_dir: Path, selected: dict[str, int], token: str | None) -> None:
    """Download exactly the `selected` files at commit `sha` into `local_dir` (huggingface_hub's snapshot_download)."""
    from huggingface_hub import snapshot_download

    # Exact names (escaped for fnmatch) so what was sized and checked is what is fetched.
    patterns = [glob.escape(name) for name in selected]
    with _stop_on_ctrl_c() as tqdm_class, warnings.catch_warnings():
        # huggingface_hub warns per file when the free space looks short; the space was checked before the
        # transfer, and a disk that fills up during it ends the run with one disk-full line instead.
        warnings.filterwarnings("ignore", message="Not enough free disk space to download the file")
        snapshot_download(repo_id, revision=sha, local_dir=local_dir, allow_patterns=patterns, token=token,
                          tqdm_class=tqdm_class)


def drop_wrong_sized(local_dir: Path, selected: dict[str, int]) -> list[str]:
    """Delete selected files whose size differs from the hub's listing; return their names.

    huggingface_hub renames a finished download into place without an fsync, so after a power cut the
    name can hold a short file, and its metadata (commit + etag) makes a re-run trust it. Deleted, the
    file is fetched again. A file of the right size is left to huggingface_hub's own etag check.
    """
    dropped = []
    for name, size in sorted(selected.items()):
        p = local_dir / name
        if p.is_file() and not p.is_symlink() and p.stat().st_size != size:
            p.unlink()
            dropped.append(name)
    return dropped


def fsync_download(local_dir: Path, selected: dict[str, int]) -> None:
    """fsync every selected file now under its final name, its huggingface_hub metadata, and the
    directories holding them (deepest first, then --local-dir's parent, which gained --local-dir)."""
    meta_root = local_dir / ".cache" / "huggingface" / "download"
    dirs: set[Path] = set()
    for name in selected:
        for p, root in ((local_dir / name, local_dir), (meta_root / f"{name}.metadata", meta_root)):
            if not p.is_file():
                continue
            fsync_path(p)
            d = p.parent
            while d != root and root in d.parents:
                dirs.add(d)
                d = d.parent
            dirs.add(root)
    if dirs:
        dirs.update(meta_root.parents[:3])  # .cache/huggingface, .cache, --local-dir
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        if d.is_dir():
            fsync_path(d)
    if dirs:
        with suppress(OSError):  # a parent we may not read: its entry for --local-dir is older
            fsync_path(local_dir.absolute().parent)


# ----------------------------------------------------------------------------------------- after the transfer


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; delete it and run the same command again (if it persists, the file on "
                     "the hub is damaged)")


def verify_download(local_dir: Path, selected: dict[str, int], listed: dict[str, int]) -> Checkpoint | None:
    """Check what was downloaded; return the opened Checkpoint when the selection is a whole one, else None.

    Every selected file exists with the size the hub listed; every safetensors file has a readable
    header; with config.json and the index (or model.safetensors) selected, and no shard of the index
    left out by --include, `open_checkpoint` checks the index against the shards and their headers.
    """
    for name, size in sorted(selected.items()):
        p = local_dir / name
        if not p.is_file():
            raise UserError(f"{p}: missing after the download (the transfer did not finish); run the same "
                            "command again to resume")
        got = p.stat().st_size
        if got != size:
            raise _damaged(p, f"{got:,} bytes, the hub lists {size:,}")
    weights = sorted(n for n in selected if n.endswith(".safetensors"))
    if not weights:
        return None
    from llama_ft.shards import open_checkpoint, read_safetensors_header

    for name in weights:
        p = local_dir / name
        try:
            read_safetensors_header(p)
        except UserError as e:
            raise _damaged(p, str(e).removeprefix(f"{p}: ")) from e

    if CONFIG_NAME not in selected or not ({INDEX_NAME, SINGLE_NAME} & selected.keys()):
        return None
    if INDEX_NAME in selected:
        try:
            weight_map = json.loads((local_dir / INDEX_NAME).read_text()).get("weight_map") or {}
            named = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        except (OSError, ValueError, AttributeError):
            named = set()  # open_checkpoint says what is wrong with it
        if any(s in listed and s not in selected for s in named):
            return None  # --include left shards out on purpose
    try:
        return open_checkpoint(local_dir, "--local-dir")
    except UserError as e:
        raise UserError(f"{e} (run the same command again to fetch what is missing; if it persists, the repo's "
                        "checkpoint is incomplete)") from e


def count_parameters(local_dir: Path) -> tuple[int, str]:
    """Parameters of the model config.json describes, built on the meta device (no memory, no remote code)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(local_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return sum(p.numel() for p in model.parameters()), type(model).__name__


def bytes_per_dtype(ckpt: Checkpoint) -> dict[str, int]:
    """Tensor bytes per safetensors dtype, from the shard headers."""
    out: dict[str, int] = {}
    for t in ckpt.tensors.values():
        out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------- command


def download(repo_id: str, local_dir: Path, revision: str | None = None, include: list[str] | None = None,
             progress: bool = True) -> dict:
    """List, select, check space and access, fetch, verify; print what happens. Returns a summary dict."""
    transfer = choose_transfer_path()  # before huggingface_hub is imported
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import disable_progress_bars

    if not progress:
        disable_progress_bars()

    try:
        token = get_token()
    except Exception as e:  # only OIDC token exchange (HF_OIDC_RESOURCE) raises here
        raise UserError(f"could not get a Hugging Face token ({type(e).__name__}: {_first_line(e)})") from e
    w = Where(repo_id, revision, local_dir, constants.ENDPOINT, has_token=token is not None)
    if constants.is_offline_mode():
        raise explain(_offline_error(), w)
    if local_dir.exists() and not local_dir.is_dir():
        raise UserError(f"--local-dir {local_dir}: exists and is not a directory")

    try:
        sha, listed = list_repo_files(repo_id, revision, token)
    except UserError:
        raise
    except Exception as e:
        raise explain(e, w) from e
    selected = select_files(listed, include)
    if not selected:
        what = f"--include {' '.join(include)}" if include else "the default patterns"
        raise UserError(f"{repo_id}: no file matches {what} ({len(listed)} files in the repo)")
    if not include and not any(n.endswith(".safetensors") for n in selected):
        raise UserError(f"{repo_id}: no top-level safetensors weights (llama-ft loads safetensors only; .bin/.pth "
                        "need pickle); use --include to pick other files")
    total = sum(selected.values())
    needed = bytes_to_fetch(local_dir, selected)
    free = check_free_space(local_dir, needed)
    try:
        check_access(repo_id, sha, min(selected), token)
    except Exception as e:
        raise explain(e, w) from e

    print(f"{PROG}: {repo_id} @ {sha[:12]} ({revision or 'main'}): {len(selected)} of {len(listed)} files, "
          f"{_human(total)}; {_human(needed)} to fetch, {_human(free)} free at {local_dir}", flush=True)
    print(f"{PROG}: transfer: {transfer}", flush=True)
    w.transferring = True
    try:
        drop_wrong_sized(local_dir, selected)
        fetch(repo_id, sha, local_dir, selected, token)
        fsync_download(local_dir, selected)
    except (Exception, KeyboardInterrupt) as e:
        with suppress(Exception):  # keep what finished, durably; the error below is the news
            fsync_download(local_dir, selected)
        with suppress(OSError):
            w.still_needed = bytes_to_fetch(local_dir, selected)
        raise explain(e, w) from e

    ckpt = verify_download(local_dir, selected, listed)
    summary: dict = {"repo_id": repo_id, "sha": sha, "files": sorted(selected), "bytes": total,
                     "local_dir": str(local_dir)}
    if ckpt is None:
        print(f"{PROG}: {len(selected)} files verified (sizes, safetensors headers); not a whole checkpoint "
              "(config.json + index + all shards), so no parameter count", flush=True)
        print(f"{PROG}: done: {local_dir}")
        return summary
    print(f"{PROG}: checkpoint verified: {len(ckpt.shards)} shards, {len(ckpt.tensors)} tensors "
          "(sizes, index, safetensors headers)", flush=True)
    try:
        n_params, arch = count_parameters(local_dir)
        print(f"{PROG}: parameters: {n_params:,} ({arch} from config.json, on the meta device)")
        summary["parameters"] = n_params
    except Exception as e:  # the files are fine; an architecture transformers cannot build only loses the count
        print(f"{PROG}: parameters: not counted (transformers cannot build this config without remote code: "
              f"{_first_line(e)})")
    per_dtype = bytes_per_dtype(ckpt)
    summary["bytes_per_dtype"] = per_dtype
    print(f"{PROG}: bytes per dtype: " + ", ".join(f"{k} {_bytes(v)}" for k, v in per_dtype.items()))
    print(f"{PROG}: done: {local_dir}")
    return summary


def _offline_error() -> BaseException:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("offline mode")


def build_parser() -> argparse.ArgumentParser:
    """The `llama-ft download` flags (no --token on purpose: see the module docstring)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Download a model repo's safetensors checkpoint and tokenizer from the Hugging Face Hub, "
                    "with a disk-space check before and a checkpoint check after. Token: HF_TOKEN or "
                    "`hf auth login`. Run it again to resume an interrupted download.")
    p.add_argument("repo_id", metavar="REPO_ID", help="model repo, e.g. meta-llama/Llama-3.1-8B")
    p.add_argument("--local-dir", required=True, type=Path, help="directory to download into (created if needed)")
    p.add_argument("--revision", default=None, help="branch, tag or commit hash (default: main)")
    p.add_argument("--include", nargs="+", metavar="PATTERN", default=None,
                   help="download the files matching these patterns instead of the default set "
                        f"({' '.join(DEFAULT_PATTERNS)}, top level only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    """`llama-ft download ...`: 0 when the files are downloaded and verified; a UserError is exit 2."""
    p = build_parser()
    args, unknown = p.parse_known_args(argv)
    if any(a.split("=")[0] in ("--token", "--hf-token", "--hf_token") for a in unknown):
        # Said without echoing the argument: it is a secret.
        raise UserError("there is no --token flag: set HF_TOKEN or log in with `hf auth login` (a token on the "
                        "command line ends up in shell history and process lists)")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        download(args.repo_id, args.local_dir.expanduser(), args.revision, args.include, not args.no_progress)
    except KeyboardInterrupt as e:  # Ctrl-C before or after the transfer (during it, download() says so)
        raise UserError(f"download of {args.repo_id} interrupted; run the same command again to resume "
                        "(finished files are kept)") from e
    return 0
