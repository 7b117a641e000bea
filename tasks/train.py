"""Stage: one training run (LoRA, QLoRA, prefix tuning, full fine-tuning or distillation), cached on its own.

Every grid combination is one run of this task, named after what it trains
(``lora[granite-teacher|r16,a32,d0.05,lr0.0002]``). Checkpoints live in the
stage's work directory, so running the pipeline again after a crash resumes
the run where it stopped. While it trains, a Prefect progress artifact shows
the step, the training loss and the best validation perplexity so far.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from prefect import task

from ftflow.artifacts import TRANSIENT, read_json, write_json
from ftflow.plan.budget import DEFAULT_CUDA_MARGIN_GB, stage_budget
from ftflow.data.splits import read_split
from ftflow.config import DEFAULT_FIT_ORDER
from ftflow.plan.fit import out_of_memory_refit, plan_training_job, run_compute
from ftflow.plan.decide import bf16_available
from ftflow.train.rungs import (FROM_STEP, STATE_DIR, carry_state, keep_state, resume_state, rung_step, state_dir,
                               total_steps)
from ftflow.train.runner import PER_SENTENCE, Job, run_job
from ftflow.models.loading import load_tokenizer
from ftflow.tokens import sentence_ids
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "train"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)
# What a rung that trains nothing does not take over from the previous rung's manifest (run_stage writes them).
NOT_CARRIED = ("stage", "key", "fingerprint", "dir", "seconds", "key_parts", "outputs")
FAULT_VARIABLE = "FTFLOW_FAIL_STAGE"  # for tests: a method name here (e.g. distill) makes those runs fail


class ProgressArtifact:
    """A Prefect progress artifact for one training run, updated at most every ``interval`` seconds."""

    def __init__(self, title: str, interval: float = 2.0):
        self.title, self.interval = title, interval
        self.artifact_id = None
        self.last = 0.0

    def __call__(self, event: dict) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        now = time.monotonic()
        validated = event.get("validation_ppl") is not None and float(event.get("epoch") or 0).is_integer()
        if self.artifact_id is not None and now - self.last < self.interval and not validated:
            return
        self.last = now
        percent = 100.0 * event["step"] / max(1, event["max_steps"])
        parts = [f"{self.title}: step {event['step']}/{event['max_steps']}"]
        if event.get("loss") is not None:
            parts.append(f"loss {event['loss']:.4f}")
        if event.get("validation_ppl") is not None:
            parts.append(f"best validation PPL {event['validation_ppl']:.4f}")
        description = ", ".join(parts)
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, description=description)
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:  # monitoring must never stop training
            run_logger().debug("progress artifact not updated: %s", exc)


@task(name="train", task_run_name="{job.title}", cache_policy=ContentCache(stage=STAGE, modules=MODULES),
      **STAGE_TASK_OPTIONS)
def train(job: Job, train_set: dict, data: dict, seed: int, max_length: int, device: str,
          eval_batch_size: int, selection_split: str, memory_budget_gb: float, logits_chunk_tokens: int,
          teacher_topk: Optional[dict] = None, checkpoint_steps: int = 50, artifacts_dir: str = "artifacts",
          progress: bool = True, packing: str = "auto", report_to: Optional[list[str]] = None,
          fit_order: tuple[str, ...] = DEFAULT_FIT_ORDER, memory_margin_gb: float = DEFAULT_CUDA_MARGIN_GB,
          tf32: str = "auto", rung: Optional[dict] = None) -> dict:
    """Train one job on ``train_set``; keep its best epoch on the selection split; score it on test.

    Before anything is loaded, :func:`ftflow.plan.fit.plan_training_job` chooses how the run fits
    ``memory_budget_gb`` (the training budget): micro-batch and accumulation, gradient checkpointing, 8-bit
    optimizer state, bf16 trained weights, tried in ``fit_order`` (on CUDA against at most what is free at the
    run's start less ``memory_margin_gb``: :func:`ftflow.plan.budget.stage_budget`). A run that fits with none of them is not
    started: its manifest says ``skipped`` with the reason (and is cached like any result, since the
    prediction depends only on the inputs). The plan is made on this run's own training set (an augmented
    one is longer than the split it came from) and includes the validation pass between epochs; the
    manifest records it (``fit_plan``, and its prediction as ``memory_plan``), and so does the model card.
    A run that still runs out of device memory is retried from its last checkpoint with the next setting of
    ``fit_order`` (:func:`ftflow.plan.fit.next_fit`); ``oom_retries`` lists every retry and ``fit_plan`` is then the
    setting the run finished with.

    ``rung`` (successive halving, docs/halving.md): ``{"fraction": f, "previous": the previous rung's manifest
    or None}``. The run resumes from the previous rung's kept state; below 1.0 it stops after that fraction of
    its steps and keeps its work directory as ``state/`` (no model, no test score); at 1.0 it writes what a
    grid-mode run writes. Either way the manifest's ``rung`` says where it stopped.
    """

    def build(out: Path, work: Path) -> dict:
        logger = run_logger()
        if os.environ.get(FAULT_VARIABLE) == job.method:
            raise RuntimeError(f"{job.title}: failing on purpose because {FAULT_VARIABLE}={job.method} (a test "
                               "fault); unset the variable and run again")
        train_sentences = read_split(stage_path(train_set, "train"))
        fraction = rung["fraction"] if rung is not None else None
        previous = rung.get("previous") if rung is not None else None
        if previous is not None and previous.get("skipped"):
            previous = None  # it did not fit then; if it fits now, this rung starts the run
        max_steps = total_steps(job.epochs, len(train_sentences), job.batch_size)
        validation_sentences = read_split(stage_path(data, selection_split))
        budget = stage_budget(memory_budget_gb, device, memory_margin_gb)
        if budget.measured:
            logger.info("%s: %s", job.title, budget.line())
        tokenizer = load_tokenizer(job.model["path"], job.model["trust_remote_code"])
        fit = plan_training_job(
            job, tokenizer=tokenizer,
            train_sentences=train_sentences, validation_sentences=validation_sentences,
            eval_batch_size=eval_batch_size, max_length=max_length, budget_bytes=budget.budget_bytes,
            fit_order=fit_order, logits_chunk_tokens=logits_chunk_tokens, device=device,
            bf16_supported=bf16_available(device))
        if not fit.fits:
            skipped = f"{job.title}: {fit.reason}"
            logger.warning("%s is not trained: %s", job.title, fit.reason)
            return {"files": {}, "name": job.name, "title": job.title, "method": job.method,
                    "job": job.model_dump(mode="json"), "base_model": job.model, "skipped": skipped,
                    "fit_plan": fit.model_dump(mode="json"), "memory_budget": budget.to_dict(),
                    **({"rung": {"fraction": fraction, "step": 0, "max_steps": max_steps, "from_step": 0}}
                       if rung else {})}
        logger.info("%s: %s", job.title, fit.summary)
        compute = run_compute(fit, sum(len(sentence_ids(tokenizer, s, max_length)[0]) for s in train_sentences))
        facts = {"train set fingerprint": train_set["fingerprint"], "data fingerprint": data["fingerprint"],
                 "selection_split": selection_split}
        if teacher_topk is not None:
            facts["teacher"] = teacher_topk["teacher"]
            facts["teacher targets"] = f"{teacher_topk.get('variant', 'topk')}, {teacher_topk['top_k']} ids a position"
            facts["teacher top-k fingerprint"] = teacher_topk["fingerprint"]
            if teacher_topk.get("vocabulary_note"):
                facts["vocabulary note"] = teacher_topk["vocabulary_note"]
        kept_state = state_dir(previous)
        if previous is not None and kept_state is None and not work.exists():
            # Freed once its grid had finished (docs/halving.md): the run trains from its start to this rung's step,
            # which the rungs reproduce exactly (the schedule is the whole run's), and counts those steps.
            logger.info("%s: the state of rung %g was freed when its grid finished; training from step 0",
                        job.title, previous["rung"]["fraction"])
        if (kept_state is not None and fraction < 1 and not work.exists()
                and previous["rung"]["step"] >= rung_step(fraction, max_steps)):
            # Two rungs on the same step (a short run): this one trains nothing; it is the previous rung again.
            logger.info("%s: rung %g falls on the step of rung %g (%d): nothing to train", job.title, fraction,
                        previous["rung"]["fraction"], previous["rung"]["step"])
            carry_state(kept_state, out / STATE_DIR)
            carried = {k: v for k, v in previous.items() if k not in NOT_CARRIED}
            return {**carried, "train_seconds": 0.0,
                    "rung": {**previous["rung"], "fraction": fraction, "from_step": previous["rung"]["step"]}}
        if resume_state(kept_state, work):
            logger.info("%s: resuming from rung %g (step %d)", job.title, previous["rung"]["fraction"],
                        previous["rung"]["step"])
            write_json(work / FROM_STEP, {"from_step": previous["rung"]["step"]})
        elif (work / "trainer").exists():
            logger.info("%s: found the work directory of an interrupted run, resuming from it", job.title)
        elif rung is not None:
            write_json(work / FROM_STEP, {"from_step": 0})
        # What this rung trained from: the previous rung's step, or 0 when its state had been freed.
        from_step = read_json(work / FROM_STEP)["from_step"] if (work / FROM_STEP).is_file() else (
            previous["rung"]["step"] if previous is not None else 0)
        summary = run_job(
            job,
            train_sentences=train_sentences,
            validation_sentences=validation_sentences,
            test_sentences=read_split(stage_path(data, "test")),
            seed=seed, max_length=max_length, device=device, eval_batch_size=eval_batch_size,
            work_dir=work, out_dir=out, checkpoint_steps=checkpoint_steps, logits_chunk_tokens=logits_chunk_tokens,
            teacher_topk_dir=stage_path(teacher_topk, "topk") if teacher_topk is not None else None,
            card_facts=facts, progress=progress, on_progress=ProgressArtifact(job.title),
            packing=packing, report_to=report_to or (), fit_plan={**fit.model_dump(mode="json"), "summary": fit.summary},
            tf32=tf32, refit=out_of_memory_refit(device, bf16_available(device)), stop_fraction=fraction,
        )
        if "rung" in summary:  # an intermediate rung: its work directory is what the next rung resumes from
            summary["rung"]["from_step"] = from_step
            keep_state(work, out)
            # The state is transient: freed once the grid has finished (flows/steps.py), the manifest stays valid.
            return {"files": {}, "state": STATE_DIR, TRANSIENT: [STATE_DIR], "selection_split": selection_split,
                    "memory_plan": fit.prediction, "memory_budget": budget.to_dict(), "compute": compute, **summary}
        if rung is not None:
            summary["rung"] = {"fraction": 1.0, "step": max_steps, "max_steps": max_steps, "from_step": from_step}
        if summary["resumed_from"]:
            logger.info("%s: resumed from %s and finished", job.title, summary["resumed_from"])
        write_json(out / "history.json", {k: summary[k] for k in ("history", "baseline_validation", "best_epoch")})
        return {"files": {"model": "model", "history": "history.json", "card": "model/README.md",
                          "per_sentence": PER_SENTENCE},
                "selection_split": selection_split, "memory_plan": fit.prediction,
                "fit_plan": fit.model_dump(mode="json"), "memory_budget": budget.to_dict(), "compute": compute,
                **summary}

    return run_stage(STAGE, MODULES, build, work=True)
