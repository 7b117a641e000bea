"""The study's fine-tuning methods as jobs: one method, one model, one set of hyperparameters.

A :class:`TrainJob` says *what* to train; grids in the config expand into
lists of jobs (:func:`lora_grid`, :func:`prefix_grid`, :func:`distill_grid`),
the best LoRA combination is carried over to other models and to QLoRA
(:func:`lora_like`, :func:`qlora_like`), and :func:`run_job` trains one job:

1. load the base model (4-bit for QLoRA) and wrap it (PEFT) if the method asks;
2. fit with checkpoints in ``work_dir`` (an interrupted run resumes there),
   scoring the selection split after every epoch and keeping the best epoch;
3. save the best epoch in its library's format under ``out_dir/model`` (a
   PEFT adapter directory or a full checkpoint, with the tokenizer) and a
   model card (``README.md``) saying what it is and how well it does;
4. score that model on test, for the report only.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict

from ftflow.config import DistillConfig, FinetuneConfig, LoraConfig, PrefixConfig, QLoraConfig
from ftflow.models import load_model, load_tokenizer
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, score_sentences

log = logging.getLogger(__name__)

Method = Literal["lora", "qlora", "prefix", "full", "distill"]
PEFT_METHODS = frozenset({"lora", "qlora", "prefix"})
# The memory planner's name of each method's training (see ftflow.memory.predict_training).
MEMORY_METHOD = {"lora": "lora", "qlora": "lora", "prefix": "prefix", "full": "full", "distill": "distill"}


class TrainJob(BaseModel):
    """One training run: a method with its hyperparameters on one model and one training set.

    ``model`` is a benchmarked model (``name``, ``path``, ``family``,
    ``precision``, ``trust_remote_code``). ``train_set`` names the training
    sentences: ``main`` (the pipeline's training set: augmented as configured,
    or the original split when augmentation is off) or, in the augmentation
    ablation, ``original``, ``augmented`` or one augmentation method.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method
    model: dict[str, Any]
    hyper: dict[str, Any]
    learning_rate: float
    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    train_set: str = "main"

    @property
    def precision(self) -> str:
        """Weights precision of the base model during training (nf4 for QLoRA)."""
        return "nf4" if self.method == "qlora" else self.model["precision"]

    @property
    def settings_label(self) -> str:
        """The hyperparameters, short: ``r16,a32,d0.05,lr0.0002``."""
        h = self.hyper
        if self.method in ("lora", "qlora"):
            parts = [f"r{h['r']}", f"a{h['alpha']:g}", f"d{h['dropout']:g}"]
            if self.method == "qlora":
                parts.append(h["quant_type"])
        elif self.method == "prefix":
            parts = [f"p{h['num_virtual_tokens']}"]
        elif self.method == "distill":
            parts = [f"top{h['top_k']}", f"T{h['temperature']:g}", f"a{h['alpha']:g}"]
        else:
            parts = []
        parts.append(f"lr{self.learning_rate:g}")
        if self.train_set != "main":
            parts.append(f"data={self.train_set}")
        return ",".join(parts)

    @property
    def title(self) -> str:
        """Run name: ``lora[granite-teacher|r16,a32,d0.05,lr0.0002]``."""
        return f"{self.method}[{self.model['name']}|{self.settings_label}]"

    @property
    def name(self) -> str:
        """Name of the trained model in tables: ``granite-teacher+lora[r16,a32,d0.05,lr0.0002]``."""
        return f"{self.model['name']}+{self.method}[{self.settings_label}]"


def lora_grid(config: LoraConfig, model: dict) -> list[TrainJob]:
    """One LoRA job per combination of rank, alpha, dropout and learning rate, in a fixed order."""
    return [
        TrainJob(method="lora", model=model, learning_rate=lr, epochs=config.epochs, batch_size=config.batch_size,
                 hyper={"r": r, "alpha": alpha, "dropout": dropout, "target_modules": config.target_modules})
        for r, alpha, dropout, lr in itertools.product(config.r, config.alpha, config.dropout, config.learning_rate)
    ]


def lora_like(best: TrainJob, model: dict, train_set: str = "main") -> TrainJob:
    """The best LoRA combination on another model (or another training set)."""
    return best.model_copy(update={"model": model, "train_set": train_set})


def qlora_like(best: TrainJob, model: dict, config: QLoraConfig) -> TrainJob:
    """The best LoRA combination as QLoRA: the base model in 4 bits (bitsandbytes)."""
    quant = {"quant_type": config.quant_type, "double_quant": config.double_quant,
             "compute_dtype": config.compute_dtype}
    return best.model_copy(update={"method": "qlora", "model": model, "hyper": {**best.hyper, **quant}})


def prefix_grid(config: PrefixConfig, model: dict) -> list[TrainJob]:
    """One prefix-tuning job per prefix length and learning rate."""
    return [
        TrainJob(method="prefix", model=model, learning_rate=lr, epochs=config.epochs, batch_size=config.batch_size,
                 hyper={"num_virtual_tokens": n})
        for n, lr in itertools.product(config.num_virtual_tokens, config.learning_rate)
    ]


