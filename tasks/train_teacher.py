"""Stage 6: LoRA on the chosen family's teacher, best epoch on the selection split."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from ftflow.artifacts import write_json
from ftflow.config import LoraConfig
from ftflow.data import read_split
from ftflow.memory import GB, check_training_fits
from ftflow.models import load_tokenizer
from ftflow.training import TrainSettings, train_lora
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_stage, stage_path

STAGE = "train_teacher"
MODULES = ("ftflow.training", "ftflow.memory", "ftflow.models", "ftflow.perplexity", "ftflow.tokens", "ftflow.data",
           "tasks.train_teacher")


@task(name="train_teacher", task_run_name="lora[{selection[teacher]}|r{lora.r},a{lora.alpha:g},d{lora.dropout:g}]",
      cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def train_teacher(selection: dict, augmented: dict, data: dict, lora: LoraConfig, seed: int, max_length: int,
                  device: str, eval_batch_size: int, selection_split: str, memory_budget_gb: float,
                  planned_length: int, artifacts_dir: str, progress: bool = True) -> dict:
    """Train a LoRA adapter on the teacher; keep the epoch with the lowest selection-split perplexity."""
    teacher = selection["teacher_model"]

    def build(out: Path) -> dict:
        check_training_fits(teacher["path"], teacher["precision"], "lora", batch_size=lora.batch_size,
                            max_length=planned_length, budget_bytes=int(memory_budget_gb * GB), device=device,
                            lora_r=lora.r, trust_remote_code=teacher["trust_remote_code"])
        tokenizer = load_tokenizer(teacher["path"], teacher["trust_remote_code"])
        settings = TrainSettings(epochs=lora.epochs, learning_rate=lora.learning_rate, batch_size=lora.batch_size,
                                 max_length=max_length, seed=seed, device=device, precision=teacher["precision"],
                                 eval_batch_size=eval_batch_size, progress=progress)
        result = train_lora(
            teacher["path"], tokenizer, read_split(stage_path(augmented, "train")),
            read_split(stage_path(data, selection_split)),
            r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
            settings=settings, work_dir=out / "trainer", adapter_dir=out / "adapter",
            trust_remote_code=teacher["trust_remote_code"],
        )
        shutil.rmtree(out / "trainer", ignore_errors=True)
        write_json(out / "history.json", result)
        return {"files": {"adapter": "adapter", "history": "history.json"}, "name": f"{teacher['name']}+lora",
                "base_model": teacher, "selection_split": selection_split, **result}

    return run_stage(STAGE, MODULES, build)
