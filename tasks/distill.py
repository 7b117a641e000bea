"""Stage 7b: the student trained on cross-entropy plus KL to the teacher's stored top-k."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect import task

from ftflow.artifacts import write_json
from ftflow.config import DistillConfig
from ftflow.data import read_split
from ftflow.distill import DistillationCollator, DistillationTrainer, TeacherTopK, check_same_tokenizer
from ftflow.memory import GB, check_training_fits
from ftflow.models import load_tokenizer
from ftflow.tokens import pad_token_id
from ftflow.training import TrainSettings, encode_dataset, train_full
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_stage, stage_path

STAGE = "distill"
MODULES = ("ftflow.distill", "ftflow.training", "ftflow.memory", "ftflow.models", "ftflow.perplexity", "ftflow.tokens",
           "ftflow.data", "tasks.distill")
FAULT_VARIABLE = "FTFLOW_FAIL_STAGE"  # for tests: name a stage here to make it fail on purpose


@task(name="distill", task_run_name="distill[{selection[student]}|top{distill.top_k},T{distill.temperature:g},a{distill.alpha:g}]",
      cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def distill(selection: dict, teacher_topk: dict, augmented: dict, data: dict, distill: DistillConfig, seed: int,
            max_length: int, device: str, eval_batch_size: int, selection_split: str, memory_budget_gb: float,
            planned_length: int, artifacts_dir: str, progress: bool = True) -> dict:
    """Distill the teacher's top-k into the student; keep the best epoch as a full checkpoint."""
    student, teacher = selection["student_model"], selection["teacher_model"]

    def build(out: Path) -> dict:
        if os.environ.get(FAULT_VARIABLE) == STAGE:
            raise RuntimeError(f"distill: failing on purpose because {FAULT_VARIABLE}={STAGE} (a test fault)")
        # The teacher's log-probs are on disk, so only the student is in memory (plus the top-k batch).
        check_training_fits(student["path"], student["precision"], "full", batch_size=distill.batch_size,
                            max_length=planned_length, budget_bytes=int(memory_budget_gb * GB), device=device,
                            trust_remote_code=student["trust_remote_code"])
        tokenizer = load_tokenizer(student["path"], student["trust_remote_code"])
        check_same_tokenizer(load_tokenizer(teacher["path"], teacher["trust_remote_code"]), tokenizer,
                             teacher["name"], student["name"])
        store = TeacherTopK.load(stage_path(teacher_topk, "topk"))
        settings = TrainSettings(epochs=distill.epochs, learning_rate=distill.learning_rate,
                                 batch_size=distill.batch_size, max_length=max_length, seed=seed, device=device,
                                 precision=student["precision"], eval_batch_size=eval_batch_size, progress=progress)
        result = train_full(
            student["path"], tokenizer,
            encode_dataset(tokenizer, read_split(stage_path(augmented, "train")), max_length),
            read_split(stage_path(data, selection_split)),
            settings=settings, work_dir=out / "trainer", model_dir=out / "model",
            collator=DistillationCollator(pad_token_id(tokenizer), store, k=distill.top_k),
            trainer_cls=DistillationTrainer,
            trainer_kwargs={"alpha": distill.alpha, "temperature": distill.temperature},
            trust_remote_code=student["trust_remote_code"],
        )
        shutil.rmtree(out / "trainer", ignore_errors=True)
        write_json(out / "history.json", result)
        return {"files": {"model": "model", "history": "history.json"}, "name": f"{student['name']}+distill",
                "base_model": student, "teacher": teacher["name"], "selection_split": selection_split, **result}

    return run_stage(STAGE, MODULES, build)
