"""Training with the transformers Trainer: LoRA on the teacher, full fine-tuning.

Every training run follows one life cycle: seed, load, (wrap), fit with the
validation perplexity measured after every epoch, keep the best epoch on disk
in its library's standard format. Distillation reuses :func:`fit` with its
own Trainer subclass and collator (see :mod:`ftflow.distill`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ftflow.perplexity import score_sentences
from ftflow.tokens import pad_batch, pad_token_id, sentence_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """What every training run needs besides the model and the data."""

    epochs: int
    learning_rate: float
    batch_size: int
    max_length: int
    seed: int
    device: str
    precision: str = "fp32"
    weight_decay: float = 0.0
    eval_batch_size: int = 16
    progress: bool = True


def encode_dataset(tokenizer, sentences: Sequence[str], max_length: int):
    """A ``datasets.Dataset`` of ``input_ids`` (ftflow's encoding) and ``sentence_index``."""
    import datasets

    ids = [sentence_ids(tokenizer, text, max_length)[0] for text in sentences]
    return datasets.Dataset.from_dict({"input_ids": ids, "sentence_index": list(range(len(ids)))})


class PadCollator:
    """Right-pads a list of dataset rows into a training batch (see :func:`ftflow.tokens.pad_batch`)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        return pad_batch([row["input_ids"] for row in rows], self.pad_id, "right")


def _validation_callback(tokenizer, sentences, settings: TrainSettings, save_best: Callable, history: list):
    from transformers import TrainerCallback

    class ValidationPerplexity(TrainerCallback):
        """Scores validation after every epoch and saves the best epoch."""

        best = math.inf

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            was_training = model.training
            result = score_sentences(
                model, tokenizer, sentences, batch_size=settings.eval_batch_size,
                max_length=settings.max_length, progress=False,
            )
            model.train(was_training)
            epoch = round(state.epoch or 0)
            losses = [e["loss"] for e in state.log_history if "loss" in e]
            entry = {
                "epoch": epoch,
                "step": state.global_step,
                "train_loss": losses[-1] if losses else None,
                "validation": result.to_dict(),
            }
            history.append(entry)
            improved = result.corpus_ppl < self.best
            log.info(
                "epoch %d: validation PPL %.4f (%s)", epoch, result.corpus_ppl,
                "best so far, saved" if improved else f"best stays {self.best:.4f}",
            )
            if improved:
                self.best = result.corpus_ppl
                save_best(model)

    return ValidationPerplexity()


def fit(
    model,
    tokenizer,
    train_dataset,
    validation_sentences: Sequence[str],
    settings: TrainSettings,
    work_dir: Path,
    save_best: Callable,
    *,
    collator=None,
    trainer_cls=None,
    trainer_kwargs: Optional[dict] = None,
) -> dict:
    """Train for ``settings.epochs`` epochs, scoring validation after each and keeping the best.

    Args:
        model: the model to train (already wrapped for PEFT if needed).
        tokenizer: its tokenizer.
        train_dataset: rows with ``input_ids`` (and whatever ``collator`` reads).
        validation_sentences: scored after every epoch with ftflow's perplexity.
        settings: epochs, learning rate, batch size, seed, device.
        work_dir: the Trainer's output directory (checkpoints, logs).
        save_best: called with the model whenever validation perplexity improves.
        collator: defaults to right padding with :class:`PadCollator`.
        trainer_cls: a ``transformers.Trainer`` subclass (distillation brings its own).
        trainer_kwargs: extra keyword arguments for ``trainer_cls``.

    Returns:
        ``{"history": [...per epoch...], "best_epoch", "best_validation_ppl", "baseline_validation"}``.
    """
    from transformers import Trainer, TrainingArguments

    before = score_sentences(
        model, tokenizer, validation_sentences, batch_size=settings.eval_batch_size,
        max_length=settings.max_length, progress=False,
    )
    log.info("before training: validation PPL %.4f", before.corpus_ppl)
    history: list[dict] = []
    on_cuda = settings.device == "cuda"
    args = TrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        logging_steps=max(1, len(train_dataset) // settings.batch_size // 4),
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not on_cuda,
        bf16=on_cuda and settings.precision in ("bf16", "nf4"),
        remove_unused_columns=False,
        disable_tqdm=not settings.progress,
    )
    trainer_cls = trainer_cls or Trainer
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator or PadCollator(pad_token_id(tokenizer)),
        callbacks=[_validation_callback(tokenizer, validation_sentences, settings, save_best, history)],
        **(trainer_kwargs or {}),
    )
    trainer.train()
    best = min(history, key=lambda e: e["validation"]["corpus_ppl"])
    return {
        "history": history,
        "best_epoch": best["epoch"],
        "best_validation_ppl": best["validation"]["corpus_ppl"],
        "baseline_validation": before.to_dict(),
    }


def train_lora(
    base_path: str,
    tokenizer,
    train_sentences: Sequence[str],
    validation_sentences: Sequence[str],
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules,
    settings: TrainSettings,
    work_dir: Path,
    adapter_dir: Path,
    trust_remote_code: bool = False,
) -> dict:
    """LoRA on a base model; the best epoch's adapter is saved in PEFT's format to ``adapter_dir``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from ftflow.models import load_model

    set_seed(settings.seed)
    model = load_model(base_path, settings.precision, settings.device, trainable=True,
                       trust_remote_code=trust_remote_code)
    if settings.precision == "nf4":
        model = prepare_model_for_kbit_training(model)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    lora = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%s dropout=%s: %d trainable of %d parameters", r, alpha, dropout, trainable, total)
    result = fit(
        model, tokenizer, encode_dataset(tokenizer, train_sentences, settings.max_length),
        validation_sentences, settings, work_dir, save_best=lambda m: m.save_pretrained(adapter_dir),
    )
    result["trainable_parameters"] = int(trainable)
    return result


def train_full(
    base_path: str,
    tokenizer,
    train_dataset,
    validation_sentences: Sequence[str],
    *,
    settings: TrainSettings,
    work_dir: Path,
    model_dir: Path,
    collator=None,
    trainer_cls=None,
    trainer_kwargs: Optional[dict] = None,
    trust_remote_code: bool = False,
) -> dict:
    """Every weight of a model trained; the best epoch saved as a full checkpoint (with tokenizer)."""
    from transformers import set_seed

    from ftflow.models import load_model

    set_seed(settings.seed)
    model = load_model(base_path, settings.precision, settings.device, trainable=True,
                       trust_remote_code=trust_remote_code)
    model.train()

    def save(m):
        m.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)

    return fit(model, tokenizer, train_dataset, validation_sentences, settings, work_dir, save,
               collator=collator, trainer_cls=trainer_cls, trainer_kwargs=trainer_kwargs)
