"""Stage 2: enlarge the training split with nlpaug (validation and test untouched)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.augment import augment_sentences
from ftflow.config import AugmentConfig
from ftflow.data import read_split, write_split
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "augment"
MODULES = ("ftflow.augment", "ftflow.data", "tasks.augment")


@task(name="augment", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def augment(augment: AugmentConfig, data: dict, artifacts_dir: str) -> dict:
    """Write the training split plus augmented sentences, each with its source id and method."""

    def build(out: Path) -> dict:
        original = read_split(stage_path(data, "train"))
        provenance = [{"source_id": i, "method": "original"} for i in range(len(original))]
        stats = {"original": len(original), "made": 0}
        new = []
        if augment.enabled:
            new, stats = augment_sentences(
                original, factor=augment.factor, methods=augment.methods,
                word_rate=augment.word_rate, seed=augment.seed,
            )
            stats["original"] = len(original)
        sentences = original + [a.text for a in new]
        provenance += [{"source_id": a.source_id, "method": a.method} for a in new]
        write_split(out / "train.jsonl", sentences, provenance)
        run_logger().info("augment: %d original + %d new training sentences (%s)",
                          len(original), len(new), stats.get("per_method", "disabled"))
        return {"files": {"train": "train.jsonl"}, "stats": stats, "sentences": len(sentences)}

    return run_stage(STAGE, MODULES, build)
