"""Training with the transformers Trainer: PEFT methods (LoRA, QLoRA, prefix tuning) and full fine-tuning.

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

from ftflow.artifacts import read_json, write_json
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, score_sentences
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
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS
    progress: bool = True
    checkpoint_steps: int = 50


Progress = Callable[[dict], None]
HISTORY = "history.json"


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


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The Trainer checkpoint with the most steps whose state file was written (a killed save has none)."""
    complete = [p for p in Path(directory).glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _validation_callback(tokenizer, sentences, settings: TrainSettings, save_best: Callable, history: list,
                         history_path: Path, on_progress: Optional[Progress]):
    from transformers import TrainerCallback

    class ValidationPerplexity(TrainerCallback):
        """Scores validation after every epoch, saves the best epoch, keeps the history on disk."""

        best = min((e["validation"]["corpus_ppl"] for e in history), default=math.inf)

        def _validate(self, model, state) -> None:
            was_training = model.training
            result = score_sentences(
                model, tokenizer, sentences, batch_size=settings.eval_batch_size,
                max_length=settings.max_length, progress=False, logits_chunk_tokens=settings.logits_chunk_tokens,
            )
            model.train(was_training)
            epoch = round(state.epoch or 0)
            losses = [e["loss"] for e in state.log_history if "loss" in e]
            entry = {"epoch": epoch, "step": state.global_step, "train_loss": losses[-1] if losses else None,
                     "validation": result.to_dict()}
            improved = result.corpus_ppl < self.best
            log.info(
                "epoch %d: validation PPL %.4f (%s)", epoch, result.corpus_ppl,
                "best so far, saved" if improved else f"best stays {self.best:.4f}",
            )
            if improved:
                self.best = result.corpus_ppl
                save_best(model)
            history.append(entry)  # after the save: a kill in between re-runs this epoch's check
            write_json(history_path, history)
            if on_progress is not None:
                on_progress(dict(step=state.global_step, max_steps=state.max_steps, epoch=epoch,
                                 loss=entry["train_loss"], validation_ppl=result.corpus_ppl))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # Resumed from a checkpoint written at an epoch's last step, before that epoch was validated.
            epoch = state.epoch or 0
            done = {e["epoch"] for e in history}
            if state.global_step > 0 and abs(epoch - round(epoch)) < 1e-6 and round(epoch) not in done:
                self._validate(model, state)

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            self._validate(model, state)
            control.should_save = True  # a checkpoint at every epoch end, after its validation is on disk

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # through logging (Prefect's run logger in a run), not print
                log.info("step %d/%d (epoch %.2f): loss %.4f, learning rate %.2e", state.global_step,
                         state.max_steps, state.epoch or 0, logs["loss"], logs.get("learning_rate", 0.0))
            if on_progress is not None and logs and "loss" in logs:
                on_progress(dict(step=state.global_step, max_steps=state.max_steps, epoch=state.epoch,
                                 loss=logs["loss"], validation_ppl=self.best if self.best < math.inf else None))

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
    on_progress: Optional[Progress] = None,
) -> dict:
    """Train for ``settings.epochs`` epochs, scoring validation after each and keeping the best.

    Checkpoints go to ``work_dir`` every ``settings.checkpoint_steps`` steps
    and at every epoch end. If ``work_dir`` already holds a checkpoint (a run
    that was killed), training resumes from the latest one, and the epochs
    validated before it are taken from ``work_dir/history.json``. ``save_best``
    must therefore write somewhere that survives a kill too (the caller's
    work directory), since the best epoch may be one before the interruption.

    Args:
        model: the model to train (already wrapped for PEFT if needed).
        tokenizer: its tokenizer.
        train_dataset: rows with ``input_ids`` (and whatever ``collator`` reads).
        validation_sentences: scored after every epoch with ftflow's perplexity.
        settings: epochs, learning rate, batch size, seed, device, checkpoint interval.
        work_dir: the Trainer's output directory (checkpoints, history).
        save_best: called with the model whenever validation perplexity improves.
        collator: defaults to right padding with :class:`PadCollator`.
        trainer_cls: a ``transformers.Trainer`` subclass (distillation brings its own).
        trainer_kwargs: extra keyword arguments for ``trainer_cls``.
        on_progress: called with ``{step, max_steps, epoch, loss, validation_ppl}`` on every log and validation.

    Returns:
        ``{"history": [...per epoch...], "best_epoch", "best_validation_ppl", "baseline_validation",
        "resumed_from"}``.
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    history_path = work_dir / HISTORY
    checkpoint = latest_checkpoint(work_dir)
    history: list[dict] = []
    baseline_path = work_dir / "baseline.json"
    if checkpoint is not None:
        step = int(checkpoint.name.split("-")[-1])
        saved = read_json(history_path) if history_path.is_file() else []
        history = [e for e in saved if e["step"] <= step]
        before = read_json(baseline_path)
        log.info("resuming from %s (step %d; %d epoch(s) already validated)", checkpoint.name, step, len(history))
    else:
        history_path.unlink(missing_ok=True)
        before = score_sentences(
            model, tokenizer, validation_sentences, batch_size=settings.eval_batch_size,
            max_length=settings.max_length, progress=False, logits_chunk_tokens=settings.logits_chunk_tokens,
        ).to_dict()
        write_json(baseline_path, before)
    log.info("before training: validation PPL %.4f", before["corpus_ppl"])
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
        save_strategy="steps",
        save_steps=settings.checkpoint_steps,
        save_total_limit=1,
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
        callbacks=[_validation_callback(tokenizer, validation_sentences, settings, save_best, history,
                                        history_path, on_progress)],
        **(trainer_kwargs or {}),
    )
    trainer.remove_callback(PrinterCallback)  # its print() of every log; the callback above logs them instead
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    best = min(history, key=lambda e: e["validation"]["corpus_ppl"])
    return {
        "history": history,
        "best_epoch": best["epoch"],
        "best_validation_ppl": best["validation"]["corpus_ppl"],
        "baseline_validation": before,
        "resumed_from": checkpoint.name if checkpoint is not None else None,
    }


def train_peft(
    base_path: str,
    tokenizer,
    train_sentences: Sequence[str],
    validation_sentences: Sequence[str],
    peft_config,
    *,
    settings: TrainSettings,
    work_dir: Path,
    adapter_dir: Path,
    quantization: Optional[dict] = None,
    trust_remote_code: bool = False,
    on_progress: Optional[Progress] = None,
) -> dict:
    """A PEFT method (LoRA, prefix tuning, ...) on a base model; the best epoch's adapter saved to ``adapter_dir``.

    With ``settings.precision == "nf4"`` the base model is loaded in 4 bits
    (``quantization``: see :func:`ftflow.models.quantization_config`) and made
    ready with PEFT's ``prepare_model_for_kbit_training``: QLoRA.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from ftflow.models import load_model

    set_seed(settings.seed)
    model = load_model(base_path, settings.precision, settings.device, trainable=True,
                       trust_remote_code=trust_remote_code, quantization=quantization)
    if settings.precision == "nf4":
        model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: %d trainable of %d parameters", type(peft_config).__name__, trainable, total)
    result = fit(
        model, tokenizer, encode_dataset(tokenizer, train_sentences, settings.max_length),
        validation_sentences, settings, work_dir, save_best=lambda m: m.save_pretrained(adapter_dir),
        on_progress=on_progress,
    )
    result["trainable_parameters"] = int(trainable)
    return result


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
    quantization: Optional[dict] = None,
    on_progress: Optional[Progress] = None,
) -> dict:
    """LoRA (QLoRA when ``settings.precision`` is nf4); the best epoch's adapter saved in PEFT's format."""
    from peft import LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    lora = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    return train_peft(base_path, tokenizer, train_sentences, validation_sentences, lora, settings=settings,
                      work_dir=work_dir, adapter_dir=adapter_dir, quantization=quantization,
                      trust_remote_code=trust_remote_code, on_progress=on_progress)


def train_prefix(
    base_path: str,
    tokenizer,
    train_sentences: Sequence[str],
    validation_sentences: Sequence[str],
    *,
    num_virtual_tokens: int,
    settings: TrainSettings,
    work_dir: Path,
    adapter_dir: Path,
    trust_remote_code: bool = False,
    on_progress: Optional[Progress] = None,
) -> dict:
    """PEFT prefix tuning: ``num_virtual_tokens`` trained key/value prefixes in every layer."""
    from peft import PrefixTuningConfig

    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    return train_peft(base_path, tokenizer, train_sentences, validation_sentences, prefix, settings=settings,
                      work_dir=work_dir, adapter_dir=adapter_dir, trust_remote_code=trust_remote_code,
                      on_progress=on_progress)


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
    on_progress: Optional[Progress] = None,
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
               collator=collator, trainer_cls=trainer_cls, trainer_kwargs=trainer_kwargs, on_progress=on_progress)
