"""Stage 5: the best family on the selection split, its teacher and its student."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.config import SelectConfig
from ftflow.study.selection import select_family as choose
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage

STAGE = "select_family"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)


@task(name="select_family", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def select_family(benchmarks: list[dict], select: SelectConfig, selection_split: str, artifacts_dir: str) -> dict:
    """Choose the family by the selection metric, then its largest model as teacher and ~2B analog as student."""

    def build(out: Path) -> dict:
        choice = choose(benchmarks, split=selection_split, metric=select.metric,
                        student_max_params=select.student_max_params)
        by_name = {b["name"]: b for b in benchmarks}
        choice["teacher_model"] = by_name[choice["teacher"]]["model"]
        choice["student_model"] = by_name[choice["student"]]["model"]
        run_logger().info("selected family %s: teacher %s, student %s (by %s %s)", choice["family"],
                          choice["teacher"], choice["student"], selection_split, select.metric)
        return {"files": {}, **choice}

    return run_stage(STAGE, MODULES, build)
