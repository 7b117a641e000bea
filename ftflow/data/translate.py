"""Back-translation (en -> pivot -> en) through deep-translator or a local model, cached on disk.

The network is the only flaky part of augmentation, so everything about it is
explicit here and testable without Prefect:

* :func:`call_with_retries` retries *network* errors only (connection errors,
  timeouts, HTTP 429/5xx) with exponential backoff and jitter; a refusal
  (bad key, text too long, empty answer) is not retried.
* :class:`RateLimiter` spaces calls to the service.
* :class:`TranslationCache` (SQLite) keeps every translation keyed by
  ``(service, source language, target language, text)``; a rerun never calls
  the service again for a sentence it has already translated. Failures are not
  cached, so a rerun tries them again.
* A sentence whose translation fails raises :class:`TranslationFailed` with a
  reason; the caller counts it and leaves it out. After
  ``give_up_after_failures`` consecutive network failures the service is taken
  to be down and :class:`TranslationServiceDown` stops the run (what was
  translated so far stays in the cache).

deep-translator gives its HTTP calls no timeout; :func:`_request_timeout` adds
one for the calls made here (and only those).
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ftflow.config import BackTranslationConfig

CACHE_FILE = "translations.sqlite"
# deep-translator's LibreTranslator refuses to start without a key even for a
# self-hosted server that needs none; this placeholder is sent instead (such a
# server ignores it).
NO_KEY = "no-key"


class TranslationFailed(Exception):
    """One text could not be translated; ``reason`` is ``network``, ``empty`` or ``rejected``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TranslationServiceDown(RuntimeError):
    """Too many texts in a row failed with network errors: the service is unreachable."""


# ---------------------------------------------------------------------------
# Retries, backoff, rate limit
# ---------------------------------------------------------------------------

# ServerException messages (deep-translator maps status codes to these) that a retry can cure.
_TRANSIENT_SERVER_MESSAGES = {
    "ERR_TOO_MANY_REQUESTS",  # 429
    "ERR_INTERNAL_SERVER_ERROR",  # 500
    "ERR_SERVICE_NOT_AVAIBLE",  # 503 (sic)
    "API server error",  # any other status code, e.g. 502, 504
}


def is_network_error(exc: BaseException) -> bool:
    """True for errors a retry can cure: connection problems, timeouts, HTTP 429 and 5xx."""
    import requests
    from deep_translator import exceptions as dt

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        requests.exceptions.ChunkedEncodingError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (dt.TooManyRequests, dt.RequestError)):
        return True  # raised by Google/MyMemory for 429 and for a failed request
    if isinstance(exc, dt.ServerException):
        return bool(exc.args) and exc.args[0] in _TRANSIENT_SERVER_MESSAGES
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a network call is retried.

    Attributes:
        retries: attempts after the first one.
        base_delay_s: wait before the first retry; doubled for each further retry.
        max_delay_s: cap on one wait.
        jitter: share (0..1) of each wait drawn at random, so parallel clients do not retry in step.
    """

    retries: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    jitter: float = 0.5


def backoff_delay(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Seconds to wait before retry ``retry_number`` (0-based): ``min(max, base * 2**n) * (1 - jitter * U[0,1))``."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * (2**retry_number))
    return ceiling * (1.0 - policy.jitter * rng.random())


def call_with_retries(
    fn: Callable[[], str],
    policy: RetryPolicy,
    *,
    is_transient: Callable[[BaseException], bool] = is_network_error,
    sleep: Callable[[float], None] = time.sleep,
    rng: Optional[random.Random] = None,
    on_retry: Optional[Callable[[int, BaseException, float], None]] = None,
) -> str:
    """``fn()``, retried with backoff while it raises a transient error; other errors pass through at once."""
    rng = rng or random.Random()
    for retry in range(policy.retries + 1):
        try:
            return fn()
        except Exception as exc:
            if retry == policy.retries or not is_transient(exc):
                raise
            delay = backoff_delay(policy, retry, rng)
            if on_retry is not None:
                on_retry(retry, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")


class RateLimiter:
    """At most ``calls_per_second`` calls start per second (evenly spaced), across threads."""

    def __init__(self, calls_per_second: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if calls_per_second <= 0:
            raise ValueError(f"calls_per_second must be > 0, got {calls_per_second}")
        self.interval_s = 1.0 / calls_per_second
        self._clock, self._sleep = clock, sleep
        self._next_start = float("-inf")
        self._lock = threading.Lock()
        self.waited_s = 0.0

    def wait(self) -> None:
        """Block until the next call may start."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next_start)
            self._next_start = start + self.interval_s
        if start > now:
            self.waited_s += start - now
            self._sleep(start - now)


