"""Stage 3 (offline default): build and briefly pretrain small checkpoints of several families."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.config import ZooConfig
from ftflow.zoo import build_zoo, load_corpus
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage

STAGE = "zoo"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/caching.py)


@task(name="zoo", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def zoo(zoo: ZooConfig, device: str, artifacts_dir: str, progress: bool = True) -> dict:
    """Train one tokenizer per family, then a student and a teacher on a general corpus."""

    def build(out: Path) -> dict:
        logger = run_logger()
        corpus = load_corpus(zoo)
        built = build_zoo(zoo, corpus, out, device=device, progress=progress, log=logger.info)
        # Paths are stored relative to the stage directory, which is renamed into place afterwards.
        for family in built["families"]:
            for member in family["members"]:
                member["path"] = Path(member["path"]).resolve().relative_to(out.resolve()).as_posix()
        return built

    return run_stage(STAGE, MODULES, build)

