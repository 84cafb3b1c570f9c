"""A fake Hugging Face Hub on 127.0.0.1 for the `llama-ft download` tests.

Speaks the part of the Hub API that huggingface_hub 2.x's `model_info(files_metadata=True)` and
`snapshot_download(local_dir=...)` use, read from its source:

    GET  /api/models/{repo}[/revision/{rev}][?blobs=True]   repo info: sha, gated, siblings (+ size, lfs)
    GET  /api/models/{repo}/tree/{rev}?recursive=True       file list at a commit (one page)
    HEAD /{repo}/resolve/{rev}/{path}                       X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}                       the bytes; `Range: bytes=N-` gives 206

and the error answers huggingface_hub turns into its exception classes: `X-Error-Code: RepoNotFound`
(404, or 401 for a private repo asked without a token that can read it), `RevisionNotFound`,
`GatedRepo` (401 without a token, 403 with one that has no access), and a 401 "Invalid credentials
in Authorization header" for a token the hub rejects, each with `X-Error-Message`.

Every request is logged with its headers, so tests can check what was fetched and which
Authorization header arrived. Faults to inject per file: a response that breaks off after N bytes
(`once`: the first GET only; `down`: the first GET, then every later GET of the file gets no
answer at all) or that stalls after N bytes until `release` is set (`stall`).

HTTP/1.0: one request per connection, so a broken-off response never poisons a kept-alive one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what `main` points to


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]

    @property
    def filename(self) -> str | None:
        """The repo file of a /resolve/ request, else None."""
        parts = self.path.split("/resolve/", 1)
        return parts[1].split("/", 1)[1] if len(parts) == 2 else None


@dataclass
class Fault:
    """Break off (or stall) the response body of one file after `at` bytes."""

    kind: str  # "once" | "down" | "stall"
    at: int
    fired: int = 0
    stalled: threading.Event = field(default_factory=threading.Event)  # set when the stall begins
    release: threading.Event = field(default_factory=threading.Event)  # set by the test to end it


class FakeHub:
    """One model repo `repo_id` with `files` {path: bytes}, served at `url` while the context is open."""

    def __init__(self, repo_id: str, files: dict[str, bytes], gated: bool = False, private: bool = False,
                 granted_tokens: tuple[str, ...] = (), rejected_tokens: tuple[str, ...] = ()) -> None:
        self.repo_id = repo_id
        self.files = dict(files)  # what the API lists (sizes, hashes)
        self.served: dict[str, bytes] = {}  # bytes /resolve/ serves instead, for damaged-file tests
        self.gated = gated
        self.private = private
        self.granted_tokens = granted_tokens  # tokens with access to a gated or private repo
        self.rejected_tokens = rejected_tokens  # tokens the hub does not know (expired, revoked, mistyped)
        self.faults: dict[str, Fault] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.faults.values():
            f.release.set()
        self._server.shutdown()
        self._server.server_close()

    def log(self, r: Request) -> None:
        """Record one request (handler threads call this)."""
        with self._lock:
            self.requests.append(r)

    def fetched(self, method: str = "GET") -> list[str]:
        """Repo files requested with `method` on /resolve/, in order (repeats kept)."""
        with self._lock:
            return [r.filename for r in self.requests if r.method == method and r.filename is not None]

    def clear_log(self) -> None:
        """Forget the requests seen so far (between two runs of one test)."""
        with self._lock:
            self.requests.clear()

    # ---- what the Hub answers

    @staticmethod
    def git_oid(data: bytes) -> str:
        """Git's blob id of `data` (what the Hub calls a file's oid)."""
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def is_lfs(self, name: str) -> bool:
        """Whether the Hub would keep `name` in LFS (weights, pickles) rather than in git (text)."""
        return not name.endswith((".json", ".txt", ".md", ".jinja", ".gitattributes"))

    def etag(self, name: str) -> str:
        """The ETag /resolve/ answers: sha256 for LFS files, the git blob id otherwise (as the Hub)."""
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else self.git_oid(data)

    def entry(self, name: str, tree: bool) -> dict:
        """One file as the tree API (`tree=True`) or the model-info siblings with blobs=True describe it."""
        data = self.files[name]
        lfs = {"size": len(data), "pointerSize": 134}
        if tree:
            e = {"type": "file", "path": name, "size": len(data), "oid": self.git_oid(data)}
            lfs["oid"] = hashlib.sha256(data).hexdigest()
        else:
            e = {"rfilename": name, "size": len(data), "blobId": self.git_oid(data)}
            lfs["sha256"] = hashlib.sha256(data).hexdigest()
        if self.is_lfs(name):
            e["lfs"] = lfs
        return e

    def info(self, blobs: bool) -> dict:
        """The model-info answer; sizes and LFS details only with blobs (files_metadata=True)."""
        siblings = [self.entry(n, tree=False) if blobs else {"rfilename": n} for n in sorted(self.files)]
        return {"_id": "fake", "id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "private": False,
                "gated": "manual" if self.gated else False, "disabled": False, "siblings": siblings}

    def tree(self) -> list[dict]:
        """The recursive tree listing: folders, then files."""
        dirs = sorted({n.rsplit("/", 1)[0] for n in self.files if "/" in n})
        return ([{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in dirs]
                + [self.entry(n, tree=True) for n in sorted(self.files)])


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        # ---- helpers

        def _send(self, status: int, payload: bytes = b"", headers: dict[str, str] | None = None,
                  body: bool = True) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _json(self, obj: object, body: bool) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, body)

        def _error(self, status: int, code: str | None, message: str, body: bool) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, body)

        def _check_repo_and_rev(self, repo: str, rev: str | None, body: bool) -> bool:
            if repo != hub.repo_id:
                self._error(404, "RepoNotFound", "Repository not found", body)
                return False
            if rev is not None and rev not in ("main", COMMIT):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
                return False
            return True

        def _route(self, body: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.log(Request(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            if token in hub.rejected_tokens:
                self._error(401, None, "Invalid credentials in Authorization header", body)
                return
            if hub.private and token not in hub.granted_tokens and path != "/":
                # The Hub does not tell a private repo from a missing one to whoever cannot read it.
                self._error(401, "RepoNotFound", "Repository not found", body)
                return
            if path.startswith("/api/models/"):
                rest = path[len("/api/models/"):].split("/")
                repo = "/".join(rest[:2])
                if len(rest) >= 4 and rest[2] == "tree":
                    if self._check_repo_and_rev(repo, rest[3], body):
                        self._json(hub.tree(), body)
                    return
                rev = rest[3] if len(rest) >= 4 and rest[2] == "revision" else None
                if self._check_repo_and_rev(repo, rev, body):
                    self._json(hub.info(blobs="blobs" in parse_qs(url.query)), body)
                return
            if "/resolve/" in path:
                repo, rest = path.lstrip("/").split("/resolve/", 1)
                rev, _, name = rest.partition("/")
                if not self._check_repo_and_rev(repo, rev, body):
                    return
                self._resolve(name, body)
                return
            self._error(404, None, "Not found", body)

        def _resolve(self, name: str, body: bool) -> None:
            if name not in hub.files:
                self._error(404, "EntryNotFound", f"{name} does not exist", body)
                return
            auth = self.headers.get("Authorization")
            if hub.gated and (auth or "").removeprefix("Bearer ") not in hub.granted_tokens:
                status = 403 if auth else 401
                self._error(status, "GatedRepo", f"Access to model {hub.repo_id} is restricted. You must have "
                            "access to it and be authenticated to access it. Please log in.", body)
                return
            data = hub.served.get(name, hub.files[name])
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and rng.endswith("-") and body:
                start = int(rng[len("bytes="):-1])
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hub.etag(name)}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            status = 200
            if start:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            fault = hub.faults.get(name) if body else None
            if fault is not None and (fault.fired == 0 or fault.kind == "down"):
                fault.fired += 1
                if fault.fired > 1:  # "down": the connection is closed without an answer
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:fault.at])
                self.wfile.flush()
                if fault.kind == "stall":
                    fault.stalled.set()
                    fault.release.wait(60)
                    try:
                        self.wfile.write(data[fault.at:])
                    except OSError:
                        pass  # the client hung up
                self.close_connection = True
                return
            self._send(status, data[start:], headers, body)

    return Handler
