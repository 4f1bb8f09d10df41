"""A stand-in for the Hugging Face Hub's HTTP API, in the standard library, serving repos from local folders.

It answers what huggingface_hub's `snapshot_download` and `hf_hub_download` ask for, the way the Hub does:

- GET  /api/models/{owner}/{name}[/revision/{rev}]            the repo's info: id, sha (its commit), siblings
- GET  /api/models/{owner}/{name}/tree/{rev}[/{path}]          the file listing (?recursive=true|false)
- HEAD /{owner}/{name}/resolve/{rev}/{path}                    X-Repo-Commit, ETag, Content-Length
- GET  /{owner}/{name}/resolve/{rev}/{path}                    the file
- GET  /api/agent-harnesses                                    an empty registry (huggingface_hub >= 2.x asks for
                                                               it once a day, for its User-Agent, unless offline)

Errors carry the Hub's `X-Error-Code` header, which `huggingface_hub.utils.hf_raise_for_status` turns into
RepositoryNotFoundError (RepoNotFound), RevisionNotFoundError (RevisionNotFound) or RemoteEntryNotFoundError
(EntryNotFound). No Xet or LFS headers are sent, so the client downloads over plain HTTP.

Every repo has one commit, `commit_of(repo_id)`; the revision "main" and that commit are accepted. Every request
is recorded in `server.requests` as (method, path); `server.downloads()` lists the files fetched (GET resolve).
"""

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

API_PREFIX = "/api/models/"


def commit_of(repo_id: str) -> str:
    """The fixed 40-hex commit a repo is served at."""
    return hashlib.sha1(f"commit of {repo_id}".encode()).hexdigest()


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content, as the Hub reports for `oid` and (non-LFS) ETags."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, Path]):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def log(self) -> list[tuple[str, str]]:
        """A copy of the requests so far (method, URL path without query)."""
        with self._lock:
            return list(self.requests)

    def downloads(self, since: int = 0, repo_id: str | None = None) -> list[str]:
        """The repo files fetched (GET .../resolve/{rev}/{file}) from request number `since` on."""
        out = []
        for method, path in self.log()[since:]:
            parsed = parse_resolve(path)
            if method == "GET" and parsed and (repo_id is None or parsed[0] == repo_id):
                out.append(parsed[2])
        return out

    def files(self, repo_id: str) -> list[str]:
        """The repo's files, as POSIX paths relative to its folder, sorted."""
        root = self.repos[repo_id]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def parse_resolve(path: str) -> tuple[str, str, str] | None:
    """(repo_id, revision, filename) of a /{owner}/{name}/resolve/{rev}/{file} path, else None."""
    parts = path.lstrip("/").split("/")
    if len(parts) >= 5 and parts[2] == "resolve" and not path.startswith("/api/"):
        return f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:]))
    return None


class HubHandler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers at shutdown

    def log_message(self, format, *args):
        pass

    def do_HEAD(self):
        self._handle(body=False)

    def do_GET(self):
        self._handle(body=True)

    # ------------------------------------------------------------------------------------------ routing

    def _handle(self, body: bool) -> None:
        split = urlsplit(self.path)
        path = split.path
        self.server.record(self.command, path)
        query = parse_qs(split.query)
        if path == "/api/agent-harnesses":
            self._json({"standardEnvVars": [], "harnesses": {}}, body)
        elif path.startswith(API_PREFIX):
            self._api(path[len(API_PREFIX):], query, body)
        elif (resolved := parse_resolve(path)) is not None:
            self._resolve(*resolved, body=body)
        else:
            self._error(404, None, "Not Found", body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> Path | None:
        if repo_id not in self.server.repos:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if revision not in ("main", commit_of(repo_id)):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
            return None
        return self.server.repos[repo_id]

    def _api(self, rest: str, query: dict, body: bool) -> None:
        parts = rest.split("/")
        if len(parts) < 2:
            return self._error(404, None, "Not Found", body)
        repo_id = f"{parts[0]}/{parts[1]}"
        tail = parts[2:]
        if not tail:  # /api/models/{repo}: the default branch
            tail = ["revision", "main"]
        if tail[0] == "revision" and len(tail) == 2:
            if (root := self._repo(repo_id, unquote(tail[1]), body)) is None:
                return None
            siblings = [{"rfilename": f} for f in self.server.files(repo_id)]
            return self._json({"id": repo_id, "modelId": repo_id, "sha": commit_of(repo_id), "private": False,
                               "gated": False, "disabled": False, "siblings": siblings}, body)
        if tail[0] == "tree" and len(tail) >= 2:
            if (root := self._repo(repo_id, unquote(tail[1]), body)) is None:
                return None
            return self._tree(repo_id, root, unquote("/".join(tail[2:])).strip("/"), query, body)
        return self._error(404, None, "Not Found", body)

    def _tree(self, repo_id: str, root: Path, sub: str, query: dict, body: bool) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = root / sub if sub else root
        if not base.is_dir():
            return self._error(404, "EntryNotFound", f"{sub} does not exist on 'main'", body)
        entries = []
        for p in sorted(base.rglob("*") if recursive else base.iterdir()):
            rel = p.relative_to(root).as_posix()
            if p.is_dir():
                entries.append({"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0,
                                "path": rel})
            else:
                data = p.read_bytes()
                entries.append({"type": "file", "oid": git_blob_id(data), "size": len(data), "path": rel})
        return self._json(entries, body)

    def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
        if (root := self._repo(repo_id, revision, body)) is None:
            return
        file = root / filename
        if ".." in Path(filename).parts or not file.is_file():
            return self._error(404, "EntryNotFound", f"{filename} does not exist", body,
                               {"X-Repo-Commit": commit_of(repo_id)})
        data = file.read_bytes()
        self._send(200, data, "application/octet-stream", body,
                   {"X-Repo-Commit": commit_of(repo_id), "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"})

    # ---------------------------------------------------------------------------------------- responses

    def _json(self, value, body: bool) -> None:
        self._send(200, json.dumps(value).encode(), "application/json", body)

    def _error(self, status: int, code: str | None, message: str, body: bool, extra: dict | None = None) -> None:
        headers = dict(extra or {})
        if code is not None:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), "application/json", body, headers)

    def _send(self, status: int, data: bytes, content_type: str, body: bool, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


def serve(repos: dict[str, Path]) -> tuple[str, HubServer]:
    """Start a mock Hub serving `repos` ({"owner/name": folder}) on 127.0.0.1 in a daemon thread.

    Returns (url, server); stop it with `server.shutdown(); server.server_close()`.
    """
    server = HubServer(repos)
    threading.Thread(target=server.serve_forever, name="mock-hub", daemon=True).start()
    return server.url, server


@contextlib.contextmanager
def serving(repos: dict[str, Path]) -> Iterator[HubServer]:
    """`serve` as a context manager: the server (its `.url`) while the block runs, shut down after."""
    _, server = serve(repos)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
