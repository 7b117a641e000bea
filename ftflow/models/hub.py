"""Hub models, checked before anything runs: the id exists, the token is valid, a gated model's license is accepted.

A study of hub models otherwise finds out at each model's benchmark, hours in, that an id has a typo or that
``HF_TOKEN`` is missing, and meanwhile plans around the missing model (its tokenizer unreadable, it was planned
at ``max_length`` tokens and its small batch became every later scoring pass's). :func:`check_models` asks the
hub once per id, before anything runs, and says per model what is wrong and how to fix it:

* online: ``HfApi.model_info`` (does the id exist; is the repository gated; its files and their sizes) and, for a
  gated one, ``HfApi.auth_check`` (is there a token; has its account accepted the license); a token the hub
  rejects is said once for every model;
* offline (``HF_HUB_OFFLINE``, or the first request that gets no answer: the rest are not asked): the model must
  be in the Hugging Face cache (its ``config.json``, its weights and a tokenizer), else it fails at once, naming
  the cache folder looked in, instead of spending minutes in the hub client's retries.

Only hub ids are checked: local directories (and the zoo's checkpoints) need no hub. Never logs or stores the
token. Downloads go where ``huggingface_hub`` puts them: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub`` (:func:`hub_cache_dir`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

from ftflow.errors import UserError
from ftflow.models.known import KNOWN_MODELS, known_architecture

HUB_TIMEOUT_S = 10.0
"""Seconds one request to the hub may take before the hub counts as unreachable (huggingface_hub's own
default for metadata requests)."""

Kind = Literal["ok", "cached", "not-cached", "not-found", "gated-no-token", "gated-not-accepted", "token-invalid"]
USABLE_KINDS = ("ok", "cached")
ACCESS_KINDS = ("not-found", "gated-no-token", "gated-not-accepted", "token-invalid")
"""What the hub itself answered: a model that fails on one of these cannot be used from this machine, online or not."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json", "config.json")
"""The small files a load reads besides the weights (whichever of them the repository has)."""


@dataclass(frozen=True)
class HubCheck:
    """What the hub (or, offline, the cache) says about one model id.

    Attributes:
        model_id: the hub id as the config gives it.
        kind: ``ok`` (the hub serves it to this token), ``cached`` (offline, complete in the cache),
            ``not-cached`` (offline, and not complete in the cache), or why the hub refuses it
            (:data:`ACCESS_KINDS`).
        message: one line for the user: what is wrong and the fix ("" when usable).
        files: online: ``(name, bytes)`` of every file a load downloads (root-level weights and tokenizer files).
        cached_files: names of those files already in the cache (online), or of what the cache holds (offline).
    """

    model_id: str
    kind: Kind
    message: str = ""
    files: tuple[tuple[str, int], ...] = ()
    cached_files: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Whether a run on this machine can load the model."""
        return self.kind in USABLE_KINDS

    @property
    def refused(self) -> bool:
        """Whether the hub itself refuses it (wrong id, gated, bad token), so no machine can load it with this token."""
        return self.kind in ACCESS_KINDS

    def download_bytes(self) -> Optional[int]:
        """Bytes a load still downloads into the cache: the listed files not cached yet (None when not listed)."""
        if not self.files:
            return 0 if self.kind == "cached" else None
        return sum(size for name, size in self.files if name not in self.cached_files)


@dataclass(frozen=True)
class HubReport:
    """Every hub id's check, and whether the hub answered.

    Attributes:
        checks: by model id, in the order asked.
        offline_reason: None when the hub answered; else why the cache stood in for it (``HF_HUB_OFFLINE`` is set,
            or the first request got no answer and the error).
    """

    checks: dict[str, HubCheck] = field(default_factory=dict)
    offline_reason: Optional[str] = None

    @property
    def problems(self) -> dict[str, str]:
        """``{model id: message}`` of every model a run cannot use."""
        return {model_id: check.message for model_id, check in self.checks.items() if not check.usable}


def is_hub_id(path: str) -> bool:
    """Whether a ``models[].path`` names a hub model: not a local path, and a well-formed ``org/name``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(path).expanduser().exists() or path.startswith(("/", "./", "../", "~")) or path.count("/") != 1:
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    """Whether the Hugging Face libraries are in offline mode (``HF_HUB_OFFLINE``, read when they are imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_OFFLINE_BECAUSE: Optional[str] = None
"""Why :func:`go_offline` put this process offline (None: it did not)."""


def go_offline(reason: str) -> None:
    """Put this process's hub clients in offline mode, as ``HF_HUB_OFFLINE=1`` at start would have.

    After a request to the hub got no answer: every later load then reads the cache at once, where
    ``from_pretrained`` would otherwise retry each file for about 20 s before falling back to it. Child processes
    (Dask workers started later) inherit the variable; ``reason`` is what later checks say instead of
    "HF_HUB_OFFLINE is set".
    """
    global _OFFLINE_BECAUSE
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    _OFFLINE_BECAUSE = reason


def hub_endpoint() -> str:
    """The hub's address (``HF_ENDPOINT``, default https://huggingface.co)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """Where hub downloads go: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def model_cache_folder(model_id: str) -> Path:
    """The cache folder of one model (``models--org--name`` under :func:`hub_cache_dir`)."""
    return hub_cache_dir() / ("models--" + model_id.replace("/", "--"))


