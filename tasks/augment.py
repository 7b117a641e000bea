"""Stage 2: enlarge the training split (EDA, back-translation, masking); validation and test untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import task

from ftflow.config import AugmentConfig
from ftflow.data.augment import WORDNET_METHODS, augment_sentences
from ftflow.data.splits import read_split, write_split
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "augment"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)


@task(name="augment", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def augment(augment: AugmentConfig, data: dict, wordnet: Optional[str], artifacts_dir: str) -> dict:
    """Write the training split plus augmented sentences, each with its source id, method and parameters.

    ``wordnet``: the content hash of the WordNet database the augmentation reads (None: it reads none).
    """

    def build(out: Path) -> dict:
        original = read_split(stage_path(data, "train"))
        provenance = [{"source_id": i, "method": "original", "params": {}} for i in range(len(original))]
        stats = {"original": len(original), "made": 0}
        new, used_wordnet = [], None
        if augment.enabled:
            used = {m for m, w in augment.methods.items() if w > 0}
            reader = back_translator = cache = None
            if used & WORDNET_METHODS:
                from ftflow.data.wordnet import database_sha256, load_wordnet, locate_wordnet

                # Read where it is installed (never copied); the key has it by content.
                database = locate_wordnet(augment.nltk_data_dir)
                if database_sha256(database) != wordnet:  # the key was computed from another database
                    raise RuntimeError(f"the WordNet database at {database} changed after this run computed its "
                                       "cache key; run again")
                reader = load_wordnet(augment.nltk_data_dir)
                used_wordnet = {"database": str(database), "sha256": wordnet}
            if "back_translation" in used:
                from ftflow.data.translate import build_back_translator

                # Shared by every run: a rerun (any config) never asks the service twice for one sentence.
                back_translator, cache = build_back_translator(
                    augment.back_translation, Path(artifacts_dir) / "translation-cache"
                )
            try:
                new, stats = augment_sentences(original, augment, wordnet=reader, back_translator=back_translator)
            finally:
                if cache is not None:
                    cache.close()
        sentences = original + [a.text for a in new]
        provenance += [{"source_id": a.source_id, "method": a.method, "params": a.params} for a in new]
        write_split(out / "train.jsonl", sentences, provenance)
        logger = run_logger()
        logger.info("augment: %d original + %d new training sentences (%s)",
                    len(original), len(new), stats.get("per_method", "disabled"))
        skipped = {k: v for k, v in stats.get("skipped_sources", {}).items() if v}
        failed = {k: v for k, v in stats.get("translation_failed", {}).items() if v}
        if skipped:
            examples = {k: v for k, v in stats["skipped_examples"].items() if v}
            logger.warning("augment: sources not augmented (kept as they are): %s; e.g. ids %s", skipped, examples)
        if failed:
            logger.warning("augment: back-translations failed and left out: %s; e.g. %s",
                           failed, stats["translation_failed_examples"][:3])
        return {"files": {"train": "train.jsonl"}, "stats": stats, "sentences": len(sentences),
                "wordnet": used_wordnet}

    return run_stage(STAGE, MODULES, build)
