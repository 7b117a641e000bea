"""Stage 4: perplexity of one candidate model on the validation and test splits."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from ftflow.artifacts import write_json
from ftflow.config import ModelSpec
from ftflow.data.splits import read_split
from ftflow.device import free_memory
from ftflow.models.loading import count_parameters, load_model, load_tokenizer
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, score_sentences
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "benchmark"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)


@task(
    name="benchmark",
    task_run_name="benchmark[{spec.name}|{spec.precision}]",
    cache_policy=ContentCache(stage=STAGE, modules=MODULES),
    **STAGE_TASK_OPTIONS,
)
def benchmark(spec: ModelSpec, data: dict, batch_size: int, max_length: int, device: str,
              artifacts_dir: str, progress: bool = True, logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS) -> dict:
    """Score one model at its precision on validation and test (a load failure fails only this run)."""

    def build(out: Path) -> dict:
        logger = run_logger()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tokenizer = load_tokenizer(spec.path, spec.trust_remote_code)
        model = load_model(spec.path, spec.precision, device, trust_remote_code=spec.trust_remote_code)
        scores, per_sentence = {}, {}
        for split in ("validation", "test"):
            sentences = read_split(stage_path(data, split))
            result = score_sentences(model, tokenizer, sentences, batch_size=batch_size,
                                     max_length=max_length, progress=progress, desc=f"{spec.name} {split}",
                                     logits_chunk_tokens=logits_chunk_tokens)
            scores[split] = result.to_dict()
            per_sentence[split] = result.per_sentence(sentences)  # for the report's intervals (ftflow/study/uncertainty.py)
            logger.info("%s %s: PPL %.4f, bits/byte %.4f, %d tokens, %d truncated", spec.name, split,
                        result.corpus_ppl, result.bits_per_byte, result.scored_tokens, result.n_truncated)
        write_json(out / "per_sentence.json", per_sentence)
        parameters = count_parameters(model)
        # Measured on CUDA only; the CPU has no comparable allocator statistic.
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        del model
        free_memory(device)  # the next stage's model must not meet this one
        return {
            "files": {"per_sentence": "per_sentence.json"},
            "model": spec.model_dump(mode="json"),
            "name": spec.name,
            "family": spec.family,
            "precision": spec.precision,
            "parameters": parameters,
            "peak_memory_bytes": peak,
            **scores,
        }

    return run_stage(STAGE, MODULES, build)
