"""What every stage task shares: the content cache policy and the output directory protocol.

A stage's Prefect cache record is stored *inside* its output directory
(``artifacts/<stage>/<key>/prefect-result.json``, the cache key doubling as the
storage path). Deleting the directory therefore deletes the record too, and
the next run recomputes the stage instead of returning a manifest that points
at files that are gone.

A record is only trusted while the directory is intact. Each manifest records
the size of every output file and the SHA-256 of those up to 64 MiB (of all with
``FTFLOW_VERIFY=full``); before Prefect looks a key up, :class:`ContentCache`
checks the directory against that record (:func:`ftflow.artifacts.check_outputs`)
and, when it does not match, moves it aside to ``.<key>.corrupt-<UTC time>/``
(never deleted) with a warning saying which file failed and why, so Prefect
finds no record and the stage is computed again.

Paths inside the artifacts directory are stored relative to it, in the manifest
and in Prefect's record (:class:`ManifestSerializer`), and resolved against the
artifacts directory of the run that reads them: a finished directory can be
copied or moved, or mounted at another path, and every stage in it is still
Cached there, its results pointing into it (never into the original).

Temporary directories of runs that died (``.<key>.<uuid>.partial``, and the
``.old`` copy a replace leaves) are removed whenever the stage runs, Cached or
not, unless a live run holds that key's lock. A stage that fails is not recorded in the artifacts:
Prefect would persist its exception as a file named by a random id in the
artifacts root, which nothing reads (the failed state's message and the run's
log carry the error and its traceback).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.serializers import Serializer

from ftflow.artifacts import (MANIFEST, OUTPUTS, RELATIVE_PATHS, TRANSIENT, VERIFY_ENV, VERIFY_MODES,  # noqa: F401
                              DiskFull, atomic_directory, check_outputs, disk_full, disk_full_cause, hash_all_from_env,
                              looks_full, move_aside, record_outputs, relative_paths, resolved_paths, tree_bytes,
                              write_json)
from ftflow.device import freeze_long_lived_objects
from ftflow.stages.caching import (KEY_LENGTH, NOT_IN_KEY, PREFECT_RECORD, key_and_parts, key_inputs,  # noqa: F401
                                   stage_key)
from tasks._locks import LeasedFileLockManager, lease_seconds_from_env

RECORD = PREFECT_RECORD
LOCKS_DIR = ".locks"  # under artifacts_dir; one lock per cache key while a run computes it
# What a dead run leaves in a stage directory: atomic_directory's temporary and replaced copies.
_TEMPORARY = re.compile(rf"^\.([0-9a-f]{{{KEY_LENGTH}}})\.[0-9a-f]{{32}}\.(partial|old)$")


def artifacts_root(artifacts_dir: str | Path) -> Path:
    """The artifacts directory as every stage names it (absolute, symlinks resolved)."""
    return Path(artifacts_dir).resolve()


class ManifestSerializer(Serializer):
    """A stage's manifest in Prefect's cache record: JSON, its paths relative to the artifacts directory.

    Prefect reads a record back inside the task run that looks its key up: the paths are
    resolved against that run's ``artifacts_dir``, wherever the record was written.
    """

    type: str = "ftflow-manifest"

    def dumps(self, obj: Any) -> bytes:
        # The manifest's own ``dir`` (``<artifacts_dir>/<stage>/<key>``) says which directory it was written in.
        root = Path(obj["dir"]).parent.parent if isinstance(obj, dict) and "dir" in obj else None
        on_disk = relative_paths(obj, root) if root is not None else obj
        return json.dumps(on_disk, sort_keys=True, default=str).encode()

    def loads(self, blob: bytes) -> Any:
        manifest = json.loads(blob)
        if not isinstance(manifest, dict) or RELATIVE_PATHS not in manifest:
            return manifest
        context = TaskRunContext.get()
        if context is None or "artifacts_dir" not in context.parameters:
            raise RuntimeError("a stage's cache record was read outside the task run of that stage: its paths are "
                               "relative to an artifacts directory that is not known here")
        return resolved_paths(manifest, artifacts_root(context.parameters["artifacts_dir"]))


# Options shared by every stage task: results are the JSON manifests.
STAGE_TASK_OPTIONS = dict(persist_result=True, result_serializer=ManifestSerializer())


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run, a plain logger outside one (unit use)."""
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("ftflow.tasks")


def lock_key(stage: str, key: str) -> str:
    """The cache key Prefect looks the stage's record up by, and locks (a path under ``artifacts_dir``)."""
    return f"{stage}/{key}/{RECORD}"


