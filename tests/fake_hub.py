"""A Hugging Face hub on loopback, answering the API calls ftflow's hub check makes as the real hub answers them.

Point the hub client at it with ``HF_ENDPOINT=server.url`` (and ``huggingface_hub.constants.HF_HUB_OFFLINE``
False). It serves, for the models it is given:

* ``GET /api/models/<org>/<name>`` (``HfApi.model_info``): the repository's id, sha, ``gated`` flag and files
  with their sizes (``?blobs=true``); an unknown id answers 401 without a token and 404 with one, both with
  ``X-Error-Code: RepoNotFound``, as the hub does (so a private repository does not reveal itself);
* ``GET /api/models/<org>/<name>/auth-check`` (``HfApi.auth_check``): 200, or for a gated model 401 without a
  token and 403 with a token not granted access, with ``X-Error-Code: GatedRepo`` and the hub's messages;
* ``HEAD``/``GET /<org>/<name>/resolve/<revision>/<file>`` (``hf_hub_download``): the file, with the
  ``X-Repo-Commit``, ``ETag`` and ``Content-Length`` headers the download protocol reads.

A token the server does not know is refused on every call with 401 and ``X-Error-Message: Invalid credentials in
Authorization header``, which huggingface_hub keeps apart from "not found". Every request is recorded. Binds
127.0.0.1 on an ephemeral port only.

:func:`put_in_cache` lays out a model in a Hugging Face cache as a download would.

Usage::

    with FakeHub({"org/model": FakeModel(files={"config.json": b"{}"})}, tokens={"hf_good"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def put_in_cache(cache: Path, model_id: str, files: dict[str, bytes]) -> None:
    """Files of one model in a Hugging Face cache's layout (``refs/main`` -> ``snapshots/<sha>/<file>``), as a
    download leaves them."""
    folder = Path(cache) / ("models--" + model_id.replace("/", "--"))
    sha = "a" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(sha)
    for name, content in files.items():
        path = folder / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@dataclass
class FakeModel:
    """One repository: its files (content, or a size for a file that is only listed), gating and who may read it."""

    files: dict[str, bytes | int] = field(default_factory=dict)
    gated: bool | str = False
    granted: set[str] = field(default_factory=set)

    def size(self, name: str) -> int:
        content = self.files[name]
        return content if isinstance(content, int) else len(content)


@dataclass
class Request:
    method: str
    path: str
    token: str | None
    status: int


class FakeHub:
    """The server (a context manager); ``url`` is its endpoint, ``requests`` what it was asked."""

    def __init__(self, models: dict[str, FakeModel], tokens: set[str] = frozenset()) -> None:
        self.models = {k.lower(): (k, v) for k, v in models.items()}
        self.tokens = set(tokens)
        self.requests: list[Request] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._answer(self, "GET")

            def do_HEAD(self) -> None:
                hub._answer(self, "HEAD")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        auth = handler.headers.get("authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        path = unquote(urlparse(handler.path).path)
        status, headers, body = self._route(method, path, token)
        self.requests.append(Request(method, path, token, status))
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        handler.end_headers()
        if method == "GET":
            handler.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        return status, headers, json.dumps({"error": message}).encode()

    def _route(self, method: str, path: str, token: str | None) -> tuple[int, dict, bytes]:
        if token is not None and token not in self.tokens:
            return self._error(401, None, "Invalid credentials in Authorization header")
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo_parts = parts[2:4] if api else parts[:2]
        found = self.models.get("/".join(repo_parts).lower())
        if found is None:
            return self._error(404 if token else 401, "RepoNotFound", "Repository not found")
        model_id, model = found
        sha = hashlib.sha1(model_id.encode()).hexdigest()
        if api and parts[4:] == ["auth-check"]:
            return self._gate(model_id, model, token) or (200, {"Content-Type": "application/json"}, b"{}")
        if api and len(parts) == 4:
            info = {"id": model_id, "modelId": model_id, "sha": sha, "private": False, "gated": model.gated,
                    "siblings": [{"rfilename": name, "size": model.size(name)} for name in sorted(model.files)]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        if not api and len(parts) >= 5 and parts[2] == "resolve":
            if refused := self._gate(model_id, model, token):
                return refused
            name = "/".join(parts[4:])
            if name not in model.files or isinstance(model.files[name], int):
                return self._error(404, "EntryNotFound", "Entry not found")
            content = model.files[name]
            return 200, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                         "Content-Length": str(len(content))}, content
        return self._error(404, None, "Not found")

    def _gate(self, model_id: str, model: FakeModel, token: str | None) -> tuple[int, dict, bytes] | None:
        if not model.gated or token in model.granted:
            return None
        if token is None:
            return self._error(401, "GatedRepo", f"Access to model {model_id} is restricted. You must have access "
                               "to it and be authenticated to access it. Please log in.")
        return self._error(403, "GatedRepo", f"Access to model {model_id} is restricted and you are not in the "
                           f"authorized list. Visit https://huggingface.co/{model_id} to ask for access.")