# deep-translator calls requests.get/post without a timeout, so a stalled
# server would hang the stage forever. requests.api.request is wrapped once to
# add a timeout, and only for calls made while _request_timeout is active in
# the same thread; every other caller of requests sees no change.
_timeout_state = threading.local()
_hook_lock = threading.Lock()


def _install_timeout_hook() -> None:
    import requests.api

    with _hook_lock:
        if getattr(requests.api.request, "_ftflow_timeout_hook", False):
            return
        original = requests.api.request

        def request(method, url, **kwargs):
            timeout_s = getattr(_timeout_state, "timeout_s", None)
            if timeout_s is not None and kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout_s
            return original(method, url, **kwargs)

        request._ftflow_timeout_hook = True
        requests.api.request = request


@contextmanager
def _request_timeout(timeout_s: Optional[float]) -> Iterator[None]:
    if timeout_s is None:
        yield
        return
    _install_timeout_hook()
    previous = getattr(_timeout_state, "timeout_s", None)
    _timeout_state.timeout_s = timeout_s
    try:
        yield
    finally:
        _timeout_state.timeout_s = previous


# ---------------------------------------------------------------------------
# On-disk cache
# ---------------------------------------------------------------------------


class TranslationCache:
    """Translations on disk (SQLite), keyed by ``(service, source, target, text)``.

    Every ``put`` is committed at once: a run killed halfway keeps what it paid for.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS translations (service TEXT NOT NULL, source TEXT NOT NULL, "
                "target TEXT NOT NULL, text TEXT NOT NULL, translation TEXT NOT NULL, "
                "PRIMARY KEY (service, source, target, text))"
            )

    @classmethod
    def in_dir(cls, directory: str | Path) -> "TranslationCache":
        """The cache file :data:`CACHE_FILE` inside ``directory``."""
        return cls(Path(directory) / CACHE_FILE)

    def get(self, service: str, source: str, target: str, text: str) -> Optional[str]:
        with self._lock:
            row = self._db.execute(
                "SELECT translation FROM translations WHERE service=? AND source=? AND target=? AND text=?",
                (service, source, target, text),
            ).fetchone()
        return None if row is None else row[0]

    def put(self, service: str, source: str, target: str, text: str, translation: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?)",
                (service, source, target, text, translation),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "TranslationCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# One direction: service call + cache + retries + rate limit
# ---------------------------------------------------------------------------


@dataclass
class TranslatorStats:
    """What one direction of translation did (JSON-ready through :meth:`as_dict`)."""

    requested: int = 0
    cache_hits: int = 0
    service_calls: int = 0
    retries: int = 0
    failed: dict = field(default_factory=lambda: {"network": 0, "empty": 0, "rejected": 0})

    def as_dict(self) -> dict:
        return {"requested": self.requested, "cache_hits": self.cache_hits, "service_calls": self.service_calls,
                "retries": self.retries, "failed": dict(self.failed)}


class CachedTranslator:
    """Translate texts in one direction, through the cache, with retries and a rate limit.

    Args:
        service_id: names the service in cache keys (e.g. ``libre@http://host:5000/``).
        source, target: language codes as stored in the cache.
        translate_one: the service call for one text.
        cache: where translations are kept.
        retry, limiter: network behaviour (``limiter=None``: no rate limit, for local models).
        translate_batch: optional call for many texts at once (local models); not retried.
        batch_size: texts per ``translate_batch`` call.
        timeout_s: timeout added to each HTTP request of the service.
    """

    def __init__(self, service_id: str, source: str, target: str, translate_one: Callable[[str], str],
                 cache: TranslationCache, *, retry: RetryPolicy = RetryPolicy(),
                 limiter: Optional[RateLimiter] = None,
                 translate_batch: Optional[Callable[[list[str]], list[str]]] = None,
                 batch_size: int = 16, timeout_s: Optional[float] = None, sleep: Callable[[float], None] = time.sleep,
                 rng: Optional[random.Random] = None):
        self.service_id, self.source, self.target = service_id, source, target
        self._one, self._batch, self.batch_size = translate_one, translate_batch, batch_size
        self.cache, self.retry, self.limiter, self.timeout_s = cache, retry, limiter, timeout_s
        self._sleep, self._rng = sleep, rng or random.Random()
        self.stats = TranslatorStats()

    @property
    def batched(self) -> bool:
        """True when texts go to the service in batches (local models)."""
        return self._batch is not None

    def _checked(self, text: str, translation) -> str:
        if translation is None or not str(translation).strip():
            self.stats.failed["empty"] += 1
            raise TranslationFailed("empty", f"{self.service_id} returned nothing for {text[:60]!r}")
        translation = " ".join(str(translation).split())
        self.cache.put(self.service_id, self.source, self.target, text, translation)
        return translation

    def _call(self, text: str) -> str:
        def attempt() -> str:
            if self.limiter is not None:
                self.limiter.wait()
            self.stats.service_calls += 1
            with _request_timeout(self.timeout_s):
                return self._one(text)

        def count_retry(*_):
            self.stats.retries += 1

        from deep_translator import exceptions as dt

        try:
            return call_with_retries(attempt, self.retry, sleep=self._sleep, rng=self._rng, on_retry=count_retry)
        except dt.TranslationNotFound:
            return ""  # the service answered, with nothing: counted as empty by _checked
        except Exception as exc:
            reason = "network" if is_network_error(exc) else "rejected"
            self.stats.failed[reason] += 1
            raise TranslationFailed(reason, f"{type(exc).__name__}: {exc}") from exc

    def translate(self, text: str) -> str:
        """The translation of ``text`` (from the cache when there), or :class:`TranslationFailed`."""
        self.stats.requested += 1
        cached = self.cache.get(self.service_id, self.source, self.target, text)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        return self._checked(text, self._call(text))

    def translate_many(self, texts: Sequence[str]) -> dict[str, str | TranslationFailed]:
        """Each distinct text -> its translation or the :class:`TranslationFailed` it raised."""
        results: dict[str, str | TranslationFailed] = {}
        missing: list[str] = []
        for text in dict.fromkeys(texts):
            self.stats.requested += 1
            cached = self.cache.get(self.service_id, self.source, self.target, text)
            if cached is not None:
                self.stats.cache_hits += 1
                results[text] = cached
            else:
                missing.append(text)
        if self._batch is not None:
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                self.stats.service_calls += 1
                for text, translation in zip(chunk, self._batch(chunk), strict=True):
                    try:
                        results[text] = self._checked(text, translation)
                    except TranslationFailed as exc:
                        results[text] = exc
        else:
            for text in missing:
                try:
                    results[text] = self._checked(text, self._call(text))
                except TranslationFailed as exc:
                    results[text] = exc
        return results


# ---------------------------------------------------------------------------
# Both directions
# ---------------------------------------------------------------------------


class BackTranslator:
    """``source -> pivot -> source`` with two :class:`CachedTranslator`; counts failures per reason.

    Args:
        forward, backward: the two directions.
        give_up_after_failures: consecutive texts failing with network errors
            after which :class:`TranslationServiceDown` is raised.
    """

    def __init__(self, forward: CachedTranslator, backward: CachedTranslator, give_up_after_failures: int = 20):
        self.forward, self.backward = forward, backward
        self.give_up_after_failures = give_up_after_failures
        self._network_failures_in_row = 0

    @property
    def service_id(self) -> str:
        return self.forward.service_id

    def _track(self, outcome) -> None:
        if isinstance(outcome, TranslationFailed) and outcome.reason == "network":
            self._network_failures_in_row += 1
            if self._network_failures_in_row >= self.give_up_after_failures:
                raise TranslationServiceDown(
                    f"{self._network_failures_in_row} texts in a row failed with network errors on "
                    f"{self.service_id} (last: {outcome.detail}); is the service reachable? "
                    "Translations made so far are cached and a rerun resumes from them."
                ) from outcome
        elif not isinstance(outcome, TranslationFailed):
            self._network_failures_in_row = 0

    def back_translate_many(self, texts: Sequence[str]) -> dict[str, str | TranslationFailed]:
        """Each distinct text -> its round-trip translation or the :class:`TranslationFailed` of either leg."""
        texts = list(dict.fromkeys(texts))
        if self.forward.batched:  # local models: whole batches per leg, no network to track
            pivots = self.forward.translate_many(texts)
            ok = [p for p in pivots.values() if isinstance(p, str)]
            backs = self.backward.translate_many(ok)
            return {t: pivots[t] if isinstance(pivots[t], TranslationFailed) else backs[pivots[t]] for t in texts}
        results = {}
        for text in texts:
            try:
                results[text] = self.backward.translate(self.forward.translate(text))
            except TranslationFailed as exc:
                results[text] = exc
            self._track(results[text])
        return results

    def __call__(self, text: str) -> str:
        """The round trip of one text, or :class:`TranslationFailed`."""
        outcome = self.back_translate_many([text])[text]
        if isinstance(outcome, TranslationFailed):
            raise outcome
        return outcome

    def stats(self) -> dict:
        return {"service": self.service_id, "forward": self.forward.stats.as_dict(),
                "backward": self.backward.stats.as_dict()}


# ---------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------

# Microsoft is left out: deep-translator's MicrosoftTranslator fetches its language
# list over the network, without a timeout, as soon as it is constructed.
DEEP_TRANSLATOR_SERVICES = ("google", "mymemory", "libre", "deepl")


def _language(translator_languages: dict, code: str) -> str:
    """``code`` as the service spells it: MyMemory wants ``en-GB`` where the others take ``en``."""
    codes = set(translator_languages.values())
    if code in codes or code.lower() in {k.lower() for k in translator_languages}:
        return code
    from deep_translator.constants import GOOGLE_LANGUAGES_TO_CODES

    names = [name for name, value in GOOGLE_LANGUAGES_TO_CODES.items() if value == code]
    by_name = {k.lower(): v for k, v in translator_languages.items()}
    for name in names:
        if name.lower() in by_name:
            return by_name[name.lower()]
    return code  # let deep-translator report it as unsupported


def read_api_key(env_name: Optional[str]) -> Optional[str]:
    """The API key from the environment variable named in config (the key itself is never in config)."""
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ValueError(f"augment.back_translation.api_key_env names {env_name!r}, but that environment "
                         f"variable is not set; export {env_name}=<your key>")
    return key


def make_deep_translator(settings: "BackTranslationConfig", source: str, target: str):
    """A deep-translator object for one direction, built from config (no network call is made)."""
    import deep_translator as dtr
    from deep_translator import constants as c

    key = read_api_key(settings.api_key_env)
    service = settings.service
    if service == "google":
        return dtr.GoogleTranslator(source=source, target=target)
    if service == "mymemory":
        languages = c.MY_MEMORY_LANGUAGES_TO_CODES
        return dtr.MyMemoryTranslator(source=_language(languages, source), target=_language(languages, target))
    if service == "libre":
        kwargs = {"custom_url": service_url(settings)} if settings.url else {}
        return dtr.LibreTranslator(source=source, target=target, api_key=key or NO_KEY,
                                   use_free_api=settings.use_free_api, **kwargs)
    if service == "deepl":
        return dtr.DeeplTranslator(source=source, target=target, api_key=key, use_free_api=settings.use_free_api)
    raise ValueError(f"unknown translation service {service!r}; choose from {DEEP_TRANSLATOR_SERVICES} or local")


def service_url(settings: "BackTranslationConfig") -> Optional[str]:
    """The configured service URL, ending in ``/`` (deep-translator appends endpoint names to it)."""
    return None if settings.url is None else settings.url.rstrip("/") + "/"


def service_id(settings: "BackTranslationConfig") -> str:
    """Name of the service in cache keys: a different server or model is a different translator."""
    if settings.service == "libre":
        return f"libre@{service_url(settings) or 'default'}"
    if settings.service == "deepl":
        return f"{settings.service}{'-free' if settings.use_free_api else ''}"
    return settings.service


class LocalModelTranslator:
    """A local sequence-to-sequence translation model (e.g. a MarianMT directory), greedy decoding.

    Args:
        model_dir: folder with ``config.json``, weights and tokenizer files.
        max_new_tokens: longest translation, in tokens.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 256, device: str = "cpu"):
        try:
            import torch
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        except ImportError as exc:  # heavy and optional
            raise ImportError(
                "local back-translation needs torch and transformers: pip install torch transformers"
            ) from exc
        self._torch = torch
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a model directory (no config.json); "
                                    "set augment.back_translation.local_*_model_dir to a saved translation model")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModelForSeq2SeqLM.from_pretrained(str(self.model_dir)).to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def translate_batch(self, texts: list[str]) -> list[str]:
        """Translations of ``texts``, in order (``""`` where the model produced nothing)."""
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True)
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        with self._torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def translate(self, text: str) -> str:
        return self.translate_batch([text])[0]


