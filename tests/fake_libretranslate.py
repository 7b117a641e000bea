"""A LibreTranslate-compatible HTTP server on loopback, for driving deep-translator's real HTTP path.

``POST /translate`` (parameters in the query string, as deep-translator sends
them, or in a form/JSON body, as other clients do) answers
``{"translatedText": ...}`` with a deterministic "translation": each word
found in a small English<->German lexicon is replaced, other words are kept.
Going en -> de -> en changes a few words (``good`` -> ``gut`` -> ``fine``), so a
round trip differs from its source when the source uses lexicon words.

The server can be told to fail the next N requests with a status code, to
answer the next N with an empty translation, to stall the next N, to fail
every request whose text contains a word, and to require an API key. It
counts every request, binds 127.0.0.1 on an ephemeral port only, refuses
more than ``max_requests`` requests, and shuts itself down after
``lifetime_s`` seconds if a test forgets to.

Usage::

    with FakeLibreTranslate() as server:
        LibreTranslator(source="en", target="de", api_key="k", custom_url=server.url).translate("good")
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

EN_DE = {"the": "der", "film": "Film", "was": "war", "good": "gut", "and": "und", "plot": "Handlung",
         "fun": "lustig", "movie": "Film", "great": "toll", "acting": "Schauspiel", "bad": "schlecht"}
# The way back is not the inverse: a round trip changes "good", "fun", "great", "movie".
DE_EN = {"der": "the", "Film": "film", "war": "was", "gut": "fine", "und": "and", "Handlung": "plot",
         "lustig": "funny", "toll": "excellent", "Schauspiel": "acting", "schlecht": "poor"}
LEXICONS = {("en", "de"): EN_DE, ("de", "en"): DE_EN}
LANGUAGES = [{"code": "en", "name": "English", "targets": ["de"]}, {"code": "de", "name": "German", "targets": ["en"]}]
MAX_BODY_BYTES = 64 * 1024


def fake_translate(text: str, source: str, target: str) -> str:
    """The server's deterministic translation of ``text``."""
    lexicon = LEXICONS.get((source, target), {})
    return " ".join(lexicon.get(word, word) for word in text.split())


@dataclass
class Call:
    """One request the server received."""

    path: str
    q: str | None
    source: str | None
    target: str | None
    api_key: str | None
    status: int


@dataclass
class _Behaviour:
    fail_next: int = 0
    fail_status: int = 503
    empty_next: int = 0
    stall_next: int = 0
    stall_s: float = 0.0
    fail_words: dict = field(default_factory=dict)  # word -> status, for every request containing it
    api_key: str | None = None


class FakeLibreTranslate:
    """The server; use as a context manager (or ``start``/``stop``)."""

    def __init__(self, max_requests: int = 500, lifetime_s: float = 60.0):
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.calls: list[Call] = []
        self.behaviour = _Behaviour()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._url = ""

    # -- control ---------------------------------------------------------

    def fail_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` translate requests get HTTP ``status``."""
        with self._lock:
            self.behaviour.fail_next, self.behaviour.fail_status = n, status

    def empty_next(self, n: int) -> None:
        """The next ``n`` translate requests get ``{"translatedText": ""}``."""
        with self._lock:
            self.behaviour.empty_next = n

    def stall_next(self, n: int, seconds: float) -> None:
        """The next ``n`` translate requests wait ``seconds`` before answering."""
        with self._lock:
            self.behaviour.stall_next, self.behaviour.stall_s = n, seconds

    def fail_word(self, word: str, status: int = 500) -> None:
        """Every translate request whose text contains ``word`` gets HTTP ``status``."""
        with self._lock:
            self.behaviour.fail_words[word] = status

    def require_key(self, key: str) -> None:
        """Answer 403 unless ``api_key`` equals ``key``."""
        with self._lock:
            self.behaviour.api_key = key

    @property
    def translate_calls(self) -> list[Call]:
        return [c for c in self.calls if c.path == "/translate"]

    # -- life cycle ------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (kept after stop, so a test can point a client at a closed port)."""
        return self._url

    def start(self) -> "FakeLibreTranslate":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _params(self) -> dict:
                parsed = urlparse(self.path)
                params = {k: v[0] for k, v in parse_qs(parsed.query).items()}
                length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY_BYTES)
                if length:
                    raw = self.rfile.read(length).decode("utf-8", "replace")
                    if self.headers.get("Content-Type", "").startswith("application/json"):
                        params.update(json.loads(raw or "{}"))
                    else:
                        params.update({k: v[0] for k, v in parse_qs(raw).items()})
                return params

            def _handle(self) -> None:
                path = urlparse(self.path).path
                params = self._params()
                status, body, stall = fake._respond(path, params)
                if stall:
                    time.sleep(stall)
                with fake._lock:
                    fake.calls.append(Call(path, params.get("q"), params.get("source"), params.get("target"),
                                           params.get("api_key"), status))
                try:
                    self._reply(status, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            do_GET = do_POST = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}/"
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-libretranslate")
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeLibreTranslate":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- behaviour -------------------------------------------------------

    def _respond(self, path: str, params: dict) -> tuple[int, object, float]:
        with self._lock:
            b = self.behaviour
            if len(self.calls) >= self.max_requests:
                return 429, {"error": "fake server: request limit reached"}, 0.0
            if path == "/languages":
                return 200, LANGUAGES, 0.0
            if path != "/translate":
                return 404, {"error": f"no route {path}"}, 0.0
            stall = 0.0
            if b.stall_next > 0:
                b.stall_next -= 1
                stall = b.stall_s
            if b.api_key is not None and params.get("api_key") != b.api_key:
                return 403, {"error": "Invalid API key"}, stall
            if b.fail_next > 0:
                b.fail_next -= 1
                return b.fail_status, {"error": "fake failure"}, stall
            text = params.get("q") or ""
            for word, status in b.fail_words.items():
                if word in text.split():
                    return status, {"error": f"fake failure on {word!r}"}, stall
            if b.empty_next > 0:
                b.empty_next -= 1
                return 200, {"translatedText": ""}, stall
            return 200, {"translatedText": fake_translate(text, params.get("source"), params.get("target"))}, stall
