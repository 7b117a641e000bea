"""Each stage's call: the exact parameters its task receives, built in one place for the flow and for ``ftflow status``.

A stage's cache key is a hash of its task's parameters (less
:data:`ftflow.stages.caching.NOT_IN_KEY`) and of the code its task module reaches.
The pipeline (``flows/``) calls every task with the parameters built here, and
:mod:`ftflow.stages.status` computes the same keys from the same parameters without
Prefect, so the two cannot disagree on what a stage's key is. Every function
returns *all* of a task's parameters, defaults included (a test checks them
against the tasks' signatures), because Prefect's key sees the defaults too.

Pure: no Prefect, nothing loaded; manifests in, parameter mappings out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from ftflow.config import AugmentConfig, ModelSpec, PipelineConfig
from ftflow.data.augment import wordnet_sha256
from ftflow.stages.caching import key_and_parts, key_inputs
from ftflow.study.halving import rung_label
from ftflow.train.jobs import Job


def task_modules(stage: str) -> tuple[str, ...]:
    """Where a stage's code key starts: its task module, ``tasks.<stage>`` (each task's ``MODULES``)."""
    return (f"tasks.{stage}",)


def key_of(stage: str, call: dict[str, Any]) -> tuple[str, dict]:
    """The stage's content key for ``call`` (its task's parameters) and the parts it is made of."""
    return key_and_parts(stage, key_inputs(call), task_modules(stage), call.get("artifacts_dir"))


def zoo_candidates(manifest: dict) -> list[ModelSpec]:
    """The zoo's checkpoints as candidate models, loaded like any hub model."""
    return [
        ModelSpec(name=member["name"], path=str(Path(manifest["dir"]) / member["path"]),
                  family=family["name"], precision="auto")
        for family in manifest["families"]
        for member in family["members"]
    ]


def prepare_data_call(cfg: PipelineConfig, artifacts_dir: str) -> dict:
    """prepare_data: the data section (files by content, or the synthetic draw)."""
    return {"data": cfg.data, "artifacts_dir": artifacts_dir}


def augment_call(augment: AugmentConfig, data: dict, artifacts_dir: str) -> dict:
    """The pipeline's augmentation (``cfg.augment``) or an ablation's training set (its own ``augment``), and the
    WordNet database it reads, by content (:func:`ftflow.data.augment.wordnet_sha256`)."""
    return {"augment": augment, "data": data, "wordnet": wordnet_sha256(augment), "artifacts_dir": artifacts_dir}


def zoo_call(cfg: PipelineConfig, data: dict, device: str, artifacts_dir: str, progress: bool) -> dict:
    """zoo (offline configs): the zoo section, the task's split files it reads (by content), the device."""
    files = {name: Path(data["dir"]) / data["files"][name] for name in ("train", cfg.selection_split)}
    return {"zoo": cfg.zoo, "train_file": files["train"] if cfg.zoo.task_text else None,
            "check_file": files[cfg.selection_split], "check_split": cfg.selection_split,
            "max_length": cfg.max_length, "device": device, "artifacts_dir": artifacts_dir, "progress": progress}


def plan_memory_call(cfg: PipelineConfig, candidates: list[ModelSpec], data: dict, device: str,
                     artifacts_dir: str) -> dict:
    """plan_memory: every candidate's predicted peak against the budget, on the prepared splits."""
    return {"candidates": candidates, "data": data, "memory": cfg.memory, "budget_gb": cfg.memory_budget_gb,
            "max_length": cfg.max_length, "batch_size": cfg.benchmark.batch_size, "device": device,
            "artifacts_dir": artifacts_dir, "logits_chunk_tokens": cfg.benchmark.logits_chunk_tokens}


def benchmark_call(cfg: PipelineConfig, spec: ModelSpec, batch_size: int, data: dict, device: str,
                   artifacts_dir: str, progress: bool) -> dict:
    """benchmark: one candidate at its planned precision and batch size."""
    return {"spec": spec, "data": data, "batch_size": batch_size, "max_length": cfg.max_length, "device": device,
            "artifacts_dir": artifacts_dir, "progress": progress,
            "logits_chunk_tokens": cfg.benchmark.logits_chunk_tokens}


def select_family_call(cfg: PipelineConfig, benchmarks: list[dict], artifacts_dir: str) -> dict:
    """select_family: every benchmarked candidate and the selection rule."""
    return {"benchmarks": benchmarks, "select": cfg.select, "selection_split": cfg.selection_split,
            "artifacts_dir": artifacts_dir}


