"""Content-based cache keys for pipeline stages.

A stage's key is a hash of exactly what can change its output:

* the stage's own inputs: its slice of the config and the manifests of the
  stages it reads (each manifest counts by its ``fingerprint`` only, which is
  the key that produced it, so timings and paths inside don't matter);
* the content of every data file named in those inputs (not its name);
* the source of the ftflow modules that compute the stage (helpers included,
  which Prefect's ``TASK_SOURCE`` policy does not see);
* the versions of the libraries that change numbers.

Nothing here imports Prefect; ``tasks/`` plugs :func:`stage_key` into a
Prefect cache policy.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel

from ftflow.artifacts import sha256_file, sha256_json

NUMERIC_LIBRARIES = ("torch", "transformers", "peft", "tokenizers", "bitsandbytes", "nlpaug", "datasets")
KEY_LENGTH = 20


@lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose upgrades can change results."""
    versions = {}
    for name in NUMERIC_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def code_version(modules: Iterable[str]) -> str:
    """Hash of the source files of the named modules (e.g. ``ftflow.perplexity``)."""
    digest = hashlib.sha256()
    for name in sorted(set(modules)):
        source = importlib.import_module(name).__file__
        digest.update(name.encode())
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def _file_fingerprint(path: Path) -> dict:
    # Hashing a file is cheap next to any stage; cache it per (path, size, mtime).
    stat = path.stat()
    return {"sha256": _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


@lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def canonical(value: Any) -> Any:
    """A JSON-ready form of a stage input in which only content matters.

    Manifests (dicts with a ``fingerprint``) become their fingerprint; paths
    to existing files become their SHA-256; pydantic models become dicts.
    """
    if isinstance(value, BaseModel):
        return {k: canonical(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, dict):
        if "fingerprint" in value and "stage" in value:
            return {"manifest": value["stage"], "fingerprint": value["fingerprint"]}
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        return _file_fingerprint(value) if value.is_file() else str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot make a cache key from a {type(value).__name__}; pass plain values, configs or manifests")


def stage_key(stage: str, inputs: dict[str, Any], modules: Iterable[str]) -> str:
    """The content key of one stage run (hex, :data:`KEY_LENGTH` characters)."""
    material = {
        "stage": stage,
        "inputs": canonical(inputs),
        "code": code_version(modules),
        "libraries": library_versions(),
    }
    return sha256_json(material)[:KEY_LENGTH]