def verified_outputs(final: Path, stage: str, key: str) -> Optional[dict]:
    """The manifest of ``final`` if it is intact; if it is damaged, move it aside (with a warning) and return None.

    The caller must hold the key's lock (or run alone): a directory is moved only while no run can be writing it.
    """
    if not final.exists():
        return None
    manifest, problem = check_outputs(final, {"stage": stage, "key": key}, hash_all=hash_all_from_env())
    if problem is None:
        return manifest
    kept = move_aside(final)
    run_logger().warning("%s: the outputs for key %s failed verification: %s; they were moved to %s (kept, "
                         "delete them once inspected) and the stage is computed again", stage, key, problem, kept)
    return None


@dataclass
class ContentCache(CachePolicy):
    """Cache key = ftflow's content key of the stage; the record lives in the stage's directory.

    ``modules`` names where the stage's code starts (the task module, ``(__name__,)``): the key
    covers every project module reached from it (:func:`ftflow.stages.caching.reached_modules`).
    Before the key is looked up, the stage's outputs for it are verified (see the module docstring).
    """

    stage: str = ""
    modules: tuple[str, ...] = field(default_factory=tuple)

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        key = stage_key(self.stage, key_inputs(inputs), self.modules, inputs.get("artifacts_dir"))
        if "artifacts_dir" in inputs:
            self._verify(artifacts_root(inputs["artifacts_dir"]) / self.stage / key, key)
        return lock_key(self.stage, key)

    def _verify(self, final: Path, key: str) -> None:
        """Remove dead runs' temporaries; move damaged outputs aside so that Prefect, finding no record, recomputes."""
        hash_all = hash_all_from_env()  # a bad FTFLOW_VERIFY value fails here, named
        try:
            _log_removed(self.stage, remove_dead_temporaries(final.parent, self.stage, self.lock_manager))
            if not final.exists():
                return
            if check_outputs(final, {"stage": self.stage, "key": key}, hash_all=hash_all)[1] is None:
                _drop_old_record(final, self.stage)
                return
            # Damaged, or still being written by a concurrent run: look again under the key's lock, which
            # a writer holds until its record is committed, before moving anything.
            holder = f"ftflow-verify-{uuid.uuid4().hex}"
            locks = self.lock_manager
            if locks is not None:
                locks.acquire_lock(lock_key(self.stage, key), holder)
            try:
                verified_outputs(final, self.stage, key)
            finally:
                if locks is not None:
                    locks.release_lock(lock_key(self.stage, key), holder)
        except Exception as exc:  # a check that cannot run must not turn caching off for the run
            run_logger().warning("%s: could not verify the outputs in %s (%r); trusting the cache record",
                                 self.stage, final, exc)


