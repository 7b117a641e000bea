"""Stage: the teacher's targets over the training set, once per variant (top-k or sampled) at the largest k.

The teacher is whichever run :func:`ftflow.study.design.distillation_teacher` chose
(a PEFT adapter, a prefix adapter or a full checkpoint, loaded by
:func:`ftflow.models.loading.load_trained`). Distillation variants with a smaller k
slice these (the top entries of a top-k list are the top entries of any
larger one; the first draws of a sample are a smaller sample), so the teacher
runs once per variant.
Before the teacher is loaded, its tokenizer and embedding size are checked
against the student's (:func:`ftflow.distill.vocabulary.check_distillable`): a student
with another tokenizer is refused, and embeddings of different sizes over
one tokenizer are compared on their shared ids, which the manifest's
``vocabulary_note`` then says. The pass's batch size is its own
(:func:`ftflow.plan.decide.plan_teacher_pass`): the largest its memory plan says
fits ``memory_budget_gb``, recorded in the manifest with the prediction.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.data.splits import read_split
from ftflow.distill.teacher import teacher_topk_for_student
from ftflow.models.loading import load_tokenizer
from ftflow.plan.budget import DEFAULT_CUDA_MARGIN_GB, stage_budget
from ftflow.plan.decide import plan_teacher_pass
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "teacher_logits"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)


@task(name="teacher_logits", task_run_name="teacher_logits[{teacher[name]}|{variant}{top_k}]",
      cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def teacher_logits(teacher: dict, student: dict, augmented: dict, top_k: int, max_length: int, device: str,
                   batch_size: int | str, memory_budget_gb: float, batch_size_cap: int, logits_chunk_tokens: int,
                   artifacts_dir: str, progress: bool = True, variant: str = "topk", seed: int = 0,
                   memory_margin_gb: float = DEFAULT_CUDA_MARGIN_GB) -> dict:
    """Store the teacher's top-k (or k sampled) ids (int32) and log-probs (fp16) at every training position.

    The pass's batch is planned against :func:`ftflow.plan.budget.stage_budget` (on CUDA: at most what is free at
    the stage's start, less ``memory_margin_gb``), like every other stage that holds a model.
    """

    def build(out: Path) -> dict:
        sentences = read_split(stage_path(augmented, "train"))
        base = teacher["base_model"]
        budget = stage_budget(memory_budget_gb, device, memory_margin_gb)
        if budget.measured:
            run_logger().info("teacher pass of %s: %s", teacher["name"], budget.line())
        plan = plan_teacher_pass(teacher, tokenizer=load_tokenizer(base["path"], base["trust_remote_code"]),
                                 sentences=sentences, max_length=max_length, k=top_k, variant=variant,
                                 budget_bytes=budget.budget_bytes, batch_size=batch_size,
                                 batch_size_cap=batch_size_cap, logits_chunk_tokens=logits_chunk_tokens,
                                 device=device)
        run_logger().info("teacher pass of %s: %s", teacher["name"], plan.reason)
        topk = teacher_topk_for_student(teacher, student, sentences, k=top_k, max_length=max_length, device=device,
                                        batch_size=plan.batch_size, progress=progress, variant=variant, seed=seed,
                                        logits_chunk_tokens=logits_chunk_tokens)
        topk.save(out / "topk")
        positions = int(topk.offsets[-1])
        run_logger().info("teacher %s-%d log-probs (%s): %d sentences, %d positions", variant, top_k,
                          teacher["name"], len(topk.offsets) - 1, positions)
        return {"files": {"topk": "topk"}, "top_k": top_k, "variant": variant, "positions": positions, "teacher": teacher["name"],
                "student": student["name"], "vocab_size": topk.vocab_size, "teacher_rows": topk.teacher_rows,
                "vocabulary_note": topk.vocabulary_note, "batch_size": plan.batch_size,
                "memory_plan": plan.prediction.to_dict(), "memory_plan_reason": plan.reason,
                "memory_budget": budget.to_dict()}

    return run_stage(STAGE, MODULES, build)
