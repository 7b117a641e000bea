"""Stage 3b: every candidate's predicted peak memory against the budget, before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.artifacts import write_json
from ftflow.config import MemoryConfig, ModelSpec
from ftflow.data.splits import read_split
from ftflow.models.architecture import fetched_configs_dir
from ftflow.models.loading import ModelLoadError, load_tokenizer
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS
from ftflow.plan.budget import stage_budget
from ftflow.plan.decide import longest_sequence, plan_candidate, plan_model
from ftflow.plan.tables import PLAN_FILES, write_plan
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "plan_memory"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)


def _not_planned(reason: str) -> dict:
    return {"precision": None, "batch_size": 0, "parameters": None, "peak_bytes": None, "reason": reason}


@task(name="plan_memory", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def plan_memory(candidates: list[ModelSpec], data: dict, memory: MemoryConfig, budget_gb: float, max_length: int,
                batch_size: int | str, device: str, artifacts_dir: str,
                logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS) -> dict:
    """Predict each candidate's scoring peak; choose its precision and batch size, or skip it with the reason.

    Each is planned on the longest sentence of the splits under its own tokenizer; a candidate whose tokenizer
    cannot be read is not planned (its benchmark could not run either), so no minimum over candidates counts it.
    The budget is :func:`ftflow.plan.budget.stage_budget`'s: on CUDA, at most what is free less ``memory.cuda_margin_gb``.
    """

    def build(out: Path) -> dict:
        logger = run_logger()
        budget = stage_budget(budget_gb, device, memory.cuda_margin_gb)
        logger.info("plan_memory: %s", budget.line())
        sentences = [s for split in ("train", "validation", "test") for s in read_split(stage_path(data, split))]
        configs = fetched_configs_dir(artifacts_dir)
        decisions, plans = {}, []
        for spec in candidates:
            try:
                tokenizer = load_tokenizer(spec.path, spec.trust_remote_code)
            except ModelLoadError as exc:
                decisions[spec.name] = _not_planned(f"cannot plan: its tokenizer cannot be read, so it cannot be "
                                                    f"benchmarked either ({exc})")
                logger.warning("plan %s: %s", spec.name, decisions[spec.name]["reason"])
                continue
            length = longest_sequence(tokenizer, sentences, max_length)
            decision = plan_candidate(spec.name, spec.path, budget.budget_bytes, precision=spec.precision,
                                      batch_size=batch_size, max_length=length,
                                      batch_size_cap=memory.batch_size_cap, allow_nf4=memory.allow_nf4,
                                      device=device, logits_chunk_tokens=logits_chunk_tokens,
                                      trust_remote_code=spec.trust_remote_code, config_dir=configs)
            decision.update(max_length=length, note=f"longest sentence: {length} tokens")
            decisions[spec.name] = decision
            logger.info("plan %s: %s (longest sentence: %d tokens)", spec.name, decision["reason"], length)
            if decision["parameters"] is not None:
                plans.append(plan_model(spec.name, spec.path, budget.budget_bytes, max_length=length, device=device,
                                        allow_nf4=memory.allow_nf4, batch_size_cap=memory.batch_size_cap,
                                        logits_chunk_tokens=logits_chunk_tokens,
                                        trust_remote_code=spec.trust_remote_code, config_dir=configs))
        files = {"decisions": "decisions.json"}
        write_json(out / "decisions.json", decisions)
        if plans:
            write_plan(plans, budget.budget_bytes, out)
            files.update(PLAN_FILES)
        return {"files": files, "budget_gb": budget_gb, "device": device, "decisions": decisions,
                "budget": budget.to_dict()}

    return run_stage(STAGE, MODULES, build)