def _drop_old_record(final: Path, stage: str) -> None:
    """Remove a Prefect record an older ftflow wrote (absolute paths, plain JSON): the run reuses the outputs,
    which verify, and records them again with their paths relative."""
    record = final / RECORD
    try:
        serializer = json.loads(record.read_bytes())["metadata"]["serializer"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # none, or not readable: Prefect decides
    if serializer != ManifestSerializer().type:
        record.unlink()
        run_logger().info("%s: the cache record in %s was written by an older ftflow (absolute paths); its outputs "
                          "are reused and recorded again", stage, final)


def with_storage(task, artifacts_dir: str | Path):
    """The task with its Prefect results stored under ``artifacts_dir`` (beside the outputs).

    A content-cached stage also runs SERIALIZABLE, locked in ``artifacts_dir/.locks``: of two runs
    that reach one key at once, the second waits and reads the first one's record (see tasks/_locks.py).
    """
    root = artifacts_root(artifacts_dir)
    options: dict[str, Any] = dict(result_storage=root)
    if isinstance(task.cache_policy, ContentCache):
        locks = LeasedFileLockManager(root / LOCKS_DIR, lease_seconds=lease_seconds_from_env())
        options["cache_policy"] = task.cache_policy.configure(isolation_level="SERIALIZABLE", lock_manager=locks)
    return task.with_options(**options)


def remove_dead_temporaries(stage_dir: Path, stage: str, locks: Optional[LeasedFileLockManager],
                            held_key: Optional[str] = None) -> list[Path]:
    """Remove the temporary directories that runs which died left in ``stage_dir``; return them.

    Only a run holding a key's lock writes ``.<key>.<uuid>.partial`` (and the ``.old`` copy a
    replace makes), so one is dead when no live run holds its key's lock, or when its key is
    ``held_key``, the key whose lock the caller holds. Without a lock manager a live run's
    directory cannot be told from a dead one's: nothing is removed.
    """
    if locks is None or not stage_dir.is_dir():
        return []
    removed = []
    for path in sorted(stage_dir.iterdir()):
        match = _TEMPORARY.match(path.name)
        if match is None or (match.group(1) != held_key and locks.is_locked(lock_key(stage, match.group(1)))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _log_removed(stage: str, removed: list[Path]) -> None:
    for path in removed:
        run_logger().info("%s: removed %s, left by a run that stopped before it finished", stage, path)


_COMPUTING: dict[str, str] = {}  # task run id -> its name, for the stages this process is computing now


def computing() -> list[str]:
    """The names of the task runs this process is computing now (what an interruption stops)."""
    return list(_COMPUTING.values())


def run_stage(stage: str, modules: tuple[str, ...], build: Callable[..., dict], *, work: bool = False) -> dict:
    """Compute a stage into ``artifacts/<stage>/<key>/`` and return its manifest.

    The key is computed from the running task's parameters exactly as the
    cache policy computes it. ``build`` receives a temporary directory, writes
    its outputs there and returns the manifest body (paths relative to the
    directory; paths inside the artifacts directory are written relative to it and
    the manifest returned holds them absolute). If a finished directory for the key already exists (a run that
    crashed after finishing the stage, or a concurrent run), it is reused when
    it verifies, and moved aside when it does not. The manifest records every
    output file's size and hash (:func:`ftflow.artifacts.record_outputs`).

    With ``work=True``, ``build(out, work_dir)`` also gets a work directory,
    ``artifacts/<stage>/.<key>.work/``, that survives a crash (training
    checkpoints go there, so a rerun resumes) and is removed once the stage
    has finished.
    """
    context = TaskRunContext.get()
    try:
        return _run_stage(context, stage, modules, build, work)
    except Exception:
        # Prefect persists a failed run's exception (a uuid-named file in the result storage, the
        # artifacts root) when the task persists results, which stages do for their cache records.
        # Nothing reads it back (the failed state's message and the run's log carry the error and its
        # traceback), so this run's failure is not persisted; a successful record is unaffected, as the
        # transaction decided whether to write it when it began.
        context.persist_result = False
        raise


def _run_stage(context: TaskRunContext, stage: str, modules: tuple[str, ...], build: Callable[..., dict],
               work: bool) -> dict:
    parameters = context.parameters
    # The parts are recorded so that `ftflow status` can say which one changed when the key does.
    key, parts = key_and_parts(stage, key_inputs(parameters), modules, parameters["artifacts_dir"])
    root = artifacts_root(parameters["artifacts_dir"])
    final = root / stage / key
    logger = run_logger()
    policy = context.task.cache_policy
    serializable = isinstance(policy, ContentCache) and str(getattr(policy.isolation_level, "value",
                                                                     policy.isolation_level)) == "SERIALIZABLE"
    locks = policy.lock_manager if serializable else None  # the lock this run holds on its key, if any
    _log_removed(stage, remove_dead_temporaries(final.parent, stage, locks, held_key=key))
    finished = verified_outputs(final, stage, key)
    if finished is not None:
        logger.info("%s: outputs for key %s already on disk, reusing %s", stage, key, final)
        return finished
    freeze_long_lived_objects()  # before this process's first model: each free_memory then walks only what came after
    started = time.perf_counter()
    work_dir = final.parent / f".{key}.work"
    run_id = str(context.task_run.id) if context.task_run is not None else key
    _COMPUTING[run_id] = context.task_run.name if context.task_run is not None else stage
    try:
        with atomic_directory(final) as tmp:
            try:
                manifest = build(tmp, work_dir) if work else build(tmp)
                manifest.update(
                    stage=stage,
                    key=key,
                    fingerprint=key,
                    dir=str(final),
                    seconds=round(time.perf_counter() - started, 3),
                    key_parts=parts,
                )
                # Written last, after every other file: what a cache hit checks the directory against.
                manifest[OUTPUTS] = record_outputs(tmp, hash_all=hash_all_from_env(),
                                                   transient=manifest.get(TRANSIENT, ()))
                write_json(tmp / MANIFEST, relative_paths(manifest, root))
            except Exception as exc:
                cause = disk_full_cause(exc) or (exc if looks_full(root) else None)
                if cause is None or isinstance(exc, DiskFull):
                    raise
                # Measured before atomic_directory removes the unfinished outputs.
                written = tree_bytes(tmp) + (tree_bytes(work_dir) if work else 0)
                raise disk_full(f"{stage}'s outputs", root, cause, written, checkpoints_kept=work) from exc
    finally:
        _COMPUTING.pop(run_id, None)
    if work:
        shutil.rmtree(work_dir, ignore_errors=True)
    logger.info("%s: done in %.1f s -> %s", stage, manifest["seconds"], final)
    return manifest


def stage_path(manifest: dict, name: str) -> Path:
    """Absolute path of a file a stage recorded under ``files``."""
    return Path(manifest["dir"]) / manifest["files"][name]
