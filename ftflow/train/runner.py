"""The study's fine-tuning methods as jobs: one method, one model, one set of hyperparameters.

A job (:data:`ftflow.train.jobs.Job`, one typed class per method) says *what* to
train; :mod:`ftflow.study.design` decides which jobs the study runs, and
:func:`run_job` trains one job:

1. load the base model (4-bit for QLoRA) and wrap it (PEFT) if the method asks;
2. fit with checkpoints in ``work_dir`` (an interrupted run resumes there),
   scoring the selection split after every epoch and keeping the best epoch;
   a run that runs out of device memory is freed and retried with the next
   setting of its fit plan from its last checkpoint (``oom_retries``);
3. save the best epoch in its library's format under ``out_dir/model`` (a
   PEFT adapter directory or a full checkpoint, with the tokenizer) and a
   model card (``README.md``) saying what it is and how well it does;
4. score that model on test, for the report only.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ftflow.artifacts import read_json, write_json
from ftflow.config import PEFT_METHODS
from ftflow.device import free_memory
from ftflow.models.loading import load_tokenizer, load_trained
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, score_sentences
from ftflow.train.jobs import (DistillJob, FullJob, Job, LoraJob, PrefixJob, QLoraJob, best_run, distill_grid, full_job,
                               lora_grid, lora_like, prefix_grid, qlora_like)

log = logging.getLogger(__name__)

PER_SENTENCE = "per_sentence.json"
"""The file :func:`run_job` writes beside ``model/``: ``{"test": per-sentence values}``
(:meth:`ftflow.perplexity.PerplexityResult.per_sentence`)."""

# The job classes and their constructors live in ftflow.train.jobs; they are importable from here too.
__all__ = ["Job", "TrainingOutOfMemoryError", "best_run", "distill_grid", "full_job", "lora_grid",
           "lora_like", "prefix_grid", "qlora_like", "run_job"]

OOM_RETRIES = "oom_retries.json"  # in a run's work directory: its out-of-memory retries so far, for a resumed run


class TrainingOutOfMemoryError(RuntimeError):
    """A training run ran out of device memory with every setting its fit order allows."""


def run_job(
    job: Job,
    *,
    train_sentences: Sequence[str],
    validation_sentences: Sequence[str],
    test_sentences: Sequence[str],
    seed: int,
    max_length: int,
    device: str,
    eval_batch_size: int,
    work_dir: Path,
    out_dir: Path,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    checkpoint_steps: int = 50,
    teacher_topk_dir: Optional[Path] = None,
    card_facts: Optional[dict] = None,
    progress: bool = True,
    on_progress: Optional[Callable[[dict], None]] = None,
    master_weights: Optional[str] = None,
    packing: str = "auto",
    report_to: Sequence[str] = (),
    fit_plan: Optional[dict] = None,
    tf32: str = "auto",
    refit: Optional[Callable[[dict], Optional[dict]]] = None,
    stop_fraction: Optional[float] = None,
) -> dict:
    """Train one job; returns its result (history, best epoch, selection and test scores).

    ``work_dir`` must survive an interruption (checkpoints and the best epoch
    so far live there); ``out_dir`` receives ``model/`` and ``history.json``.
    ``teacher_topk_dir`` is the stored teacher top-k, for distillation only.
    ``logits_chunk_tokens``: see :func:`ftflow.perplexity.score_sentences` (validation and test scoring).
    ``card_facts`` (data fingerprints, teacher, ...) go into the model card.
    ``master_weights`` (full fine-tuning and distillation of a bf16/fp16
    model): ``fp32`` (default) or the model's precision when fp32 master
    weights do not fit (see :func:`ftflow.train.trainer.plan_precision`).
    ``packing`` (``auto``, ``on``, ``off``): how training batches are formed (:func:`ftflow.train.trainer.batching_for`).
    ``report_to`` (``tensorboard``): the Trainer's logging integrations; their files (TensorBoard event files)
    are written under ``work_dir`` while the run trains and copied into ``out_dir/tensorboard`` at the end.
    ``fit_plan`` (:class:`ftflow.plan.fit.FitPlan` as a dict, with its one-line ``summary``): micro-batch, gradient
    checkpointing, optimizer state and trained-weights precision that make the run fit; its ``master_weights``
    replaces ``master_weights``. (A dict, not the class, so that loading a trained run for the teacher pass
    does not reach the memory planner's code.)
    ``tf32`` (``auto``, ``on``, ``off``): the training steps' fp32 matrix products in TF32
    (:func:`ftflow.device.resolve_tf32`); recorded in the result as ``tf32``. Scoring never uses it.
    ``refit`` (with ``fit_plan``): the setting to try after ``torch.OutOfMemoryError`` (a fit plan dict in, the
    next one or None out: :func:`ftflow.plan.fit.out_of_memory_refit`). The failed attempt is freed, the run resumes
    from its last checkpoint under the next setting (the same effective batch; an optimizer state the new
    optimizer cannot load restarts, said so), and every retry is logged and recorded in the result as
    ``oom_retries`` (also in ``work_dir``, so a run killed after a retry resumes with the setting it had). With
    nothing left to try, :class:`TrainingOutOfMemoryError`. Without ``refit`` the error propagates.
    ``stop_fraction`` (below 1): a rung of successive halving (:mod:`ftflow.train.rungs`): training stops after
    that fraction of the run's steps (the schedule stays the whole run's) with a checkpoint in ``work_dir``,
    and the result is the rung's (:func:`rung_summary`): no model, no test score. 1.0 or None: the whole run.
    """
    from ftflow.models.loading import DEFAULT_4BIT
    from ftflow.train.cards import oom_retry_line, write_model_card
    from ftflow.train.trainer import (TENSORBOARD_DIR, TRAINER_LOGS_DIR, TrainSettings, batching_for,
                                      checkpoint_optimizer, encode_dataset, latest_checkpoint, plan_precision,
                                      train_full, train_lora, train_prefix)

    base = job.model
    trust = base["trust_remote_code"]
    tokenizer = load_tokenizer(base["path"], trust)
    full_weights = job.method in ("full", "distill")
    quantization = job.quantization if isinstance(job, QLoraJob) else None

    def settings_for(plan: Optional[dict]) -> TrainSettings:
        """The run's settings under a fit plan (the planned one, or a retry's)."""
        weights, fitted = master_weights, {}
        if plan is not None:
            weights = plan["master_weights"]
            if full_weights and plan["train_precision"] != job.precision:
                weights = plan["train_precision"]  # an fp32 model trained as bf16 weights
            fitted = dict(micro_batch_size=plan["micro_batch_size"], optimizer=plan["optimizer"],
                          # QLoRA checkpoints through prepare_model_for_kbit_training already.
                          gradient_checkpointing=plan["gradient_checkpointing"] and job.method != "qlora")
        return TrainSettings(
            epochs=job.epochs, learning_rate=job.learning_rate, batch_size=job.batch_size, max_length=max_length,
            seed=seed, device=device, precision=plan["train_precision"] if plan is not None else job.precision,
            weight_decay=job.weight_decay, eval_batch_size=eval_batch_size, progress=progress,
            checkpoint_steps=checkpoint_steps, logits_chunk_tokens=logits_chunk_tokens,
            master_weights=weights if full_weights else None, packing=packing, report_to=tuple(report_to),
            tf32=tf32, stop_step=stop_step, **fitted)

    def optimizer_of(settings: TrainSettings) -> str:
        """The optimizer whose state the run's checkpoints hold (as :func:`ftflow.train.trainer.checkpoint_optimizer`)."""
        compute = {**DEFAULT_4BIT, **(quantization or {})}["compute_dtype"] if settings.precision == "nf4" else None
        return plan_precision("full" if full_weights else "peft", settings.precision, device,
                              master_weights=settings.master_weights, compute_dtype=compute,
                              optimizer=settings.optimizer).optimizer

    from ftflow.train.rungs import rung_step, total_steps

    max_steps = total_steps(job.epochs, len(train_sentences), job.batch_size)
    stop_step = rung_step(stop_fraction, max_steps) if stop_fraction is not None and stop_fraction < 1 else None
    best_dir = Path(work_dir) / "best"
    trainer_dir = Path(work_dir) / "trainer"
    distill_options = {}
    if isinstance(job, DistillJob):
        from ftflow.distill.store import TeacherTopK
        from ftflow.distill.trainer import DistillationCollator, DistillationTrainer
        from ftflow.distill.vocabulary import check_store_for_student, embedding_rows
        from ftflow.tokens import pad_token_id

        if teacher_topk_dir is None:
            raise ValueError("distillation needs the teacher's stored top-k (teacher_topk_dir)")
        store = TeacherTopK.load(teacher_topk_dir)
        # Before any training: the student must share the teacher's tokenizer (and the stored vocabulary range).
        shared = check_store_for_student(store, tokenizer, embedding_rows(base["path"], trust), base["name"],
                                         teacher_topk_dir)
        if store.variant != job.loss:
            raise ValueError(f"{job.title} distils with the {job.loss!r} loss but the teacher data in "
                             f"{teacher_topk_dir} are {store.variant!r}: give it the store of its own variant")
        if len(store.offsets) - 1 != len(train_sentences):
            raise ValueError(f"the teacher top-k covers {len(store.offsets) - 1} sentences, the training set has "
                             f"{len(train_sentences)}: they must come from the same training set")
        batching = batching_for(packing, "distill", trust_remote_code=trust)
        distill_options = dict(
            batching=batching, trainer_cls=DistillationTrainer,
            collator=DistillationCollator(pad_token_id(tokenizer), store, k=job.top_k, packed=batching == "packed"),
            trainer_kwargs={"alpha": job.alpha, "temperature": job.temperature, "vocab_size": shared.size,
                            "variant": job.loss})

    def train(settings: TrainSettings) -> dict:
        common = dict(settings=settings, work_dir=trainer_dir, trust_remote_code=trust, on_progress=on_progress)
        if isinstance(job, LoraJob):  # QLoraJob too
            return train_lora(base["path"], tokenizer, train_sentences, validation_sentences, r=job.r,
                              alpha=job.alpha, dropout=job.dropout, target_modules=job.target_modules,
                              adapter_dir=best_dir, quantization=quantization, **common)
        if isinstance(job, PrefixJob):
            return train_prefix(base["path"], tokenizer, train_sentences, validation_sentences,
                                num_virtual_tokens=job.num_virtual_tokens, adapter_dir=best_dir, **common)
        assert isinstance(job, (FullJob, DistillJob)), type(job)
        return train_full(base["path"], tokenizer, encode_dataset(tokenizer, train_sentences, max_length),
                          validation_sentences, model_dir=best_dir, **distill_options, **common)

    retries_path = Path(work_dir) / OOM_RETRIES
    retries: list[dict] = read_json(retries_path) if retries_path.is_file() and fit_plan is not None else []
    if retries and retries[-1]["next_plan"] is None:
        retries.pop()  # an earlier process ran out of settings: this one tries its last setting again
    if retries:
        fit_plan = retries[-1]["next_plan"]
        log.info("%s: resuming with the setting of its last out-of-memory retry: %s", job.title, fit_plan["summary"])
    while True:
        error = None
        try:
            result = train(settings_for(fit_plan))
            break
        except torch.OutOfMemoryError as exc:
            if refit is None or fit_plan is None:
                raise
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        # Out of the except block: the traceback, whose frames held the failed attempt's model, gradients and
        # optimizer state, is gone; collect what library cycles still hold before the next attempt loads.
        free_memory(device)
        following = refit(fit_plan)
        checkpoint = latest_checkpoint(trainer_dir)
        optimizer_state = None  # no checkpoint yet: the next attempt starts the run over
        if following is not None and checkpoint is not None:
            written_by = checkpoint_optimizer(checkpoint)  # fit makes the same comparison when it resumes
            resumable = written_by is None or written_by == optimizer_of(settings_for(following))
            optimizer_state = "resumed" if resumable else "restarted"
        retries.append({"failed": fit_plan["summary"], "error": error,
                        "resume_from": checkpoint.name if checkpoint is not None else None,
                        "next": following["summary"] if following is not None else None,
                        "change": following["reason"] if following is not None else None,
                        "optimizer_state": optimizer_state, "next_plan": following})
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        write_json(retries_path, retries)
        if following is None:
            raise TrainingOutOfMemoryError(
                f"{job.title} ran out of device memory ({error}) with {fit_plan['summary']}, and training.fit_order "
                f"({', '.join(fit_plan['fit_order']) or 'empty'}) leaves nothing to try after {len(retries) - 1} "
                "retries: lower max_length or the method's batch_size, free the GPU of other processes, or train a "
                "smaller model")
        log.warning("%s ran out of memory (%s) with %s; retrying from %s with %s, optimizer state %s", job.title,
                    error, fit_plan["summary"], checkpoint.name if checkpoint is not None else "the start",
                    following["summary"], optimizer_state or "new")
        fit_plan = following
    if stop_step is not None:
        return rung_summary(job, result, len(train_sentences), fit_plan, retries, stop_fraction)
    if job.method in PEFT_METHODS:
        tokenizer.save_pretrained(best_dir)  # the adapter directory is then all a user needs besides the base

    model_dir = Path(out_dir) / "model"
    shutil.copytree(best_dir, model_dir)
    curves = trainer_dir / TRAINER_LOGS_DIR
    if curves.is_dir():  # every session's event files, a resumed run's included: the work directory goes
        shutil.copytree(curves, Path(out_dir) / TENSORBOARD_DIR)
    run = {"method": job.method, "precision": job.precision, "quantization": quantization,
           "base_model": base, "dir": str(out_dir), "files": {"model": "model"}}
    model = load_trained(run, device)
    test = score_sentences(model, tokenizer, test_sentences, batch_size=eval_batch_size, max_length=max_length,
                           progress=progress, desc=f"{job.title} test", logits_chunk_tokens=logits_chunk_tokens)
    del model
    free_memory(device)
    # What training reached (the saved model), also when no epoch beat the base model (best_epoch None).
    selection = next(e["validation"] for e in result["history"] if e["epoch"] == result["best_trained_epoch"])
    log.info("%s: best epoch %s, selection PPL %.4f (base model %.4f), test PPL %.4f", job.title,
             result["best_epoch"] if result["improved"] else "none (no epoch beat the base model)",
             result["best_validation_ppl"], result["baseline_validation"]["corpus_ppl"], test.corpus_ppl)
    summary = {
        **{k: v for k, v in run.items() if k not in ("dir", "files")},
        "job": job.model_dump(mode="json"),
        "name": job.name,
        "title": job.title,
        "settings_label": job.settings_label,
        "train_set": job.train_set,
        "train_sentences": len(train_sentences),
        "selection": selection,
        "test": test.to_dict(),
        **result,
    }
    if fit_plan is not None:  # how the run was made to fit its memory budget (ftflow/plan/fit.py); after retries, the last
        summary.update(fit_plan={k: v for k, v in fit_plan.items() if k != "summary"},
                       fit_summary=fit_plan["summary"])
    # Each retry with its line for the card and the report (which reads it from here, not from the card's code).
    summary["oom_retries"] = [{**{k: v for k, v in r.items() if k != "next_plan"}, "line": oom_retry_line(r)}
                              for r in retries]
    write_model_card(model_dir, summary, card_facts or {})
    # Every test sentence's NLL, tokens and bytes: the report's intervals and paired comparisons (ftflow/study/uncertainty.py).
    write_json(Path(out_dir) / PER_SENTENCE, {"test": test.per_sentence(test_sentences)})
    return summary


def rung_summary(job: Job, result: dict, train_sentences: int, fit_plan: Optional[dict], retries: list[dict],
                 fraction: float) -> dict:
    """An intermediate rung's result: the job, the epochs validated so far, and ``rung`` (``fraction``,
    ``step``, ``max_steps`` and ``selection``, the selection split's score at that step)."""
    from ftflow.train.cards import oom_retry_line

    summary = {"method": job.method, "precision": job.precision, "job": job.model_dump(mode="json"),
               "name": job.name, "title": job.title, "settings_label": job.settings_label,
               "train_set": job.train_set, "train_sentences": train_sentences, "base_model": job.model,
               **result, "rung": {"fraction": fraction, **result["rung"]}}
    if fit_plan is not None:
        summary.update(fit_plan={k: v for k, v in fit_plan.items() if k != "summary"},
                       fit_summary=fit_plan["summary"])
    summary["oom_retries"] = [{**{k: v for k, v in r.items() if k != "next_plan"}, "line": oom_retry_line(r)}
                              for r in retries]
    return summary
