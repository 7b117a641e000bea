"""Stage: the LoRA teacher's top-k log-probs over the training set, computed once at the largest k.

Distillation variants with a smaller k slice these (the top entries of a
top-k list are the top entries of any larger one), so the teacher runs once.
Before the teacher is loaded, its tokenizer and embedding size are checked
against the student's (:func:`ftflow.distill.check_distillable`): a student
with another tokenizer is refused, and embeddings of different sizes over
one tokenizer are compared on their shared ids, which the manifest's
``vocabulary_note`` then says.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.data import read_split
from ftflow.distill import teacher_topk_for_student
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "teacher_logits"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/caching.py)


@task(name="teacher_logits", task_run_name="teacher_logits[{teacher[name]}|top{top_k}]",
      cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def teacher_logits(teacher: dict, student: dict, augmented: dict, top_k: int, max_length: int, device: str,
                   batch_size: int, artifacts_dir: str, progress: bool = True) -> dict:
    """Store the teacher's top-k token ids (int32), log-probs (fp16) and tail mass (fp32) at every training position."""

    def build(out: Path) -> dict:
        topk = teacher_topk_for_student(teacher, student, read_split(stage_path(augmented, "train")), k=top_k,
                                        max_length=max_length, device=device, batch_size=batch_size,
                                        progress=progress)
        topk.save(out / "topk")
        positions = int(topk.offsets[-1])
        run_logger().info("teacher top-%d log-probs: %d sentences, %d positions", top_k, len(topk.offsets) - 1,
                          positions)
        return {"files": {"topk": "topk"}, "top_k": top_k, "positions": positions, "teacher": teacher["name"],
                "student": student["name"], "vocab_size": topk.vocab_size, "teacher_rows": topk.teacher_rows,
                "vocabulary_note": topk.vocabulary_note}

    return run_stage(STAGE, MODULES, build)
