"""Files on disk: content fingerprints, atomic output directories, JSON manifests.

A stage writes into a temporary sibling directory and renames it into place
only when everything is written, so a crash never leaves a directory that
looks finished. A finished directory holds ``manifest.json``, written last,
whose ``outputs`` record every other file's size (and SHA-256 where it is
cheap): :func:`check_outputs` tells a finished directory that has since been
damaged (a truncated manifest or weights file, a listed file gone) from an
intact one before it is trusted again.

A manifest on disk names every path inside the artifacts directory relative to
it (:func:`relative_paths`), so the directory can be copied, moved or mounted
elsewhere; whoever reads one resolves them against the artifacts directory it
uses (:func:`resolved_paths`), and works with absolute paths from then on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Collection, Iterator, Optional

from ftflow.errors import UserError

MANIFEST = "manifest.json"
OUTPUTS = "outputs"  # the manifest's record of its directory's files
# Files up to this size are hashed when written and on every check (a LoRA adapter, a tokenizer, a table);
# larger ones (a full checkpoint's weights) are checked by size unless a full check is asked for.
HASH_MAX_BYTES = 64 * 2**20


# What a write that finds its file system full raises: no space left, or the user's disk quota reached.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """Outputs could not be written: their file system is full; the message says where and what to do."""


def disk_full_cause(exc: BaseException) -> Optional[OSError]:
    """The :data:`DISK_FULL_ERRNOS` error in ``exc``'s chain of causes, or None."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def tree_bytes(directory: Path) -> int:
    """Bytes in the files under ``directory`` (0 if it is gone)."""
    total = 0
    for path in Path(directory).rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            pass
    return total


def free_bytes(directory: Path) -> Optional[int]:
    """Bytes an unprivileged write can still use on ``directory``'s file system, None if unknown."""
    try:
        stats = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


# Less free space than this when a write failed: the file system was full, whatever the error said (torch's
# own writer reports ENOSPC as a RuntimeError about its stream).
FULL_BELOW_BYTES = 2**20


def looks_full(directory: Path) -> bool:
    """Whether ``directory``'s file system has (almost) no space left for an unprivileged write."""
    free = free_bytes(directory)
    return free is not None and free < FULL_BELOW_BYTES


def disk_full(what: str, directory: Path, cause: BaseException, written_bytes: Optional[int] = None,
              checkpoints_kept: bool = False) -> DiskFull:
    """The one-line error for a write that found ``directory``'s file system full.

    Args:
        what: What was being written (``"train's outputs"``).
        directory: Where (the artifacts directory, or the stage's directory in it).
        cause: The error: an OSError (ENOSPC or EDQUOT), or one a library raised for it (named in the message).
        written_bytes: What had been written when it failed: the least it needs beyond what is free now.
        checkpoints_kept: A training run's checkpoints stay, so that a rerun resumes from them.
    """
    quota = isinstance(cause, OSError) and cause.errno == errno.EDQUOT
    full = "the disk quota is exceeded" if quota else "no space is left on the device"
    free = free_bytes(directory)
    reported = ("" if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS else
                f" (the write failed with {type(cause).__name__}: {' '.join(str(cause).split())[:200]})")
    needed = (f"; it had written {_mb(written_bytes)} when the write failed, so it needs at least that much more"
              if written_bytes else "")
    kept = " (a training run's checkpoints are kept to resume from)" if checkpoints_kept else ""
    return DiskFull(
        f"{full} of {directory} ({_mb(free) if free is not None else 'unknown'} free) while writing {what}"
        f"{reported}{needed}. Nothing finished was lost: the unfinished output was removed{kept} and every "
        "finished stage stays cached; free some space there (or set artifacts_dir to a larger disk, with "
        "--set artifacts_dir=DIR) and run again to resume")


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


# The manifest's list of JSON pointers (RFC 6901) to the paths it holds relative to the artifacts directory.
RELATIVE_PATHS = "relative_paths"


def _pointer_parts(pointer: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in pointer.split("/")[1:]]


