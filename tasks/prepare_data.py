"""Stage 1: read train and test, hold out validation, write the three splits."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.config import DataConfig
from ftflow.data.splits import SentenceFile, make_splits, read_sentences, write_split
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage

STAGE = "prepare_data"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)


def _sources(data: DataConfig, out: Path) -> tuple[SentenceFile, SentenceFile]:
    if data.synthetic is None:
        return read_sentences(data.train_file, data.text_column), read_sentences(data.test_file, data.text_column)
    from ftflow.data.synthetic import generate_sentences

    # Train and test come from one draw, so they are samples of one distribution.
    synthetic = data.synthetic
    sentences = generate_sentences(synthetic.train_sentences + synthetic.test_sentences, synthetic.seed, "reviews")
    train, test = sentences[: synthetic.train_sentences], sentences[synthetic.train_sentences :]
    for name, split in (("synthetic-train.txt", train), ("synthetic-test.txt", test)):
        (out / name).write_text("\n".join(split) + "\n", encoding="utf-8")
    return (SentenceFile(str(out / "synthetic-train.txt"), tuple(train), 0),
            SentenceFile(str(out / "synthetic-test.txt"), tuple(test), 0))


@task(name="prepare_data", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def prepare_data(data: DataConfig, artifacts_dir: str) -> dict:
    """Read the train and test sentences and hold out a seeded validation split."""

    def build(out: Path) -> dict:
        train_file, test_file = _sources(data, out)
        splits = make_splits(train_file, test_file, data.validation_fraction, data.seed)
        files = {}
        for name in ("train", "validation", "test"):
            files[name] = f"{name}.jsonl"
            write_split(out / files[name], getattr(splits, name))
        stats = splits.stats
        logger = run_logger()
        logger.info(
            "data: %d train, %d validation, %d test sentences; blank lines dropped: %s",
            stats["sentences"]["train"], stats["sentences"]["validation"], stats["sentences"]["test"],
            stats["blank_dropped"],
        )
        if stats["train_test_overlap"]["count"]:
            logger.warning("%d sentence(s) appear in both train and test, e.g. %r",
                           stats["train_test_overlap"]["count"], stats["train_test_overlap"]["examples"][0])
        for warning in stats["warnings"]:
            logger.warning("%s", warning)
        return {"files": files, "stats": stats}

    return run_stage(STAGE, MODULES, build)
