"""Stage 3 (offline default): build and briefly pretrain small checkpoints of several families."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task

from ftflow.config import ZooConfig
from ftflow.data.splits import read_split
from ftflow.models.zoo import TeacherCheck, build_zoo, load_corpus
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage

STAGE = "zoo"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)


@task(name="zoo", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def zoo(zoo: ZooConfig, train_file: Optional[Path], check_file: Path, check_split: str, max_length: int,
        device: str, artifacts_dir: str, progress: bool = True) -> dict:
    """Train one tokenizer per family, then a student and a teacher; each teacher must beat its student.

    ``train_file`` (the task's training split, None when ``zoo.task_text`` is off) joins the pretraining
    corpus; ``check_file`` (the selection split) is where each teacher is checked. Both count in the key
    by content, so the zoo is rebuilt when they change and not when only the test split or the
    augmentation does.
    """

    def build(out: Path) -> dict:
        logger = run_logger()
        corpus = load_corpus(zoo, read_split(train_file) if train_file is not None else ())
        check = TeacherCheck(read_split(check_file), check_split, max_length)
        built = build_zoo(zoo, corpus, out, check=check, device=device, progress=progress, log=logger.info,
                          warn=logger.warning)
        # Paths are stored relative to the stage directory, which is renamed into place afterwards.
        for family in built["families"]:
            for member in family["members"]:
                member["path"] = Path(member["path"]).resolve().relative_to(out.resolve()).as_posix()
        return built

    return run_stage(STAGE, MODULES, build)
