"""Stage: the LoRA teacher's top-k log-probs over the training set, computed once at the largest k.

Distillation variants with a smaller k slice these (the top entries of a
top-k list are the top entries of any larger one), so the teacher runs once.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow.data import read_split
from ftflow.distill import compute_teacher_topk
from ftflow.methods import load_trained
from ftflow.models import load_tokenizer
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "teacher_logits"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/caching.py)


@task(name="teacher_logits", task_run_name="teacher_logits[{teacher[name]}|top{top_k}]",
      cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def teacher_logits(teacher: dict, augmented: dict, top_k: int, max_length: int, device: str, batch_size: int,
                   artifacts_dir: str, progress: bool = True) -> dict:
    """Store the teacher's top-k token ids (int32) and log-probs (fp16) at every training position."""
    base = teacher["base_model"]

    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(base["path"], base["trust_remote_code"])
        model = load_trained(teacher, device)
        topk = compute_teacher_topk(model, tokenizer, read_split(stage_path(augmented, "train")), k=top_k,
                                    max_length=max_length, batch_size=batch_size, progress=progress)
        topk.save(out / "topk")
        positions = int(topk.offsets[-1])
        run_logger().info("teacher top-%d log-probs: %d sentences, %d positions", top_k, len(topk.offsets) - 1,
                          positions)
        return {"files": {"topk": "topk"}, "top_k": top_k, "positions": positions, "teacher": teacher["name"]}

    return run_stage(STAGE, MODULES, build)
