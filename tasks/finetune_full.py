"""Stage 8: the student fine-tuned in full."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from ftflow.artifacts import write_json
from ftflow.config import FinetuneConfig
from ftflow.data import read_split
from ftflow.memory import GB, check_training_fits
from ftflow.models import load_tokenizer
from ftflow.training import TrainSettings, encode_dataset, train_full
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_stage, stage_path

STAGE = "finetune_full"
MODULES = ("ftflow.training", "ftflow.memory", "ftflow.models", "ftflow.perplexity", "ftflow.tokens", "ftflow.data",
           "tasks.finetune_full")


@task(name="finetune_full", task_run_name="finetune_full[{selection[student]}]",
      cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def finetune_full(selection: dict, augmented: dict, data: dict, finetune: FinetuneConfig, seed: int,
                  max_length: int, device: str, eval_batch_size: int, selection_split: str,
                  memory_budget_gb: float, planned_length: int, artifacts_dir: str, progress: bool = True) -> dict:
    """Train every weight of the student; keep the best epoch as a full checkpoint."""
    student = selection["student_model"]

    def build(out: Path) -> dict:
        check_training_fits(student["path"], student["precision"], "full", batch_size=finetune.batch_size,
                            max_length=planned_length, budget_bytes=int(memory_budget_gb * GB), device=device,
                            trust_remote_code=student["trust_remote_code"])
        tokenizer = load_tokenizer(student["path"], student["trust_remote_code"])
        settings = TrainSettings(epochs=finetune.epochs, learning_rate=finetune.learning_rate,
                                 batch_size=finetune.batch_size, max_length=max_length, seed=seed, device=device,
                                 precision=student["precision"], weight_decay=finetune.weight_decay,
                                 eval_batch_size=eval_batch_size, progress=progress)
        result = train_full(
            student["path"], tokenizer,
            encode_dataset(tokenizer, read_split(stage_path(augmented, "train")), max_length),
            read_split(stage_path(data, selection_split)),
            settings=settings, work_dir=out / "trainer", model_dir=out / "model",
            trust_remote_code=student["trust_remote_code"],
        )
        shutil.rmtree(out / "trainer", ignore_errors=True)
        write_json(out / "history.json", result)
        return {"files": {"model": "model", "history": "history.json"}, "name": f"{student['name']}+full-ft",
                "base_model": student, "selection_split": selection_split, **result}

    return run_stage(STAGE, MODULES, build)