def _cached(model_id: str, filename: str) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, filename, cache_dir=hub_cache_dir())
    return found if isinstance(found, str) else None


def _weights_in_cache(model_id: str) -> tuple[list[str], Optional[str]]:
    """``(weight files cached, what is missing or None)``: the safetensors (or ``.bin``) a load reads, by its index."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = _cached(model_id, index)
        if index_path is not None:
            try:
                shards = sorted(set(json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError):
                return [index], f"{index} unreadable"
            missing = [s for s in shards if _cached(model_id, s) is None]
            present = [index] + [s for s in shards if s not in missing]
            return present, (f"{len(missing)} of {len(shards)} weight shards missing ({missing[0]}...)"
                             if missing else None)
        if _cached(model_id, single) is not None:
            return [single], None
    return [], "no weights (model.safetensors or pytorch_model.bin)"


def cache_problem(model_id: str) -> tuple[Optional[str], tuple[str, ...]]:
    """``(what the cache lacks for a load, or None; the files it has)``: config.json, the weights, a tokenizer."""
    have = [name for name in TOKENIZER_FILES if _cached(model_id, name) is not None]
    weights, missing_weights = _weights_in_cache(model_id)
    have += weights
    if "config.json" not in have:
        return "no config.json", tuple(have)
    if missing_weights:
        return missing_weights, tuple(have)
    if not {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} & set(have):
        return "no tokenizer files", tuple(have)
    return None, tuple(have)


def suggestions(model_id: str, others: Sequence[str] = ()) -> list[str]:
    """Known ids (ftflow's table, ``others``) close to a mistyped one: the closest, and any as close."""
    candidates = {c.lower(): c for c in [*KNOWN_MODELS, *others] if c.lower() != model_id.lower()}
    ratios = {c: difflib.SequenceMatcher(None, model_id.lower(), c).ratio() for c in candidates}
    best = max(ratios.values(), default=0.0)
    return [candidates[c] for c, r in sorted(ratios.items(), key=lambda cr: -cr[1]) if r >= max(0.85, best - 0.01)]


def _did_you_mean(model_id: str, others: Sequence[str]) -> str:
    close = suggestions(model_id, others)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _token_source() -> str:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN"
    return "the token saved by `hf auth login`"


def _load_files(siblings) -> tuple[tuple[str, int], ...]:
    """The files ``from_pretrained`` downloads from a repository's listing: root-level weights and small files.

    Safetensors are preferred to ``.bin`` (transformers takes them when both exist); Mistral-style
    ``consolidated*.safetensors`` and subfolders (``original/``) are not read.
    """
    root = {s.rfilename: int(s.size or 0) for s in siblings or () if "/" not in s.rfilename}
    safetensors = [n for n in root if n.endswith(".safetensors") and not n.startswith("consolidated")]
    if "model.safetensors" in safetensors:
        weights = ["model.safetensors"]
    elif safetensors:
        weights = safetensors + [n for n in root if n == "model.safetensors.index.json"]
    else:
        weights = [n for n in root if n.startswith("pytorch_model") and (n.endswith(".bin") or n.endswith(".json"))]
    return tuple((name, root[name]) for name in sorted(set(weights) | (set(TOKENIZER_FILES) & set(root))))


_MEMO: dict[tuple, "HubReport"] = {}
"""This process's answers, so that ``ftflow run``'s check before Prefect starts, ``ftflow status`` and the flow's
own check ask the hub once. Keyed by everything an answer depends on (endpoint, offline mode, cache, token, ids)."""


def _memo_key(model_ids: Sequence[str], token: Optional[str]) -> tuple:
    fingerprint = hashlib.sha256(token.encode()).hexdigest() if token else None
    return (hub_endpoint(), hub_offline(), str(hub_cache_dir()), fingerprint, tuple(model_ids))


def _offline_check(model_id: str, reason: str, env_offline: bool, others: Sequence[str]) -> HubCheck:
    missing, have = cache_problem(model_id)
    if missing is None:
        return HubCheck(model_id, "cached", cached_files=have)
    fix = ("download it once with network access (`hf download " + model_id + "`), or point HF_HUB_CACHE (or "
           "HF_HOME) at a cache that holds it" + (", or unset HF_HUB_OFFLINE if this machine can reach the hub"
                                                  if env_offline else ""))
    return HubCheck(model_id, "not-cached", cached_files=have, message=(
        f"{model_id} is not in the Hugging Face cache ({model_cache_folder(model_id)}: {missing}) and {reason}: "
        f"{fix}{_did_you_mean(model_id, others)}"))


def check_models(model_ids: Sequence[str], *, others: Sequence[str] = (), api=None) -> HubReport:
    """Check every hub id before anything runs (see the module's docstring); one answer per id.

    Args:
        model_ids: hub ids (local directories are not hub ids: leave them out, see :func:`is_hub_id`).
        others: further ids to suggest from when one does not exist (the config's other models).
        api: a ``huggingface_hub.HfApi`` (default: one for :func:`hub_endpoint`).

    Returns:
        The :class:`HubReport`. Never raises for what the hub answers; an unexpected answer (a server error, a
        timeout) makes the cache stand in for the hub, for that id and every later one.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    token = get_token()
    endpoint = hub_endpoint()
    model_ids = list(dict.fromkeys(model_ids))
    key = _memo_key(model_ids, token)
    if key in _MEMO:
        return _MEMO[key]
    api = api or HfApi(endpoint=endpoint)
    checks: dict[str, HubCheck] = {}
    env_offline = hub_offline() and _OFFLINE_BECAUSE is None
    offline_reason = ("HF_HUB_OFFLINE is set" if env_offline else _OFFLINE_BECAUSE) if hub_offline() else None
    token_problem = None
    for model_id in model_ids:
        if offline_reason is not None:
            check = _offline_check(model_id, offline_reason, env_offline, others)
        elif token_problem is not None:
            check = HubCheck(model_id, "token-invalid", message=f"{model_id}: {token_problem}")
        else:
            try:
                info = api.model_info(model_id, files_metadata=True, timeout=HUB_TIMEOUT_S)
                if info.gated:
                    api.auth_check(model_id)
                files = _load_files(info.siblings)
                check = HubCheck(model_id, "ok", files=files,
                                 cached_files=tuple(n for n, _ in files if _cached(model_id, n) is not None))
            except GatedRepoError:
                page = f"{endpoint}/{model_id}"
                if token is None:
                    check = HubCheck(model_id, "gated-no-token", message=(
                        f"{model_id} is gated and no Hugging Face token is set: accept its license at {page} with "
                        f"your account, then create a read token at {endpoint}/settings/tokens and put it in HF_TOKEN "
                        "(or run `hf auth login`)"))
                else:
                    check = HubCheck(model_id, "gated-not-accepted", message=(
                        f"{model_id} is gated and the account of {_token_source()} has no access to it yet (its "
                        f"license not accepted, or the request still awaits the authors' review): accept it at "
                        f"{page}, then run again"))
            except RepositoryNotFoundError:
                hidden = (" (or it is private and the account of " + _token_source() + " cannot see it)" if token
                          else " (or it is private: put a token that can see it in HF_TOKEN)")
                check = HubCheck(model_id, "not-found", message=(
                    f"{model_id} does not exist on the hub ({endpoint}/{model_id}){hidden}: fix its models[].path "
                    f"in the config{_did_you_mean(model_id, others)}"))
            except HfHubHTTPError as exc:
                status = getattr(exc.response, "status_code", None)
                if status == 401 and token is not None:
                    token_problem = (f"the hub rejects {_token_source()} as invalid: create a read token at "
                                     f"{endpoint}/settings/tokens and put it in HF_TOKEN (or unset it: public models "
                                     "need none)")
                    check = HubCheck(model_id, "token-invalid", message=f"{model_id}: {token_problem}")
                else:
                    offline_reason = f"the hub at {endpoint} answered HTTP {status} ({str(exc).splitlines()[0]})"
                    check = _offline_check(model_id, offline_reason, False, others)
            except Exception as exc:  # no answer (DNS, refused, timeout): the cache stands in, for every later id too
                offline_reason = f"the hub at {endpoint} cannot be reached ({type(exc).__name__}: {exc})"
                check = _offline_check(model_id, offline_reason, False, others)
        checks[model_id] = check
    report = HubReport(checks, offline_reason)
    _MEMO[key] = report
    return report


def fetch_configs(report: HubReport, destination: Path) -> dict[str, str]:
    """Read from the hub the ``config.json`` of every usable online model ftflow cannot plan offline.

    A model in :data:`ftflow.models.known.KNOWN_MODELS` or with its config in the cache needs none. Each is
    written to ``destination/<org>/<name>/config.json`` (``destination``: :func:`ftflow.models.architecture.fetched_configs_dir`,
    where :func:`ftflow.models.architecture.model_config_for` reads it).

    Returns:
        ``{model id: problem}`` for each config that could not be read (the plan then says it cannot plan it).
    """
    from huggingface_hub import hf_hub_download

    problems = {}
    for model_id, check in report.checks.items():
        target = Path(destination) / model_id
        if (check.kind != "ok" or known_architecture(model_id) is not None or _cached(model_id, "config.json")
                or (target / "config.json").is_file()):
            continue
        try:
            target.mkdir(parents=True, exist_ok=True)
            hf_hub_download(model_id, "config.json", local_dir=target, endpoint=hub_endpoint(),
                            etag_timeout=HUB_TIMEOUT_S)
        except Exception as exc:  # the plan names the model it cannot plan; this says why
            problems[model_id] = f"its config.json could not be read from the hub: {type(exc).__name__}: {exc}"
    return problems


def check_candidates(candidates: Sequence) -> tuple[HubReport, dict[str, str]]:
    """:func:`check_models` for the hub ids among a config's candidates (objects with ``name`` and ``path``).

    When the hub did not answer, this process goes offline (:func:`go_offline`) so that no later load retries it.

    Returns:
        ``(report, {candidate name: why it cannot be used})``.
    """
    ids = [c.path for c in candidates if is_hub_id(c.path)]
    report = check_models(ids, others=ids)
    if report.offline_reason is not None and not hub_offline():
        go_offline(report.offline_reason)
    problems = report.problems
    return report, {c.name: problems[c.path] for c in candidates if c.path in problems}


class NoUsableModelError(UserError):
    """The hub check leaves out every candidate model of a config: nothing can run."""


def require_a_usable_candidate(candidates: Sequence, problems: Mapping[str, str]) -> None:
    """Refuse a run whose every candidate the hub check left out, naming each and why.

    Args:
        candidates: the config's models (a zoo config has none: nothing to refuse).
        problems: ``{candidate name: why it cannot be used}``, as :func:`check_candidates` returns it.

    Raises:
        NoUsableModelError: ``problems`` names every candidate.
    """
    if candidates and len(problems) == len(candidates):
        lines = [f"{name}: {problem}" for name, problem in problems.items()]
        raise NoUsableModelError("no candidate model can be used, nothing was run: " + (
            lines[0] if len(lines) == 1 else "\n" + "\n".join(f"  - {line}" for line in lines)))


def check_notes(report: HubReport, problems: Mapping[str, str]) -> list[str]:
    """What a command says of :func:`check_candidates`' result, one line each: where hub models are read from when
    the hub was not asked, then each candidate left out and why."""
    lines = []
    if report.offline_reason and report.checks:
        lines.append(f"{report.offline_reason}: hub models are read from the Hugging Face cache ({hub_cache_dir()})")
    return lines + [f"{name} is left out: {problem}" for name, problem in problems.items()]


def refused_by_the_hub(candidates: Sequence) -> dict[str, str]:
    """``{candidate name: why}`` of the config's hub ids the hub itself refuses (wrong id, gated, bad token).

    Online only: offline nothing is asked (a config's paths are checked for their form elsewhere) and nothing is
    refused, so ``ftflow validate`` passes a config whose models are only missing from this machine's cache.
    """
    ids = [] if hub_offline() else [c.path for c in candidates if is_hub_id(c.path)]
    checks = check_models(ids, others=ids).checks if ids else {}
    return {c.name: checks[c.path].message for c in candidates if c.path in checks and checks[c.path].refused}
