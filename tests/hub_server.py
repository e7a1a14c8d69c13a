"""A stand-in for the Hugging Face Hub (dataset repos, read only): an HTTP server on 127.0.0.1 speaking the part of
the Hub's API that `huggingface_hub.HfFileSystem` (2.x) calls to list and read files. It is the external service,
not the code under test: our sources reach it through `HF_ENDPOINT`, with the real client, over real HTTP.

Routes, as huggingface_hub builds them (revisions and paths in the API routes are URL-quoted with safe=''):
  GET  /api/datasets/{repo}[/revision/{rev}]            repo info (`sha` of the revision)  HfApi.dataset_info
  GET  /api/datasets/{repo}/tree/{rev}[/{path}]         ?recursive=&expand=                 HfApi.list_repo_tree
  POST /api/datasets/{repo}/paths-info/{rev}            form: paths=..., expand=            HfApi.get_paths_info
  GET|HEAD /datasets/{repo}/resolve/{rev}/{path}        whole file or a `Range: bytes=a-b`  HfFileSystemFile
  GET|HEAD /{repo}/resolve/{rev}/{path}, /api/models/{repo}...   a model repo: 401 GatedRepo for the `gated` ones
                                                                 (a gated model asked for without a token), else 404
Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which the client
maps to its exceptions. Files live in `<root>/<owner>/<name>/<quoted revision>/...`, one folder per branch or ref
(`refs/convert/parquet` included); a revision is also found by its commit sha (a hash of repo and revision).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


def commit_sha(repo: str, revision: str) -> str:
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


class NotFound(Exception):
    def __init__(self, code: str, message: str, status: int = 404):
        super().__init__(message)
        self.code, self.status = code, status


class StandInHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.gated: set[str] = set()  # model repos that answer 401 GatedRepo (no token is ever accepted here)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the Hub: every response has a Content-Length

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_POST(self):
                hub._handle(self, "POST")

        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def folder(self, repo: str, revision: str = "main") -> Path:
        """Where the files of `repo` at `revision` go (created): write them as the repo lays them out."""
        path = self.root / repo / quote(revision, safe="")
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- the Hub's side ----------------------------------------------------------------------------------------

    def _revision(self, repo: str, revision: str) -> tuple[str, Path]:
        """(revision name, its folder) for a branch/ref name or a commit sha."""
        if not (self.root / repo).is_dir():
            raise NotFound("RepoNotFound", f"Repository {repo} not found")
        for folder in (self.root / repo).iterdir():
            name = unquote(folder.name)
            if revision in (name, commit_sha(repo, name)):
                return name, folder
        raise NotFound("RevisionNotFound", f"Invalid rev id: {revision}")

    @staticmethod
    def _entry(folder: Path, path: Path) -> dict:
        inner = path.relative_to(folder).as_posix()
        if path.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(inner.encode()).hexdigest(), "path": inner}
        data = path.read_bytes()
        return {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "size": len(data),
                "path": inner}

    def _tree(self, folder: Path, inner: str, recursive: bool) -> list[dict]:
        base = folder / inner if inner else folder
        if not base.is_dir():
            raise NotFound("EntryNotFound", f"{inner} does not exist on this revision")
        children = base.rglob("*") if recursive else base.iterdir()
        return [self._entry(folder, p) for p in sorted(children)]

    def _route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict, bytes | list | dict]:
        api = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.+))?)?", path)
        if api:
            repo, action, revision, rest = api.groups()
            name, folder = self._revision(repo, unquote(revision) if revision else "main")
            sha = commit_sha(repo, name)
            if action in (None, "revision") and method == "GET":
                siblings = [{"rfilename": e["path"]} for e in self._tree(folder, "", True) if e["type"] == "file"]
                return 200, {}, {"id": repo, "sha": sha, "private": False, "siblings": siblings}
            if action == "tree" and method == "GET":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return 200, {}, self._tree(folder, unquote(rest or ""), recursive)
            if action == "paths-info" and method == "POST":
                paths = parse_qs(body.decode()).get("paths", [])
                return 200, {}, [self._entry(folder, folder / p) for p in paths if (folder / p).exists()]
        resolve = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve and method in ("GET", "HEAD"):
            repo, revision, inner = resolve.groups()
            name, folder = self._revision(repo, unquote(revision))
            file = folder / unquote(inner)
            if not file.is_file():
                raise NotFound("EntryNotFound", f"{unquote(inner)} does not exist on this revision")
            return 200, {"X-Repo-Commit": commit_sha(repo, name), "ETag": f'"{self._entry(folder, file)["oid"]}"',
                         "Accept-Ranges": "bytes"}, file.read_bytes()
        model = re.fullmatch(r"/(?:api/models/)?([^/]+/[^/]+)(?:/.*)?", path)
        if model and model.group(1) in self.gated:
            raise NotFound("GatedRepo", f"Access to model {model.group(1)} is restricted. You must have access to it "
                           "and be authenticated to access it. Please log in.", 401)
        return 404, {}, {"error": f"no route for {method} {path}"}

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests.append((method, url.path))
        headers: dict[str, str] = {}
        try:
            status, headers, payload = self._route(method, url.path, parse_qs(url.query), body)
        except NotFound as missing:
            status, headers, payload = missing.status, {"X-Error-Code": missing.code, "X-Error-Message": str(missing)}, \
                {"error": str(missing)}
        if isinstance(payload, bytes):
            data, kind = payload, "application/octet-stream"
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", handler.headers.get("Range", ""))
            if ranged and status == 200:
                start, stop = int(ranged[1]), min(int(ranged[2] or len(payload) - 1), len(payload) - 1)
                if start >= len(payload):
                    status, data, headers["Content-Range"] = 416, b"", f"bytes */{len(payload)}"
                else:
                    status, data = 206, payload[start:stop + 1]
                    headers["Content-Range"] = f"bytes {start}-{stop}/{len(payload)}"
        else:
            data, kind = json.dumps(payload).encode(), "application/json"
        handler.send_response(status)
        for key, value in {**headers, "Content-Type": kind, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data)