def build_back_translator(settings: "BackTranslationConfig", cache_dir: str | Path, *,
                          sleep: Callable[[float], None] = time.sleep) -> tuple[BackTranslator, TranslationCache]:
    """The back-translator described by config, with its cache in ``cache_dir``.

    Returns:
        ``(back_translator, cache)``; close the cache when done.
    """
    cache = TranslationCache.in_dir(cache_dir)
    src, pivot = settings.source_lang, settings.pivot_lang
    if settings.service == "local":
        legs = []
        for model_dir, a, b in ((settings.local_forward_model_dir, src, pivot),
                                (settings.local_backward_model_dir, pivot, src)):
            model = LocalModelTranslator(model_dir, max_new_tokens=settings.local_max_new_tokens)
            legs.append(CachedTranslator(f"local:{Path(model_dir).resolve()}", a, b, model.translate, cache,
                                         translate_batch=model.translate_batch, batch_size=settings.local_batch_size))
        return BackTranslator(*legs, give_up_after_failures=settings.give_up_after_failures), cache
    retry = RetryPolicy(settings.retries, settings.backoff_base_s, settings.backoff_max_s, settings.backoff_jitter)
    limiter = RateLimiter(settings.requests_per_second, sleep=sleep)  # shared: both legs hit one service
    legs = [
        CachedTranslator(service_id(settings), a, b, make_deep_translator(settings, a, b).translate, cache,
                         retry=retry, limiter=limiter, timeout_s=settings.request_timeout_s, sleep=sleep)
        for a, b in ((src, pivot), (pivot, src))
    ]
    return BackTranslator(*legs, give_up_after_failures=settings.give_up_after_failures), cache