def _pointer_of(parts: list[str]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _under(value: str, root: str) -> Optional[str]:
    """``value`` relative to ``root`` (posix) when it is an absolute path equal to or below it, else None."""
    if not os.path.isabs(value):
        return None
    path = os.path.normpath(value)
    if path == root:
        return "."
    if path.startswith(root.rstrip(os.sep) + os.sep):
        return PurePosixPath(*Path(os.path.relpath(path, root)).parts).as_posix()
    return None


def relative_paths(manifest: dict, root: Path) -> dict:
    """A copy of ``manifest`` as it is written to disk: every path inside ``root`` relative to it.

    Every string of the manifest (at any depth) that is an absolute path equal to or below
    ``root`` is replaced by its relative posix form, and its JSON pointer is listed under
    :data:`RELATIVE_PATHS`, so :func:`resolved_paths` can tell it from any other string.

    Args:
        manifest: A stage's manifest as a run holds it (absolute paths).
        root: The artifacts directory it was written under.
    """
    if RELATIVE_PATHS in manifest:  # already in its on-disk form
        return manifest
    root_text = os.path.normpath(str(root))
    pointers: list[str] = []

    def walk(value: Any, parts: list[str]) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, parts + [str(k)]) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, parts + [str(i)]) for i, v in enumerate(value)]
        if isinstance(value, (str, Path)) and (relative := _under(str(value), root_text)) is not None:
            pointers.append(_pointer_of(parts))
            return relative
        return value

    written = walk(manifest, [])
    written[RELATIVE_PATHS] = pointers
    return written


class UnresolvablePaths(ValueError):
    """A manifest's paths cannot be read under this artifacts directory (the message says why)."""


def resolved_paths(manifest: dict, root: Path) -> dict:
    """A copy of ``manifest`` as a run uses it: its relative paths made absolute under ``root``.

    A manifest written before paths were stored relative (no :data:`RELATIVE_PATHS`) holds
    absolute ones under the artifacts directory it was written in, which its own ``dir``
    (``<that directory>/<stage>/<key>``) names: they are read under ``root`` by the same suffix.

    Args:
        manifest: A manifest as read from disk.
        root: The artifacts directory the reading run uses (absolute).

    Raises:
        UnresolvablePaths: an old manifest whose ``dir`` does not end with its own ``<stage>/<key>``.
    """
    root = Path(root)
    if RELATIVE_PATHS not in manifest:
        return _resolved_old_paths(manifest, root)
    resolved = json.loads(json.dumps(manifest))
    for pointer in resolved.pop(RELATIVE_PATHS):
        *parents, leaf = _pointer_parts(pointer)
        node = resolved
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            key = int(leaf) if isinstance(node, list) else leaf
            node[key] = str(root) if node[key] == "." else str(root / node[key])
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise UnresolvablePaths(f"its {RELATIVE_PATHS} entry {pointer!r} names no path ({exc!r})") from None
    return resolved


