"""The study's fine-tuning methods as jobs: one method, one model, one set of hyperparameters.

A job (:data:`ftflow.jobs.Job`, one typed class per method) says *what* to
train; :mod:`ftflow.design` decides which jobs the study runs, and
:func:`run_job` trains one job:

1. load the base model (4-bit for QLoRA) and wrap it (PEFT) if the method asks;
2. fit with checkpoints in ``work_dir`` (an interrupted run resumes there),
   scoring the selection split after every epoch and keeping the best epoch;
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

from ftflow.artifacts import write_json
from ftflow.jobs import (PEFT_METHODS, DistillJob, FullJob, Job, LoraJob, PrefixJob, QLoraJob, best_run, distill_grid,
                         full_job, lora_grid, lora_like, prefix_grid, qlora_like)
from ftflow.models import load_model, load_tokenizer
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, score_sentences

log = logging.getLogger(__name__)

PER_SENTENCE = "per_sentence.json"
"""The file :func:`run_job` writes beside ``model/``: ``{"test": per-sentence values}``
(:meth:`ftflow.perplexity.PerplexityResult.per_sentence`)."""

# The job classes and their constructors live in ftflow.jobs; they are importable from here too.
__all__ = ["Job", "best_run", "distill_grid", "full_job", "load_trained", "lora_grid", "lora_like", "prefix_grid",
           "qlora_like", "run_job"]


def load_trained(run: dict, device: str, precision: Optional[str] = None):
    """The model a run trained, loaded the way a user would: base + adapter, or the full checkpoint."""
    base = run["base_model"]
    model_dir = Path(run["dir"]) / run["files"]["model"]
    if run["method"] in PEFT_METHODS:
        return load_model(base["path"], precision or run["precision"], device, adapter=str(model_dir),
                          trust_remote_code=base["trust_remote_code"], quantization=run.get("quantization"))
    return load_model(str(model_dir), precision or run["precision"], device,
                      trust_remote_code=base["trust_remote_code"])


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
) -> dict:
    """Train one job; returns its result (history, best epoch, selection and test scores).

    ``work_dir`` must survive an interruption (checkpoints and the best epoch
    so far live there); ``out_dir`` receives ``model/`` and ``history.json``.
    ``teacher_topk_dir`` is the stored teacher top-k, for distillation only.
    ``logits_chunk_tokens``: see :func:`ftflow.perplexity.score_sentences` (validation and test scoring).
    ``card_facts`` (data fingerprints, teacher, ...) go into the model card.
    ``master_weights`` (full fine-tuning and distillation of a bf16/fp16
    model): ``fp32`` (default) or the model's precision when fp32 master
    weights do not fit (see :func:`ftflow.training.plan_precision`).
    ``packing`` (``auto``, ``on``, ``off``): how training batches are formed (:func:`ftflow.training.batching_for`).
    ``report_to`` (``tensorboard``): the Trainer's logging integrations; their files (TensorBoard event files)
    are written under ``work_dir`` while the run trains and copied into ``out_dir/tensorboard`` at the end.
    ``fit_plan`` (:class:`ftflow.fit.FitPlan` as a dict, with its one-line ``summary``): micro-batch, gradient
    checkpointing, optimizer state and trained-weights precision that make the run fit; its ``master_weights``
    replaces ``master_weights``. (A dict, not the class, so that loading a trained run for the teacher pass
    does not reach the memory planner's code.)
    """
    from ftflow.cards import write_model_card
    from ftflow.training import (TENSORBOARD_DIR, TRAINER_LOGS_DIR, TrainSettings, batching_for, encode_dataset,
                                 train_full, train_lora, train_prefix)

    base = job.model
    trust = base["trust_remote_code"]
    tokenizer = load_tokenizer(base["path"], trust)
    fitted = {}
    if fit_plan is not None:
        master_weights = fit_plan["master_weights"]
        if job.method in ("full", "distill") and fit_plan["train_precision"] != job.precision:
            master_weights = fit_plan["train_precision"]  # an fp32 model trained as bf16 weights
        fitted = dict(micro_batch_size=fit_plan["micro_batch_size"], optimizer=fit_plan["optimizer"],
                      # QLoRA checkpoints through prepare_model_for_kbit_training already.
                      gradient_checkpointing=fit_plan["gradient_checkpointing"] and job.method != "qlora")
    settings = TrainSettings(
        epochs=job.epochs, learning_rate=job.learning_rate, batch_size=job.batch_size, max_length=max_length,
        seed=seed, device=device,
        precision=fit_plan["train_precision"] if fit_plan is not None else job.precision,
        weight_decay=job.weight_decay, eval_batch_size=eval_batch_size, progress=progress,
        checkpoint_steps=checkpoint_steps, logits_chunk_tokens=logits_chunk_tokens,
        master_weights=master_weights if job.method in ("full", "distill") else None, packing=packing,
        report_to=tuple(report_to), **fitted,
    )
    best_dir = Path(work_dir) / "best"
    trainer_dir = Path(work_dir) / "trainer"
    quantization = None
    common = dict(settings=settings, work_dir=trainer_dir, trust_remote_code=trust, on_progress=on_progress)
    if isinstance(job, LoraJob):  # QLoraJob too
        if isinstance(job, QLoraJob):
            quantization = job.quantization
        result = train_lora(base["path"], tokenizer, train_sentences, validation_sentences, r=job.r,
                            alpha=job.alpha, dropout=job.dropout, target_modules=job.target_modules,
                            adapter_dir=best_dir, quantization=quantization, **common)
    elif isinstance(job, PrefixJob):
        result = train_prefix(base["path"], tokenizer, train_sentences, validation_sentences,
                              num_virtual_tokens=job.num_virtual_tokens, adapter_dir=best_dir, **common)
    elif isinstance(job, FullJob):
        result = train_full(base["path"], tokenizer, encode_dataset(tokenizer, train_sentences, max_length),
                            validation_sentences, model_dir=best_dir, **common)
    else:
        assert isinstance(job, DistillJob), type(job)
        from ftflow.distill import (DistillationCollator, DistillationTrainer, TeacherTopK, check_store_for_student,
                                    embedding_rows)
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
        result = train_full(
            base["path"], tokenizer, encode_dataset(tokenizer, train_sentences, max_length), validation_sentences,
            model_dir=best_dir, batching=batching,
            collator=DistillationCollator(pad_token_id(tokenizer), store, k=job.top_k, packed=batching == "packed"),
            trainer_cls=DistillationTrainer,
            trainer_kwargs={"alpha": job.alpha, "temperature": job.temperature, "vocab_size": shared.size,
                            "variant": job.loss},
            **common,
        )
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
    if fit_plan is not None:  # how the run was made to fit its memory budget (ftflow/fit.py)
        summary.update(fit_plan={k: v for k, v in fit_plan.items() if k != "summary"},
                       fit_summary=fit_plan["summary"])
    write_model_card(model_dir, summary, card_facts or {})
    # Every test sentence's NLL, tokens and bytes: the report's intervals and paired comparisons (ftflow/uncertainty.py).
    write_json(Path(out_dir) / PER_SENTENCE, {"test": test.per_sentence(test_sentences)})
    return summary
