"""Stage 3b: every candidate's predicted peak memory against the budget, before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.artifacts import write_json
from ftflow.config import MemoryConfig, ModelSpec
from ftflow.data import read_split
from ftflow.memory import GB, PLAN_FILES, longest_sequence, plan_candidate, plan_model, write_plan
from ftflow.models import ModelLoadError, load_tokenizer
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "plan_memory"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/caching.py)


def _longest_sequence(spec: ModelSpec, sentences: list[str], max_length: int) -> tuple[int, str]:
    """Tokens of the longest sentence under this model's tokenizer (at most max_length)."""
    try:
        tokenizer = load_tokenizer(spec.path, spec.trust_remote_code)
    except ModelLoadError:
        return max_length, f"tokenizer not available offline: planned for the worst case, {max_length} tokens"
    longest = longest_sequence(tokenizer, sentences, max_length)
    return longest, f"longest sentence: {longest} tokens"


@task(name="plan_memory", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def plan_memory(candidates: list[ModelSpec], data: dict, memory: MemoryConfig, budget_gb: float, max_length: int,
                batch_size: int | str, device: str, artifacts_dir: str,
                logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS) -> dict:
    """Predict each candidate's scoring peak; choose its precision and batch size, or skip it with the reason."""

    def build(out: Path) -> dict:
        logger = run_logger()
        budget = int(budget_gb * GB)
        sentences = [s for split in ("train", "validation", "test") for s in read_split(stage_path(data, split))]
        decisions, plans = {}, []
        for spec in candidates:
            length, length_note = _longest_sequence(spec, sentences, max_length)
            decision = plan_candidate(spec.name, spec.path, budget, precision=spec.precision, batch_size=batch_size,
                                      max_length=length, batch_size_cap=memory.batch_size_cap,
                                      allow_nf4=memory.allow_nf4, device=device,
                                      logits_chunk_tokens=logits_chunk_tokens,
                                      trust_remote_code=spec.trust_remote_code)
            decision.update(max_length=length, note=length_note)
            decisions[spec.name] = decision
            logger.info("plan %s: %s (%s)", spec.name, decision["reason"], length_note)
            if decision["parameters"] is not None:
                plans.append(plan_model(spec.name, spec.path, budget, max_length=length, device=device,
                                        allow_nf4=memory.allow_nf4, batch_size_cap=memory.batch_size_cap,
                                        logits_chunk_tokens=logits_chunk_tokens,
                                        trust_remote_code=spec.trust_remote_code))
        files = {"decisions": "decisions.json"}
        write_json(out / "decisions.json", decisions)
        if plans:
            write_plan(plans, budget, out)
            files.update(PLAN_FILES)
        return {"files": files, "budget_gb": budget_gb, "device": device, "decisions": decisions}

    return run_stage(STAGE, MODULES, build)