def _resolved_old_paths(manifest: dict, root: Path) -> dict:
    written_in = manifest.get("dir")
    if not isinstance(written_in, str) or not os.path.isabs(written_in):
        return manifest
    suffix = f"{manifest.get('stage')}/{manifest.get('key')}"
    if not PurePosixPath(written_in).as_posix().endswith("/" + suffix):
        raise UnresolvablePaths(f"it was written by an older ftflow with absolute paths, for {written_in}, which is "
                                f"not a <stage>/<key> directory ({suffix}) of an artifacts directory")
    old_root = os.path.normpath(written_in[: -len(suffix) - 1])
    if old_root == os.path.normpath(str(root)):
        return manifest

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and (relative := _under(value, old_root)) is not None:
            return str(root) if relative == "." else str(root / relative)
        return value

    return walk(manifest)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(directory: Path, exclude: tuple[str, ...] = ()) -> str:
    """Hex SHA-256 over every file of a directory (relative names and contents), in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative.split("/")[0] in exclude:
            continue
        digest.update(relative.encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable value, independent of key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a finished output directory, or None if it is not finished.

    A manifest a stage wrote (``<artifacts_dir>/<stage>/<key>``, its paths relative) comes with its paths
    resolved under the artifacts directory it is in now (:func:`resolved_paths`).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(manifest, dict) and RELATIVE_PATHS in manifest:
        return resolved_paths(manifest, Path(directory).absolute().parent.parent)
    return manifest


TRANSIENT = "transient"
"""A manifest's list of top-level folders of its directory that the outputs record leaves out: a later step may
free them (successive halving's rung states, :func:`ftflow.train.rungs.free_state`), and their readers cope with
their absence, so the outputs stay verified without them."""


def record_outputs(directory: Path, *, hash_all: bool = False, hash_max_bytes: int = HASH_MAX_BYTES,
                   exclude: tuple[str, ...] = (MANIFEST,), transient: Collection[str] = ()) -> dict[str, dict]:
    """What a finished directory holds, for :func:`check_outputs` to compare against later.

    Args:
        directory: The stage's output directory.
        hash_all: Hash every file, whatever its size.
        hash_max_bytes: Files up to this size are hashed; larger ones are recorded by size only.
        exclude: Relative paths left out (the manifest, which holds the record).
        transient: Top-level folders left out (:data:`TRANSIENT`).

    Returns:
        ``{relative posix path: {"bytes": size, "sha256": hex (when hashed)}}``, sorted by path.
    """
    directory = Path(directory)
    outputs = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative in exclude or relative.split("/", 1)[0] in transient:
            continue
        size = path.stat().st_size
        entry: dict[str, Any] = {"bytes": size}
        if hash_all or size <= hash_max_bytes:
            entry["sha256"] = sha256_file(path)
        outputs[relative] = entry
    return outputs


VERIFY_ENV = "FTFLOW_VERIFY"
VERIFY_MODES = ("small", "full")  # small (default): hash files up to 64 MiB, sizes for the rest; full: hash all


def hash_all_from_env() -> bool:
    """Whether every output file is hashed, whatever its size (``FTFLOW_VERIFY=full``; default ``small``)."""
    mode = os.environ.get(VERIFY_ENV, "").strip().lower() or "small"
    if mode not in VERIFY_MODES:
        raise ValueError(f"{VERIFY_ENV}={mode!r} is not a verification mode; use one of {', '.join(VERIFY_MODES)} "
                         "(small: hash files up to 64 MiB and check the rest by size; full: hash every file)")
    return mode == "full"


def check_outputs(directory: Path, expected: Optional[dict] = None, *, hash_all: bool = False,
                  hash_max_bytes: int = HASH_MAX_BYTES) -> tuple[Optional[dict], Optional[str]]:
    """Whether a finished directory still holds what its manifest recorded.

    Checks, in this order: ``manifest.json`` parses and matches ``expected``; every file the
    manifest lists under ``files`` exists; every file of its ``outputs`` record has its size,
    and its SHA-256 where one was recorded and the file is at most ``hash_max_bytes`` (any size
    with ``hash_all``). Files the record does not name (Prefect's result record) are not checked.

    Args:
        directory: The stage's output directory (``artifacts/<stage>/<key>``).
        expected: Manifest entries that must match, e.g. ``{"stage": "train", "key": "..."}``.
        hash_all: Hash every recorded file, whatever its size.
        hash_max_bytes: Larger files are checked by size only (unless ``hash_all``).

    Returns:
        ``(manifest, None)`` when intact, with its paths resolved under the artifacts directory the
        directory is in (:func:`resolved_paths`), else ``(None, reason)`` naming the first file that is not.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, f"{path} is missing"
    except OSError as exc:
        return None, f"{path} cannot be read ({exc})"
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path} is not valid JSON ({len(raw)} bytes: {exc})"
    if not isinstance(manifest, dict):
        return None, f"{path} is not a JSON object"
    for name, value in (expected or {}).items():
        if manifest.get(name) != value:
            return None, f"{path} says {name}={manifest.get(name)!r}, expected {value!r}"
    outputs = manifest.get(OUTPUTS)
    if not isinstance(outputs, dict):
        return None, f"{path} has no record of its output files ({OUTPUTS!r}: written by an older ftflow?)"
    try:
        for name, relative in sorted((manifest.get("files") or {}).items()):
            if not (directory / relative).exists():
                return None, f"{directory / relative} (listed as {name!r}) is missing"
        for relative, entry in outputs.items():
            file = directory / relative
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                return None, f"{file} is missing"
            if size != entry["bytes"]:
                return None, f"{file} has {size} bytes, {entry['bytes']} were written"
            if "sha256" in entry and (hash_all or size <= hash_max_bytes) and sha256_file(file) != entry["sha256"]:
                return None, f"{file} has the right size but not the content that was written (SHA-256 differs)"
    except (AttributeError, KeyError, TypeError) as exc:  # a manifest that parses but is not one ftflow wrote
        return None, f"{path} has a malformed file record ({exc!r})"
    try:
        return resolved_paths(manifest, directory.resolve().parent.parent), None
    except UnresolvablePaths as exc:
        return None, f"{path} cannot be read here: {exc}"


def move_aside(directory: Path, label: str = "corrupt") -> Path:
    """Rename a directory to ``.<name>.<label>-<UTC time>`` beside it (kept for inspection, never deleted)."""
    directory = Path(directory)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = directory.with_name(f".{directory.name}.{label}-{stamp}")
    if target.exists():
        target = directory.with_name(f".{directory.name}.{label}-{stamp}-{uuid.uuid4().hex[:8]}")
    os.replace(directory, target)
    return target


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block succeeds.

    On an exception the temporary directory is removed and ``final`` is left
    as it was. If ``final`` already exists (an unfinished leftover, or a
    finished copy made by a concurrent run) it is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.partial"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            trash = final.parent / f".{final.name}.{uuid.uuid4().hex}.old"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
