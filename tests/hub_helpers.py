"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving the routes huggingface_hub calls to resolve and
download a model.

Routes (as huggingface_hub builds them, see ``HfApi.model_info``, ``HfApi.list_repo_tree`` and
``file_download.get_hf_file_metadata`` / ``http_get``):

- ``GET /api/models/ORG/NAME[/revision/REV]``: model info (``sha``, ``siblings`` with sizes);
- ``GET /api/models/ORG/NAME/tree/REV?recursive=...``: the file list of a commit;
- ``HEAD`` / ``GET /ORG/NAME/resolve/REV/PATH``: a file, with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``.

Errors carry the ``X-Error-Code`` header the Hub sends (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``), which huggingface_hub maps to its exception types. A gated
repository answers file requests only with ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated_token: str | None = None


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a model folder, by its path in the folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.commits: dict[str, str] = {}  # the tests' names for the commits they push
        self._server: ThreadingHTTPServer | None = None

    def push(self, repo_id: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",)) -> str:
        """Add a commit holding ``files`` and point ``refs`` at it; returns its 40-hex commit hash."""
        repo = self.repos.setdefault(repo_id, Repo())
        digest = hashlib.sha1(
            repo_id.encode() + json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
        )
        commit = digest.hexdigest()
        repo.commits[commit] = dict(files)
        for ref in refs:
            repo.refs[ref] = commit
        return commit

    def downloads(self) -> list[tuple[str, str]]:
        """``(repo_id, path)`` of each file fetched (GET) since the last ``clear``."""
        out = []
        for method, path in self.requests:
            if method == "GET" and "/resolve/" in path:
                repo, rest = path.strip("/").split("/resolve/", 1)
                out.append((repo, rest.split("/", 1)[1]))
        return out

    def clear(self) -> None:
        self.requests.clear()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def do_GET(self) -> None:
                hub._answer(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ routes

    def _commit(self, repo: Repo, revision: str) -> str | None:
        return repo.refs.get(revision) or (revision if revision in repo.commits else None)

    def _answer(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(req.path).path
        self.requests.append(("HEAD" if head else "GET", path))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(req, parts[2] + "/" + parts[3], parts[4:])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(req, parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head)
        self._send(req, 404, b"not found", {"X-Error-Code": "EntryNotFound"})

    def _api(self, req, repo_id: str, rest: list[str]) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(req, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        if not rest:
            rest = ["revision", "main"]
        if rest[0] not in ("revision", "tree") or len(rest) < 2:
            return self._send(req, 404, b"{}", {"X-Error-Code": "EntryNotFound"})
        commit = self._commit(repo, rest[1])
        if commit is None:
            return self._send(req, 404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"})
        files = repo.commits[commit]
        if rest[0] == "revision":
            siblings = [
                {"rfilename": p, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()}
                for p, b in sorted(files.items())
            ]
            body = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": "auto" if repo.gated_token else False,
                "siblings": siblings,
            }
        else:
            body = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in sorted(files.items())
            ]
        self._send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _file(self, req, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(req, 404, b"", {"X-Error-Code": "RepoNotFound"}, head)
        if repo.gated_token and req.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            return self._send(
                req,
                403,
                b"",
                {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted"},
                head,
            )
        commit = self._commit(repo, revision)
        if commit is None:
            return self._send(req, 404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
        data = repo.commits[commit].get(name)
        if data is None:
            return self._send(req, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, head)
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
        self._send(
            req,
            200,
            data,
            {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
            head,
        )

    @staticmethod
    def _send(req, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)


def use_hub(monkeypatch, cache: Path, endpoint: str | None = None, *, offline: bool = False) -> None:
    """Point langmerge (and huggingface_hub) at ``cache`` and ``endpoint`` for one test; monkeypatch undoes it.

    huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` into constants at import; langmerge reads the
    environment at call time and passes the cache and endpoint explicitly, so setting the variables suffices.
    ``HF_HUB_OFFLINE`` is also patched in huggingface_hub's constants so that its own HTTP layer agrees.
    """
    import huggingface_hub.constants as constants  # read from the environment when imported: only here

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(Path(cache).parent / "hf-home"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if endpoint is None:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: any request fails at once
    else:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