def train_common(cfg: PipelineConfig, data: dict, device: str, eval_batch_size: int, artifacts_dir: str,
                 progress: bool) -> dict:
    """The parameters every training run of the pipeline shares."""
    return {"data": data, "seed": cfg.seed, "max_length": cfg.max_length, "device": device,
            "eval_batch_size": eval_batch_size, "selection_split": cfg.selection_split,
            "memory_budget_gb": cfg.training_budget_gb, "logits_chunk_tokens": cfg.benchmark.logits_chunk_tokens,
            "checkpoint_steps": cfg.training.checkpoint_steps, "artifacts_dir": artifacts_dir, "progress": progress,
            "packing": cfg.training.packing, "report_to": list(cfg.training.report_to),
            "fit_order": list(cfg.training.fit_order), "memory_margin_gb": cfg.memory.cuda_margin_gb,
            "tf32": cfg.training.tf32}


def train_call(common: dict, job: Job, train_set: dict, teacher_topk: Optional[dict] = None,
               rung: Optional[dict] = None) -> dict:
    """One training run: ``job`` on ``train_set`` (``teacher_topk``: distillation's stored teacher; ``rung``: a
    rung of successive halving, :func:`rung_of`)."""
    return {**common, "job": job, "train_set": train_set, "teacher_topk": teacher_topk, "rung": rung}


def rung_of(fraction: float, previous: Optional[dict]) -> dict:
    """A rung's parameter: where it stops (a fraction of the run's steps; 1.0: the end) and the previous rung's
    manifest it resumes from (None for the first), which counts in its key by fingerprint."""
    return {"fraction": float(fraction), "previous": previous}


def rung_title(job: Job, fraction: float) -> str:
    """A rung's run name: ``lora[granite-teacher|r16,a32,d0.05,lr0.0002] @ rung 0.25``."""
    return rung_label(job.title, fraction)


def teacher_logits_call(cfg: PipelineConfig, teacher: dict, student: dict, augmented: dict, device: str,
                        artifacts_dir: str, progress: bool, variant: str) -> dict:
    """teacher_logits: the chosen teacher run's targets of one variant (top-k or k sampled ids) over
    ``augmented``, at the largest configured k; its batch size planned in the stage against the scoring budget
    (``distill.teacher_batch_size``, ``memory_budget_gb``, ``benchmark.logits_chunk_tokens``)."""
    return {"teacher": teacher, "student": student, "augmented": augmented, "top_k": max(cfg.distill.top_k),
            "max_length": cfg.max_length, "device": device, "batch_size": cfg.distill.teacher_batch_size,
            "memory_budget_gb": cfg.memory_budget_gb, "batch_size_cap": cfg.memory.batch_size_cap,
            "memory_margin_gb": cfg.memory.cuda_margin_gb,
            "logits_chunk_tokens": cfg.benchmark.logits_chunk_tokens, "artifacts_dir": artifacts_dir,
            "progress": progress, "variant": variant, "seed": cfg.seed}


def evaluate_call(cfg: PipelineConfig, data: dict, augmented: dict, benchmarks: list[dict], failures: list[dict],
                  selection: dict, runs: list[dict], chosen_lora: str, ablation: dict[str, str],
                  artifacts_dir: str, teacher: Optional[dict] = None, checks: Sequence[str] = (),
                  decisions: Optional[dict] = None, halving: Sequence[dict] = ()) -> dict:
    """evaluate: every baseline, failure and (unique) training run, for the report; ``teacher``: the
    distillation's teacher choice (:class:`ftflow.study.design.TeacherChoice` as a dict), ``checks``: the families'
    teacher-against-student lines, ``decisions``: the memory plan's (each model's predicted scoring peak, which
    the recommendation checks against the budget), ``halving``: each grid's successive-halving summary
    (:func:`ftflow.study.halving.grid_summary`; none in grid mode)."""
    return {"data": data, "augmented": augmented, "benchmarks": benchmarks, "failures": failures,
            "selection": selection, "runs": runs, "chosen_lora": chosen_lora, "ablation": ablation,
            "title": cfg.name, "max_length": cfg.max_length, "selection_split": cfg.selection_split,
            "memory_budget_gb": cfg.memory_budget_gb, "artifacts_dir": artifacts_dir, "teacher": teacher,
            "checks": list(checks), "decisions": dict(decisions or {}),
            "recommend_controls": cfg.ablation.recommend_controls, "halving": list(halving)}