def full_job(config: FinetuneConfig, model: dict, train_set: str = "main") -> TrainJob:
    """Full fine-tuning of one model."""
    return TrainJob(method="full", model=model, learning_rate=config.learning_rate, epochs=config.epochs,
                    batch_size=config.batch_size, weight_decay=config.weight_decay, hyper={}, train_set=train_set)


def distill_grid(config: DistillConfig, student: dict) -> list[TrainJob]:
    """One distillation job per top-k, temperature and alpha."""
    return [
        TrainJob(method="distill", model=student, learning_rate=config.learning_rate, epochs=config.epochs,
                 batch_size=config.batch_size, hyper={"top_k": k, "temperature": t, "alpha": a})
        for k, t, a in itertools.product(config.top_k, config.temperature, config.alpha)
    ]


def best_run(runs: Sequence[dict]) -> dict:
    """The run with the lowest selection-split perplexity (ties: the earlier one); skipped runs are ignored."""
    trained = [r for r in runs if not r.get("skipped")]
    if not trained:
        raise ValueError("no run finished, so there is no best one: " +
                         "; ".join(f"{r['name']}: {r.get('skipped')}" for r in runs))
    return min(trained, key=lambda r: r["best_validation_ppl"])


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
    job: TrainJob,
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
    """
    from ftflow.cards import write_model_card
    from ftflow.training import TrainSettings, batching_for, encode_dataset, train_full, train_lora, train_prefix

    base = job.model
    trust = base["trust_remote_code"]
    tokenizer = load_tokenizer(base["path"], trust)
    settings = TrainSettings(
        epochs=job.epochs, learning_rate=job.learning_rate, batch_size=job.batch_size, max_length=max_length,
        seed=seed, device=device, precision=job.precision, weight_decay=job.weight_decay,
        eval_batch_size=eval_batch_size, progress=progress, checkpoint_steps=checkpoint_steps,
        logits_chunk_tokens=logits_chunk_tokens,
        master_weights=master_weights if job.method in ("full", "distill") else None, packing=packing,
    )
    best_dir = Path(work_dir) / "best"
    trainer_dir = Path(work_dir) / "trainer"
    h = job.hyper
    quantization = None
    common = dict(settings=settings, work_dir=trainer_dir, trust_remote_code=trust, on_progress=on_progress)
    if job.method in ("lora", "qlora"):
        if job.method == "qlora":
            quantization = {k: h[k] for k in ("quant_type", "double_quant", "compute_dtype")}
        result = train_lora(base["path"], tokenizer, train_sentences, validation_sentences, r=h["r"],
                            alpha=h["alpha"], dropout=h["dropout"], target_modules=h["target_modules"],
                            adapter_dir=best_dir, quantization=quantization, **common)
    elif job.method == "prefix":
        result = train_prefix(base["path"], tokenizer, train_sentences, validation_sentences,
                              num_virtual_tokens=h["num_virtual_tokens"], adapter_dir=best_dir, **common)
    elif job.method == "full":
        result = train_full(base["path"], tokenizer, encode_dataset(tokenizer, train_sentences, max_length),
                            validation_sentences, model_dir=best_dir, **common)
    else:
        from ftflow.distill import (DistillationCollator, DistillationTrainer, TeacherTopK, check_store_for_student,
                                    embedding_rows)
        from ftflow.tokens import pad_token_id

        if teacher_topk_dir is None:
            raise ValueError("distillation needs the teacher's stored top-k (teacher_topk_dir)")
        store = TeacherTopK.load(teacher_topk_dir)
        # Before any training: the student must share the teacher's tokenizer (and the stored vocabulary range).
        shared = check_store_for_student(store, tokenizer, embedding_rows(base["path"], trust), base["name"],
                                         teacher_topk_dir)
        if len(store.offsets) - 1 != len(train_sentences):
            raise ValueError(f"the teacher top-k covers {len(store.offsets) - 1} sentences, the training set has "
                             f"{len(train_sentences)}: they must come from the same training set")
        batching = batching_for(packing, "distill", trust_remote_code=trust)
        result = train_full(
            base["path"], tokenizer, encode_dataset(tokenizer, train_sentences, max_length), validation_sentences,
            model_dir=best_dir, batching=batching,
            collator=DistillationCollator(pad_token_id(tokenizer), store, k=h["top_k"], packed=batching == "packed"),
            trainer_cls=DistillationTrainer,
            trainer_kwargs={"alpha": h["alpha"], "temperature": h["temperature"], "vocab_size": shared.size},
            **common,
        )
    if job.method in PEFT_METHODS:
        tokenizer.save_pretrained(best_dir)  # the adapter directory is then all a user needs besides the base

    model_dir = Path(out_dir) / "model"
    shutil.copytree(best_dir, model_dir)
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
    write_model_card(model_dir, summary, card_facts or {})
    return summary
