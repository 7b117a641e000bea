"""Rungs of successive halving: where a run stops, and the work directory carried from one rung to the next.

A rung trains a job to a fraction of its own schedule and stops with a
checkpoint; the next rung resumes from it exactly as an interrupted run
resumes (docs/halving.md). The schedule is the full run's, so the last rung
ends where the same run in grid mode ends.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Mapping, Optional

log = logging.getLogger(__name__)

STATE_DIR = "state"  # in an intermediate rung's output directory: the run's work directory at the rung
FROM_STEP = "rung_from.json"  # in a rung's work directory: the step it started from (0: from the start)
RUNG_SCORE = "rung.json"  # in the Trainer's work directory: the selection score at the rung's step


def total_steps(epochs: int, train_sentences: int, batch_size: int) -> int:
    """Optimizer steps of a whole run: ``epochs x ceil(train_sentences / batch_size)``.

    The Trainer's count for one dataset row per sentence (every batching ftflow
    uses): ``ceil(ceil(n / micro) / accumulation)`` steps an epoch, which is
    ``ceil(n / batch_size)`` whatever the micro-batch.
    """
    if epochs < 1 or train_sentences < 1 or batch_size < 1:
        raise ValueError(f"total_steps: epochs, train_sentences and batch_size must be >= 1, got {epochs}, "
                         f"{train_sentences}, {batch_size}")
    return epochs * max(1, math.ceil(train_sentences / batch_size))


def rung_step(fraction: float, max_steps: int) -> int:
    """The optimizer step a rung at ``fraction`` of ``max_steps`` stops after: ``ceil(fraction x max_steps)``,
    at least 1 and at most ``max_steps`` (a float product such as 0.1 x 30 is taken at its exact value)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"rung_step: fraction must be in (0, 1], got {fraction}")
    exact = round(fraction * max_steps, 9)  # 0.1 * 30 = 3.0000000000000004 must stop at 3, not 4
    return min(max_steps, max(1, math.ceil(exact)))


def _link_or_copy(source: str, target: str) -> str:
    """A hard link where the file system allows it (a checkpoint is never written again), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _is_checkpoint_file(path: Path, root: Path) -> bool:
    return any(part.startswith("checkpoint-") for part in path.relative_to(root).parts[:-1])


def carry_state(source: Path, target: Path) -> None:
    """Copy a run's work directory ``source`` to ``target`` (which must not exist).

    Checkpoint files (``checkpoint-*/``: written once, then only deleted) are
    hard-linked; every other file is copied, since a run rewrites some in place
    (the best epoch's weights, ``save_pretrained`` truncating the file): a link
    would change the earlier rung's cached output.
    """
    source, target = Path(source), Path(target)
    if target.exists():
        raise FileExistsError(f"carry_state: {target} exists; a rung's state goes to a new directory")

    def copy(src: str, dst: str) -> str:
        if _is_checkpoint_file(Path(src), source):
            return _link_or_copy(src, dst)
        return shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=copy)


def keep_state(work_dir: Path, out_dir: Path) -> Path:
    """An intermediate rung's work directory into its output (``out_dir/state``), every file hard-linked where
    it can be: the work directory is removed when the stage finishes, so nothing else holds these files."""
    target = Path(out_dir) / STATE_DIR
    shutil.copytree(work_dir, target, copy_function=_link_or_copy)
    return target


def state_dir(manifest: Optional[Mapping]) -> Optional[Path]:
    """An intermediate rung's kept state (``state/`` in its output directory), or None: no rung, or its state was
    freed (:func:`free_state`) once its grid had finished."""
    if manifest is None or "state" not in manifest:
        return None
    path = Path(manifest["dir"]) / manifest["state"]
    return path if path.is_dir() else None


def free_state(manifest: Mapping) -> int:
    """Remove an intermediate rung's kept state; the bytes freed (0 when there was none).

    The state is a transient output (:data:`ftflow.artifacts.TRANSIENT`): the rung's cached manifest stays
    valid without it, and a later rung that needs it trains from the start instead (``tasks/train.py``). The
    folder is renamed first, so that a reader finds it whole or not at all.
    """
    path = state_dir(manifest)
    if path is None:
        return 0
    doomed = path.with_name(f".{STATE_DIR}.freeing-{uuid.uuid4().hex}")
    try:
        path.rename(doomed)
    except FileNotFoundError:  # freed at the same moment by another run
        return 0
    freed = sum(p.stat().st_size for p in doomed.rglob("*") if p.is_file() and p.stat().st_nlink == 1)
    shutil.rmtree(doomed, ignore_errors=True)
    return freed


def resume_state(previous: Optional[Path], work_dir: Path) -> bool:
    """Start a rung's work directory from the previous rung's ``state`` (True), unless the directory already
    holds this rung's own interrupted run (False: it resumes from that) or there is no previous state (False:
    the first rung, or a state freed, even while it was being copied: the run starts from step 0)."""
    if previous is None or Path(work_dir).exists():
        return False
    partial = Path(work_dir).with_name(Path(work_dir).name + ".carrying")
    shutil.rmtree(partial, ignore_errors=True)  # a copy a killed run left half made
    try:
        carry_state(previous, partial)
    except (FileNotFoundError, shutil.Error) as exc:  # freed by a concurrent run's grid end while copied
        log.warning("the previous rung's state %s went away while it was copied (%s): starting from step 0",
                    previous, exc)
        shutil.rmtree(partial, ignore_errors=True)
        return False
    partial.rename(work_dir)  # whole or not at all: a kill mid-copy leaves no work directory to resume from
    return True
