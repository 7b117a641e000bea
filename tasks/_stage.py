"""What every stage task shares: the content cache policy and the output directory protocol.

A stage's Prefect cache record is stored *inside* its output directory
(``artifacts/<stage>/<key>/prefect-result.json``, the cache key doubling as the
storage path). Deleting the directory therefore deletes the record too, and
the next run recomputes the stage instead of returning a manifest that points
at files that are gone.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from ftflow.artifacts import MANIFEST, atomic_directory, read_manifest, write_json
from ftflow.caching import stage_key
from tasks._locks import LeasedFileLockManager, lease_seconds_from_env

RECORD = "prefect-result.json"
LOCKS_DIR = ".locks"  # under artifacts_dir; one lock per cache key while a run computes it
# Parameters that say where or how to run, not what to compute.
NOT_IN_KEY = frozenset({"artifacts_dir", "progress", "checkpoint_steps"})

# Options shared by every stage task: results are the JSON manifests.
STAGE_TASK_OPTIONS = dict(persist_result=True, result_serializer="json")


def key_inputs(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters that determine a stage's output."""
    return {k: v for k, v in parameters.items() if k not in NOT_IN_KEY}


@dataclass
class ContentCache(CachePolicy):
    """Cache key = ftflow's content key of the stage; the record lives in the stage's directory."""

    stage: str = ""
    modules: tuple[str, ...] = field(default_factory=tuple)

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        key = stage_key(self.stage, key_inputs(inputs), self.modules)
        return f"{self.stage}/{key}/{RECORD}"


def with_storage(task, artifacts_dir: str | Path):
    """The task with its Prefect results stored under ``artifacts_dir`` (beside the outputs).

    A content-cached stage also runs SERIALIZABLE, locked in ``artifacts_dir/.locks``: of two runs
    that reach one key at once, the second waits and reads the first one's record (see tasks/_locks.py).
    """
    root = Path(artifacts_dir).resolve()
    options: dict[str, Any] = dict(result_storage=root)
    if isinstance(task.cache_policy, ContentCache):
        locks = LeasedFileLockManager(root / LOCKS_DIR, lease_seconds=lease_seconds_from_env())
        options["cache_policy"] = task.cache_policy.configure(isolation_level="SERIALIZABLE", lock_manager=locks)
    return task.with_options(**options)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run, a plain logger outside one (unit use)."""
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("ftflow.tasks")


def run_stage(stage: str, modules: tuple[str, ...], build: Callable[..., dict], *, work: bool = False) -> dict:
    """Compute a stage into ``artifacts/<stage>/<key>/`` and return its manifest.

    The key is computed from the running task's parameters exactly as the
    cache policy computes it. ``build`` receives a temporary directory, writes
    its outputs there and returns the manifest body (paths relative to the
    directory). If a finished directory for the key already exists (a run that
    crashed after finishing the stage, or a concurrent run), it is reused.

    With ``work=True``, ``build(out, work_dir)`` also gets a work directory,
    ``artifacts/<stage>/.<key>.work/``, that survives a crash (training
    checkpoints go there, so a rerun resumes) and is removed once the stage
    has finished.
    """
    context = TaskRunContext.get()
    parameters = context.parameters
    key = stage_key(stage, key_inputs(parameters), modules)
    final = Path(parameters["artifacts_dir"]).resolve() / stage / key
    logger = run_logger()
    finished = read_manifest(final)
    if finished is not None:
        logger.info("%s: outputs for key %s already on disk, reusing %s", stage, key, final)
        return finished
    started = time.perf_counter()
    work_dir = final.parent / f".{key}.work"
    with atomic_directory(final) as tmp:
        manifest = build(tmp, work_dir) if work else build(tmp)
        manifest.update(
            stage=stage,
            key=key,
            fingerprint=key,
            dir=str(final),
            seconds=round(time.perf_counter() - started, 3),
        )
        write_json(tmp / MANIFEST, manifest)
    if work:
        shutil.rmtree(work_dir, ignore_errors=True)
    logger.info("%s: done in %.1f s -> %s", stage, manifest["seconds"], final)
    return manifest


def stage_path(manifest: dict, name: str) -> Path:
    """Absolute path of a file a stage recorded under ``files``."""
    return Path(manifest["dir"]) / manifest["files"][name]
