"""Training with the transformers Trainer: PEFT methods (LoRA, QLoRA, prefix tuning) and full fine-tuning.

Every training run follows one life cycle: seed, load, (wrap), fit with the
validation perplexity measured after every epoch, keep the best epoch on disk
in its library's standard format, free: when a training function returns (or
raises), its model, gradients and optimizer state are gone, nothing ftflow
holds points to them (no reference cycle through the Trainer's callbacks)
and :func:`ftflow.device.free_memory` has collected what the libraries' own
cycles hold. Distillation reuses :func:`fit` with its own Trainer subclass
and collator (see :mod:`ftflow.distill`).

Batches are packed where that is exact (:func:`batching_for`): the
sentences of a batch are packed into rows without pads between them,
position ids restart at every sentence and no token attends across a
sentence boundary, so each token's loss is the one it gets alone and the
batch loss (a mean over its target tokens) is the padded batch's, at fewer
tokens.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from ftflow.artifacts import read_json, write_json
from ftflow.device import free_memory, resolve_tf32, tf32
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, score_sentences
from ftflow.tokens import pack_batch, packed_row_tokens, pad_batch, pad_token_id, sentence_ids
from ftflow.train.rungs import RUNG_SCORE

log = logging.getLogger(__name__)

Packing = Literal["auto", "on", "off"]
Batching = Literal["packed", "length-grouped", "padded"]
PACKABLE_METHODS = ("lora", "qlora", "full", "distill")
"""Methods whose batches can be packed: every row the model sees is the sentences themselves."""


TRAINER_LOGS_DIR = "runs"  # where the Trainer's TensorBoard callback writes, under its output (work) directory
TENSORBOARD_DIR = "tensorboard"  # a finished run's copy of them, in its output directory


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
    checkpoint_steps: Optional[int] = 50
    """A Trainer checkpoint every this many optimizer steps, and at every epoch end; None: at epoch ends only
    (what full-weight runs do, :func:`train_full`)."""
    master_weights: Optional[str] = None
    """Full fine-tuning of a bf16/fp16 model: ``fp32`` keeps fp32 master weights and trains under autocast
    (the default); the half-precision name itself (``bf16``) keeps the weights in bf16 with a compensated
    update, for when fp32 master weights do not fit. See :func:`plan_precision`."""
    packing: Packing = "auto"
    """How training batches are formed: see :func:`batching_for`."""
    report_to: tuple[str, ...] = ()
    """Where the Trainer also logs the run's curves (``("tensorboard",)``: event files in ``work_dir/runs/``,
    offline); what it logs is the training loss and learning rate by step and the selection-split PPL per epoch."""
    micro_batch_size: Optional[int] = None
    """Sentences per forward pass; ``batch_size`` stays the sentences per optimizer step, gradient accumulation
    makes up the rest (must divide ``batch_size``; None = ``batch_size``). Chosen by :mod:`ftflow.plan.fit`."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (chosen by :mod:`ftflow.plan.fit` when needed)."""
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit"] = "adamw"
    """Optimizer state: torch AdamW, or bitsandbytes' (paged) 8-bit AdamW (:mod:`ftflow.train.optimizers`)."""
    tf32: Literal["auto", "on", "off"] = "auto"
    """fp32 matrix products of the training steps in TF32 (:func:`ftflow.device.resolve_tf32`: auto = where the
    GPU has it); scoring never uses TF32."""
    stop_step: Optional[int] = None
    """A rung of successive halving (:mod:`ftflow.train.rungs`): stop after this optimizer step, with a
    checkpoint and the selection split scored there; the schedule stays the whole run's. None: train to the end."""

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        micro = self.micro_batch_size or self.batch_size
        if micro < 1 or self.batch_size % micro:
            raise ValueError(f"micro_batch_size {micro} must divide batch_size {self.batch_size} (the effective "
                             "batch), so every optimizer step sees batch_size sentences")
        return self.batch_size // micro


def batching_for(packing: Packing, method: str, *, trust_remote_code: bool = False) -> Batching:
    """How a run's training batches are formed (recorded in its manifest as ``batching``).

    * ``packed``: the batch's sentences packed into rows
      (:func:`ftflow.tokens.pack_batch`: first-fit decreasing into the row
      budget of :func:`ftflow.tokens.packed_row_tokens`, the fewest computed
      tokens with attention no dearer than the padded batch's; a row shorter
      than the widest ends with a pad segment of its own), or into one row
      of [1, total tokens] under flash attention
      (as transformers' ``DataCollatorWithFlattening``). Position ids restart
      at 0 at every sentence and there is no attention mask: transformers'
      masking utilities build a block-diagonal causal mask from the position
      ids (sdpa, eager) or run flash attention's varlen kernel, so no token
      attends across sentences and each token's loss is exactly its loss
      alone. The start token of every sentence is not a target, so a
      boundary never asks sentence A's last token to predict sentence B. The
      loss stays the mean over the batch's target tokens (the padded batch's
      tokens), with as many sentences per step, so learning rate and step
      counts do not change. Computed tokens (rows x width) and attention
      (rows x width^2) stay at or below the padded batch's.
    * ``length-grouped``: padded batches of sentences of similar length
      (the Trainer's ``LengthGroupedSampler``, seeded): prefix tuning, whose
      virtual tokens PEFT prepends to each row, cannot be packed.
    * ``padded``: random batches right-padded to their longest sentence (the
      behaviour before packing).

    Args:
        packing: ``auto`` packs the methods in :data:`PACKABLE_METHODS` on
            transformers' own model code (remote code may not honour packed
            position ids: padded) and length-groups prefix tuning; ``on`` packs
            them on any model and refuses prefix tuning; ``off`` pads.
        method: the run's method (lora, qlora, prefix, full, distill).
        trust_remote_code: whether the model's code comes with its checkpoint.

    Returns:
        ``packed``, ``length-grouped`` or ``padded``.
    """
    if packing not in ("auto", "on", "off"):
        raise ValueError(f"packing must be auto, on or off, got {packing!r}")
    if method not in (*PACKABLE_METHODS, "prefix"):
        raise ValueError(f"batching_for: unknown method {method!r}; one of {', '.join((*PACKABLE_METHODS, 'prefix'))}")
    if packing == "off":
        return "padded"
    if method == "prefix":
        if packing == "on":
            raise ValueError("training.packing is on, but prefix tuning cannot be packed (PEFT prepends its virtual "
                             "tokens to every row): set training.packing to auto (prefix tuning then trains on "
                             "length-grouped batches) or disable prefix tuning")
        return "length-grouped"
    if packing == "auto" and trust_remote_code:
        return "padded"
    return "packed"


@dataclass(frozen=True)
class PrecisionPlan:
    """How one training run keeps and updates its trained weights (recorded in the run's manifest).

    Attributes:
        load: precision the base model is loaded (and scored before training) in.
        trained_weights: dtype of the weights the optimizer updates: ``fp32`` (full fine-tuning with fp32
            master weights, or PEFT adapters, which PEFT keeps in fp32) or ``bf16`` (the weights themselves).
        autocast: ``bf16`` / ``fp16`` mixed precision around forward and loss; None computes in the
            weights' own dtype.
        loss_scaling: fp16 gradients are scaled (the Trainer's GradScaler) so small ones do not flush to 0.
        optimizer: ``adamw`` (the Trainer's torch AdamW) or ``adamw-kahan`` (optimi's AdamW with Kahan-
            compensated bf16 updates, which keeps the part of each update that bf16 rounding drops);
            ``[paged-]adamw-8bit`` (bitsandbytes' 8-bit state), ``-stochastic-rounding`` when its weights are
            bf16 (:mod:`ftflow.train.optimizers`: unbiased rounding instead of the compensation buffer).
    """

    load: str
    trained_weights: str
    autocast: Optional[str]
    loss_scaling: bool
    optimizer: Literal["adamw", "adamw-kahan", "adamw-8bit", "adamw-8bit-stochastic-rounding", "paged-adamw-8bit",
                       "paged-adamw-8bit-stochastic-rounding"]

    def to_dict(self) -> dict:
        return asdict(self)


HALF = ("bf16", "fp16")


def plan_precision(method: Literal["full", "peft"], precision: str, device: str, *,
                   master_weights: Optional[str] = None, compute_dtype: Optional[str] = None,
                   optimizer: str = "adamw") -> PrecisionPlan:
    """Which weights a run trains in which dtype, under which autocast, with which optimizer step.

    AdamW on bf16 weights loses every update smaller than half a bf16 step of
    the weight (about 0.4% of its size): at learning rate 2e-5 most weights of
    a model never move. So:

    * ``full`` on bf16 or fp16: fp32 master weights under bf16/fp16 autocast
      (``master_weights`` ``fp32`` or None, the default: 16 bytes per parameter
      for weights, gradients and AdamW moments). When those do not fit, the
      caller (the memory plan) passes ``master_weights="bf16"``: the weights stay
      bf16 and optimi's Kahan-compensated AdamW keeps the rounding residue in a
      bf16 buffer (10 bytes per parameter). fp16 weights cannot be trained that
      way (fp16 needs loss scaling, and the Trainer's GradScaler refuses fp16
      gradients), so ``master_weights="fp16"`` is refused.
    * ``peft`` (LoRA, prefix tuning) on a bf16/fp16 base: the adapters are fp32
      (PEFT), the frozen base computes in its dtype; autocast in that dtype.
    * QLoRA (``precision == "nf4"``): the autocast is ``compute_dtype`` (None
      for fp32), so the Trainer never silently computes the 4-bit matmuls in
      another dtype than the one configured.
    * fp16 autocast comes with loss scaling, which the Trainer only has on
      CUDA; fp16 training on a CPU is refused.

    Args:
        method: ``full`` (every weight trained: full fine-tuning, distillation) or ``peft``.
        precision: the run's precision: fp32, bf16, fp16 or nf4 (QLoRA).
        device: ``cpu`` or ``cuda``.
        master_weights: ``full`` on bf16/fp16 only: ``fp32`` (default) or the precision itself.
        compute_dtype: QLoRA's 4-bit compute dtype (``bf16`` when not given, bitsandbytes' default here).
        optimizer: ``adamw`` or bitsandbytes' ``adamw-8bit`` / ``paged-adamw-8bit`` state (chosen by
            :mod:`ftflow.plan.fit`); on bf16 weights the 8-bit update rounds stochastically.

    Returns:
        The plan.
    """
    problems = []
    if method == "full" and precision == "nf4":
        problems.append("4-bit (nf4) weights cannot be fine-tuned in full; use QLoRA (LoRA on the 4-bit model)")
    if master_weights is not None and method != "full":
        problems.append(f"master_weights={master_weights!r} only applies to full fine-tuning (this run: {method}; "
                        "PEFT adapters are always fp32)")
    elif master_weights not in (None, "fp32") and (precision not in HALF or master_weights != precision):
        problems.append(f"master_weights must be fp32 or, for a bf16/fp16 model, its own precision; got "
                        f"{master_weights!r} for a {precision} model")
    if method == "full" and precision == "fp16" and master_weights == "fp16":
        problems.append("fp16 weights cannot be trained in fp16 (updates round away and fp16 gradients need loss "
                        "scaling, which needs fp32 master weights): give the run room for fp32 master weights "
                        "(smaller batch_size or max_length), use bf16 on a GPU that has it, or train LoRA instead")
    if problems:
        raise ValueError("plan_precision: " + "; ".join(problems))
    if precision == "fp32":
        plan = PrecisionPlan("fp32", "fp32", None, False, "adamw")
    elif precision == "nf4":
        compute = compute_dtype or "bf16"
        autocast = None if compute == "fp32" else compute
        plan = PrecisionPlan("nf4", "fp32", autocast, autocast == "fp16", "adamw")
    elif method == "peft":
        plan = PrecisionPlan(precision, "fp32", precision, precision == "fp16", "adamw")
    elif master_weights in (None, "fp32"):
        plan = PrecisionPlan(precision, "fp32", precision, precision == "fp16", "adamw")
    else:
        plan = PrecisionPlan(precision, "bf16", None, False, "adamw-kahan")
    if optimizer not in ("adamw", "adamw-8bit", "paged-adamw-8bit"):
        raise ValueError(f"plan_precision: optimizer must be adamw, adamw-8bit or paged-adamw-8bit, got {optimizer!r}")
    if optimizer != "adamw":
        rounding = "-stochastic-rounding" if plan.trained_weights == "bf16" else ""
        plan = PrecisionPlan(plan.load, plan.trained_weights, plan.autocast, plan.loss_scaling, optimizer + rounding)
    if plan.loss_scaling and device != "cuda":
        raise ValueError(f"fp16 training needs loss scaling, which the Trainer only does on CUDA; on {device} train "
                         "in bf16 or fp32 instead (precision, or qlora.compute_dtype)")
    return plan


def _autocast(plan: PrecisionPlan, device: str):
    """The autocast context the Trainer trains under, for scoring the model the same way."""
    if plan.autocast is None:
        return nullcontext()
    import torch

    return torch.autocast(device_type=device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[plan.autocast])


def kahan_adamw(settings: "TrainSettings"):
    """``(optimi.AdamW, kwargs)`` for the Trainer: AdamW with Kahan-compensated bf16 updates."""
    try:
        import optimi
    except ImportError as exc:
        raise ImportError(f"bf16 weights without fp32 master weights need torch-optimi: pip install torch-optimi "
                          f"({exc})") from None
    # The Trainer's AdamW defaults (betas 0.9/0.999, eps 1e-8), so both paths optimise the same thing.
    return optimi.AdamW, {"lr": settings.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8, "kahan_sum": True}


Progress = Callable[[dict], None]
HISTORY = "history.json"


def encode_dataset(tokenizer, sentences: Sequence[str], max_length: int):
    """A ``datasets.Dataset`` of ``input_ids`` (ftflow's encoding), ``sentence_index`` and ``length`` (tokens)."""
    import datasets

    ids = [sentence_ids(tokenizer, text, max_length)[0] for text in sentences]
    return datasets.Dataset.from_dict({"input_ids": ids, "sentence_index": list(range(len(ids))),
                                       "length": [len(row) for row in ids]})


class PadCollator:
    """Right-pads a list of dataset rows into a training batch (see :func:`ftflow.tokens.pad_batch`)."""

    def __init__(self, pad_id: int, batching: Batching = "padded"):
        self.pad_id = pad_id
        self.batching = batching

    def __call__(self, rows: list[dict]) -> dict:
        return pad_batch([row["input_ids"] for row in rows], self.pad_id, "right")


class PackCollator:
    """Packs a list of dataset rows into rows without pads between sentences (see :func:`batching_for`).

    :func:`ftflow.tokens.pack_batch`: rows of the budget
    :func:`ftflow.tokens.packed_row_tokens` chooses (the fewest computed
    tokens whose attention costs no more than the padded batch's), or one
    row (``one_row``, what flash attention's varlen kernel needs; the same
    batch as transformers' ``DataCollatorWithFlattening``).
    """

    batching: Batching = "packed"

    def __init__(self, pad_id: int, one_row: bool = False):
        self.pad_id = pad_id
        self.one_row = one_row

    def __call__(self, rows: list[dict]) -> dict:
        batch_ids = [list(row["input_ids"]) for row in rows]
        row_tokens = None if self.one_row else packed_row_tokens([len(ids) for ids in batch_ids])
        return pack_batch(batch_ids, self.pad_id, row_tokens)


def collator_for(batching: Batching, tokenizer, one_row: bool = False):
    """The plain (non-distillation) collator of a batching: packed (``one_row``: into a single row), or padded."""
    if batching == "packed":
        return PackCollator(pad_token_id(tokenizer), one_row=one_row)
    return PadCollator(pad_token_id(tokenizer), batching)


def _flash_attention(model) -> bool:
    """Whether the model runs flash attention, whose varlen path takes packed sentences in one row only."""
    return "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The Trainer checkpoint with the most steps whose state file was written (a killed save has none)."""
    complete = [p for p in Path(directory).glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _validation_callback(tokenizer, sentences, settings: TrainSettings, plan: PrecisionPlan, save_best: Callable,
                         history: list, history_path: Path, on_progress: Optional[Progress]):
    from transformers import TrainerCallback

    class ValidationPerplexity(TrainerCallback):
        """Scores validation after every epoch, saves the best epoch, keeps the history on disk."""

        best = min((e["validation"]["corpus_ppl"] for e in history), default=math.inf)
        validation_seconds = 0.0  # spent in here (scoring, saving the best): not training
        # A weak reference, set once the Trainer exists (fit): the Trainer holds this callback, so a strong one
        # would make a cycle that keeps the model, its gradients and the optimizer state alive after the run.
        trainer: Optional[weakref.ref] = None

        def _validate(self, model, state) -> None:
            started = time.perf_counter()
            was_training = model.training
            result = _score(model, tokenizer, sentences, settings, plan)
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
            self.validation_seconds += time.perf_counter() - started
            trainer = self.trainer() if self.trainer is not None else None
            if trainer is not None and trainer.args.report_to:
                # eval_* keys: TensorBoard shows them as eval/<name>, by step, beside train/loss.
                trainer.log({"eval_selection_ppl": result.corpus_ppl,
                             "eval_selection_bits_per_byte": result.bits_per_byte})
            del trainer
            if on_progress is not None:
                on_progress(dict(step=state.global_step, max_steps=state.max_steps, epoch=epoch,
                                 loss=entry["train_loss"], validation_ppl=result.corpus_ppl))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # Resumed from a checkpoint written at an epoch's last step, before that epoch was validated.
            epoch = state.epoch or 0
            done = {e["epoch"] for e in history}
            if state.global_step > 0 and abs(epoch - round(epoch)) < 1e-6 and round(epoch) not in done:
                self._validate(model, state)

        def on_step_end(self, args, state, control, **kwargs):
            if abs((state.epoch or 0) - round(state.epoch or 0)) < 1e-6:
                # An epoch's last step: its checkpoint is written at the epoch end, after the validation, not
                # also here when checkpoint_steps divides the step (the same checkpoint twice).
                control.should_save = False

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if abs((state.epoch or 0) - round(state.epoch or 0)) > 1e-6:
                return  # a rung stopped the run inside an epoch: the Trainer still calls this, not an epoch end
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


def _rung_callback(tokenizer, sentences, settings: TrainSettings, plan: PrecisionPlan, score_path: Path,
                   history: list):
    """Stops the run after ``settings.stop_step`` with a checkpoint, the selection split scored there first.

    A rung that falls on an epoch's last step takes the epoch's own validation (``history``, written by the
    validation callback, which runs first) as its score and the epoch end's checkpoint as its own: scoring the
    selection split and writing the checkpoint (for a full-weight run every weight and its optimizer state) a
    second time at the same step would change nothing.
    """
    import torch
    from transformers import TrainerCallback

    def keep(state, selection: dict) -> None:
        write_json(score_path, {"step": state.global_step, "max_steps": state.max_steps, "selection": selection})
        log.info("rung: stopped after step %d of %d, selection PPL %.4f", state.global_step, state.max_steps,
                 selection["corpus_ppl"])

    class RungStop(TrainerCallback):
        """Scores the selection split at the rung's step, then asks the Trainer for a checkpoint and the stop."""

        scoring_seconds = 0.0  # spent scoring inside an epoch: not training

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step < settings.stop_step:
                return
            control.should_training_stop = True
            if abs((state.epoch or 0) - round(state.epoch or 0)) < 1e-6:
                return  # an epoch's last step: its validation and checkpoint come next (on_epoch_end)
            started = time.perf_counter()
            was_training = model.training
            # The checkpoint saved next holds the RNG states the next rung resumes with: scoring must not move them.
            devices = [torch.cuda.current_device()] if settings.device == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                result = _score(model, tokenizer, sentences, settings, plan)
            model.train(was_training)
            keep(state, result.to_dict())
            control.should_save = True
            self.scoring_seconds += time.perf_counter() - started

        def on_epoch_end(self, args, state, control, **kwargs):
            if state.global_step < settings.stop_step:
                return
            if abs((state.epoch or 0) - round(state.epoch or 0)) > 1e-6:
                # Stopped inside an epoch, the Trainer still ends it, and with save_strategy "epoch" (full-weight
                # runs) would write the checkpoint just written again: every weight and its optimizer state, twice.
                control.should_save = False
                return
            validated = history[-1] if history else None
            if validated is None or validated["step"] != state.global_step:
                raise RuntimeError(f"rung at step {state.global_step}: the epoch's validation is not in the history "
                                   f"(last: {validated and validated['step']}); the validation callback must run first")
            keep(state, validated["validation"])

    return RungStop()


SETTING_CALLBACK = "TrainingSetting"
OPTIMIZER_FILE = "optimizer.pt"  # the Trainer's names, in each checkpoint
SCHEDULER_FILE = "scheduler.pt"


def _setting_callback(plan: PrecisionPlan, settings: TrainSettings, restore_schedule: Optional[Path]):
    """A callback that records the run's optimizer in every checkpoint, and restores a schedule on its own.

    The record is the Trainer's own mechanism for callback state (``ExportableState``: it lands in the
    checkpoint's ``trainer_state.json``, written with the checkpoint), read back by
    :func:`checkpoint_optimizer`. ``restore_schedule``: a checkpoint's ``scheduler.pt`` to load when its
    optimizer state was left out (the Trainer loads optimizer and schedule together or not at all).
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TrainingSetting(TrainerCallback, ExportableState):
        """Which optimizer (and micro-batch) wrote a checkpoint; the schedule resumed without the optimizer state."""

        def state(self) -> dict:
            return {"args": {}, "attributes": {"optimizer": plan.optimizer,
                                               "micro_batch_size": settings.batch_size // settings.accumulation_steps,
                                               "gradient_checkpointing": settings.gradient_checkpointing}}

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            # A checkpoint written without this callback: the Trainer's save expects its entry in the state.
            state.stateful_callbacks.setdefault(SETTING_CALLBACK, self.state())
            if restore_schedule is None:
                return
            import torch

            lr_scheduler.load_state_dict(torch.load(restore_schedule, map_location="cpu", weights_only=True))
            # A new optimizer starts at the schedule's first rate; the first step must use the resumed one.
            for group, rate in zip(optimizer.param_groups, lr_scheduler.get_last_lr()):
                group["lr"] = rate

    assert TrainingSetting.__name__ == SETTING_CALLBACK
    return TrainingSetting()


def checkpoint_optimizer(checkpoint: Path) -> Optional[str]:
    """The optimizer whose state a checkpoint holds (:class:`PrecisionPlan`'s ``optimizer``); None if unrecorded."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return None
    entry = (read_json(path).get("stateful_callbacks") or {}).get(SETTING_CALLBACK)
    if isinstance(entry, list):
        entry = entry[0] if entry else None
    return ((entry or {}).get("attributes") or {}).get("optimizer")


def _score(model, tokenizer, sentences: Sequence[str], settings: TrainSettings, plan: PrecisionPlan) -> "object":
    """Selection-split perplexity, under the run's autocast so every epoch (0 too) is scored the same way."""
    with _autocast(plan, settings.device):
        return score_sentences(model, tokenizer, sentences, batch_size=settings.eval_batch_size,
                               max_length=settings.max_length, progress=False,
                               logits_chunk_tokens=settings.logits_chunk_tokens)


def baseline_validation(model, tokenizer, sentences: Sequence[str], settings: TrainSettings, plan: PrecisionPlan,
                        work_dir: Path) -> dict:
    """The selection-split score before training (epoch 0), kept in ``work_dir`` for a resumed run.

    Call it on the base model *before* wrapping it (PEFT) or changing its
    dtype: epoch 0 is the base model's score, not the freshly initialised
    adapter's. A run that resumes from a checkpoint reads the stored score.
    """
    path = Path(work_dir) / "baseline.json"
    if latest_checkpoint(work_dir) is not None and path.is_file():
        return read_json(path)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    before = _score(model, tokenizer, sentences, settings, plan).to_dict()
    write_json(path, before)
    free_memory(settings.device)  # the scoring pass's cached activation blocks, before training allocates its own
    return before


def best_epoch(history: Sequence[dict], baseline_ppl: float) -> dict:
    """The best trained epoch, and whether it beat the base model (epoch 0) on the selection split.

    Returns:
        ``{"best_epoch": int | None, "best_trained_epoch": int, "best_validation_ppl": float,
        "improved": bool}``: ``best_epoch`` is None when no trained epoch has a
        lower selection perplexity than the base model, whose result then stays
        the better model; ``best_trained_epoch`` and ``best_validation_ppl``
        are always those of the best trained epoch (the model saved), so what
        training reached is reported as it was.
    """
    best = min(history, key=lambda e: e["validation"]["corpus_ppl"])  # ties: the earlier epoch
    ppl = best["validation"]["corpus_ppl"]
    improved = ppl < baseline_ppl
    return {"best_epoch": best["epoch"] if improved else None, "best_trained_epoch": best["epoch"],
            "best_validation_ppl": ppl, "improved": improved}


def fit(
    model,
    tokenizer,
    train_dataset,
    validation_sentences: Sequence[str],
    settings: TrainSettings,
    work_dir: Path,
    save_best: Callable,
    *,
    plan: Optional[PrecisionPlan] = None,
    baseline: Optional[dict] = None,
    collator=None,
    trainer_cls=None,
    trainer_kwargs: Optional[dict] = None,
    on_progress: Optional[Progress] = None,
    batching: Batching = "padded",
) -> dict:
    """Train for ``settings.epochs`` epochs, scoring validation after each and keeping the best.

    Checkpoints go to ``work_dir`` every ``settings.checkpoint_steps`` steps
    (None: none between epochs) and at every epoch end. If ``work_dir`` already
    holds a checkpoint (a run that was killed, or one that ran out of memory and
    is retried with another setting), training resumes from the latest one, and
    the epochs validated before it are taken from ``work_dir/history.json``.
    ``save_best`` must therefore write somewhere that survives a kill too (the
    caller's work directory), since the best epoch may be one before the
    interruption. The micro-batch may differ from the checkpoint's (the
    effective batch, hence steps and schedule, does not). An optimizer state the
    run's optimizer cannot load (fp32 AdamW moments under 8-bit AdamW, say) is
    not loaded: weights, step, schedule and data order resume, the optimizer
    state restarts from zero, and the result says so (``optimizer_state``).

    The Trainer is dropped before this returns, or raises: nothing it holds
    (optimizer state, gradients) outlives the call through this function.

    Args:
        model: the model to train (already wrapped for PEFT if needed).
        tokenizer: its tokenizer.
        train_dataset: rows with ``input_ids`` (and whatever ``collator`` reads).
        validation_sentences: scored after every epoch with ftflow's perplexity.
        settings: epochs, learning rate, batch size, seed, device, checkpoint interval.
        work_dir: the Trainer's output directory (checkpoints, history).
        save_best: called with the model whenever validation perplexity improves on the earlier epochs.
        plan: autocast, loss scaling and optimizer (:func:`plan_precision`); fp32 when not given.
        baseline: the base model's selection score (:func:`baseline_validation`), when ``model`` is no
            longer the base model (a fresh adapter); scored here from ``model`` otherwise.
        collator: defaults to :func:`collator_for` ``batching``; a given one must form the same batching (its
            ``batching`` attribute).
        trainer_cls: a ``transformers.Trainer`` subclass (distillation brings its own).
        trainer_kwargs: extra keyword arguments for ``trainer_cls``.
        on_progress: called with ``{step, max_steps, epoch, loss, validation_ppl}`` on every log and validation.
        batching: ``packed``, ``length-grouped`` or ``padded`` (:func:`batching_for`).

    Returns:
        ``{"history": [...per epoch...], "baseline_validation", "resumed_from", "optimizer_state" (None, resumed
        or restarted), "precision_plan", "batching", "tf32", "train_seconds"}`` and the keys of
        :func:`best_epoch`; ``tf32`` says whether the training steps ran in TF32 (``training``), why
        (``reason``), and that scoring did not (``scoring``: False).
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    plan = plan or plan_precision("full", "fp32", settings.device)
    one_row = _flash_attention(model)
    collator = collator or collator_for(batching, tokenizer, one_row=one_row)
    if getattr(collator, "batching", batching) != batching:
        raise ValueError(f"fit: the collator forms {collator.batching} batches but the run's batching is "
                         f"{batching}; build the collator for the same batching")
    if batching == "packed" and one_row and not getattr(collator, "one_row", False):
        raise ValueError("fit: the model runs flash attention, which takes packed sentences in one row only; "
                         "build the collator with one_row=True (or set training.packing to off)")
    if batching == "length-grouped" and "length" not in getattr(train_dataset, "column_names", ()):
        raise ValueError("fit: length-grouped batches need a 'length' column (tokens per sentence) in the training "
                         "dataset; build it with encode_dataset")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    history_path = work_dir / HISTORY
    checkpoint = latest_checkpoint(work_dir)
    history: list[dict] = []
    before = baseline if baseline is not None else baseline_validation(
        model, tokenizer, validation_sentences, settings, plan, work_dir)
    rung_path = work_dir / RUNG_SCORE
    if settings.stop_step is not None and checkpoint is not None and rung_path.is_file():
        rung = read_json(rung_path)
        if rung["step"] == settings.stop_step and int(checkpoint.name.split("-")[-1]) >= rung["step"]:
            # Killed after the rung's checkpoint, before its stage finished: the rung is done.
            log.info("the rung's checkpoint (step %d) and score are on disk: nothing to train", rung["step"])
            history = read_json(history_path) if history_path.is_file() else []
            history = [e for e in history if e["step"] <= rung["step"]]
            return {"history": history, **(best_epoch(history, before["corpus_ppl"]) if history else {}),
                    "baseline_validation": before, "resumed_from": checkpoint.name, "optimizer_state": "resumed",
                    "precision_plan": plan.to_dict(), "batching": batching, "train_seconds": 0.0, "rung": rung}
    rung_path.unlink(missing_ok=True)
    optimizer_state, restore_schedule = None, None
    if checkpoint is not None:
        step = int(checkpoint.name.split("-")[-1])
        saved = read_json(history_path) if history_path.is_file() else []
        history = [e for e in saved if e["step"] <= step]
        log.info("resuming from %s (step %d; %d epoch(s) already validated)", checkpoint.name, step, len(history))
        written_by = checkpoint_optimizer(checkpoint)
        optimizer_state = "resumed"
        if written_by is not None and written_by != plan.optimizer:
            # Another optimizer's state (fp32 AdamW moments for 8-bit AdamW, or the reverse) cannot be loaded:
            # the Trainer skips optimizer and schedule when the optimizer file is absent, the schedule is
            # restored on its own (_setting_callback).
            optimizer_state = "restarted"
            if (checkpoint / OPTIMIZER_FILE).is_file():  # kept aside until the next checkpoint replaces this one
                (checkpoint / OPTIMIZER_FILE).rename(checkpoint / f"{OPTIMIZER_FILE}.{written_by}")
            restore_schedule = checkpoint / SCHEDULER_FILE if (checkpoint / SCHEDULER_FILE).is_file() else None
            log.warning("%s holds %s optimizer state, which this run's %s optimizer cannot load: resuming the "
                        "weights, step, data order and learning-rate schedule%s from it; the optimizer state "
                        "restarts from zero", checkpoint.name, written_by, plan.optimizer,
                        "" if restore_schedule is not None else " (no schedule found: it restarts too)")
    else:
        history_path.unlink(missing_ok=True)
    log.info("before training (the base model): validation PPL %.4f", before["corpus_ppl"])
    log.info("precision: %s; batches: %s", plan.to_dict(), batching)
    on_cuda = settings.device == "cuda"
    kwargs = dict(trainer_kwargs or {})
    if plan.optimizer == "adamw-kahan":
        kwargs["optimizer_cls_and_kwargs"] = kahan_adamw(settings)
    elif plan.optimizer != "adamw":
        from ftflow.train.optimizers import adamw_8bit

        kwargs["optimizer_cls_and_kwargs"] = adamw_8bit(settings.learning_rate, weight_decay=settings.weight_decay,
                                                        paged=plan.optimizer.startswith("paged"))
    accumulation = settings.accumulation_steps
    if accumulation > 1 or settings.gradient_checkpointing:
        log.info("memory fit: micro-batch %d x %d accumulation (effective batch %d), gradient checkpointing %s",
                 settings.batch_size // accumulation, accumulation, settings.batch_size,
                 "on" if settings.gradient_checkpointing else "off")
    args = TrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=settings.epochs,
        # The configured batch is the effective one: micro-batches of its sentences, the loss normalised over
        # all their target tokens (the Trainer's num_items_in_batch), so lr and steps stay what they were.
        per_device_train_batch_size=settings.batch_size // accumulation,
        gradient_accumulation_steps=accumulation,
        activation_checkpointing=settings.gradient_checkpointing,
        # Non-reentrant checkpointing needs no input that requires grad (frozen embeddings under PEFT).
        activation_checkpointing_kwargs={"use_reentrant": False} if settings.gradient_checkpointing else None,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        logging_steps=max(1, len(train_dataset) // settings.batch_size // 4),
        # Epoch ends always (the callback asks for a save after each validation); steps too unless disabled.
        save_strategy="steps" if settings.checkpoint_steps else "epoch",
        save_steps=settings.checkpoint_steps or 500,
        save_total_limit=1,
        # The Trainer's own integrations, offline; the selection-split PPL joins them (the callback logs it).
        report_to=list(settings.report_to),  # TensorBoard: event files in work_dir/runs/<time>_<host>/
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not on_cuda,
        # The plan's autocast, nothing else: for QLoRA it is the configured compute dtype (fp16 brings the
        # Trainer's GradScaler), so the 4-bit matmuls are never silently computed in another dtype.
        bf16=plan.autocast == "bf16",
        fp16=plan.autocast == "fp16",
        remove_unused_columns=False,
        disable_tqdm=not settings.progress,
        # Seeded like the random sampler (the Trainer seeds torch before it draws the megabatches).
        train_sampling_strategy="group_by_length" if batching == "length-grouped" else "random",
        length_column_name="length",
    )
    trainer_cls = trainer_cls or Trainer
    validation = _validation_callback(tokenizer, validation_sentences, settings, plan, save_best, history,
                                      history_path, on_progress)
    rung_stop = (_rung_callback(tokenizer, validation_sentences, settings, plan, rung_path, history)
                 if settings.stop_step is not None else None)
    use_tf32, tf32_reason = resolve_tf32(settings.tf32, settings.device)
    log.info("TF32: %s", tf32_reason)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[validation, _setting_callback(plan, settings, restore_schedule),
                   *([rung_stop] if rung_stop is not None else [])],
        **kwargs,
    )
    try:
        trainer.remove_callback(PrinterCallback)  # its print() of every log; the callback above logs them instead
        validation.trainer = weakref.ref(trainer)  # its selection-split PPL goes through Trainer.log, to integrations
        with tf32(use_tf32):  # the selection-split scoring inside turns it off for itself (score_sentences)
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    finally:
        del trainer
    # Scoring the selection split (each epoch's validation, a rung's score inside an epoch) is not training.
    not_training = validation.validation_seconds + (rung_stop.scoring_seconds if rung_stop is not None else 0.0)
    rung = read_json(rung_path) if settings.stop_step is not None else None
    if rung is not None and not history:  # a rung before the first epoch's end: no epoch to choose from yet
        return {"history": history, "baseline_validation": before,
                "resumed_from": checkpoint.name if checkpoint is not None else None,
                "optimizer_state": optimizer_state, "precision_plan": plan.to_dict(), "batching": batching,
                "train_seconds": round(output.metrics["train_runtime"] - not_training, 3),
                "rung": rung}
    best = best_epoch(history, before["corpus_ppl"])
    if not best["improved"]:
        log.info("no epoch beat the base model (validation PPL %.4f; best epoch %d reached %.4f): the base model "
                 "stays the better one", before["corpus_ppl"], best["best_trained_epoch"], best["best_validation_ppl"])
    return {
        "history": history,
        **best,
        "baseline_validation": before,
        "resumed_from": checkpoint.name if checkpoint is not None else None,
        "optimizer_state": optimizer_state,
        "precision_plan": plan.to_dict(),
        "batching": batching,
        "tf32": {"setting": settings.tf32, "training": use_tf32, "scoring": False, "reason": tf32_reason},
        # The Trainer's run time (this session's, when resumed) less the validations between epochs.
        "train_seconds": round(output.metrics["train_runtime"] - not_training, 3),
        **({"rung": rung} if rung is not None else {}),
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
    batching: Batching = "padded",
) -> dict:
    """A PEFT method (LoRA, prefix tuning, ...) on a base model; the best epoch's adapter saved to ``adapter_dir``.

    With ``settings.precision == "nf4"`` the base model is loaded in 4 bits
    (``quantization``: see :func:`ftflow.models.loading.quantization_config`) and made
    ready with PEFT's ``prepare_model_for_kbit_training``: QLoRA. Its
    ``compute_dtype`` is the Trainer's autocast too (:func:`plan_precision`).
    Epoch 0 is the base model's score, taken before the model is wrapped.
    ``batching``: see :func:`batching_for` (the callers resolve it for their method).
    Nothing of the run is alive once this returns or raises (:func:`ftflow.device.free_memory`).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from ftflow.models.loading import DEFAULT_4BIT, load_model

    compute_dtype = {**DEFAULT_4BIT, **(quantization or {})}["compute_dtype"] if settings.precision == "nf4" else None
    plan = plan_precision("peft", settings.precision, settings.device, compute_dtype=compute_dtype,
                          optimizer=settings.optimizer)
    set_seed(settings.seed)
    model = load_model(base_path, settings.precision, settings.device, trainable=True,
                       trust_remote_code=trust_remote_code, quantization=quantization)
    try:
        baseline = baseline_validation(model, tokenizer, validation_sentences, settings, plan, work_dir)
        if settings.precision == "nf4":
            # Non-reentrant checkpointing: without the argument PEFT leaves torch's checkpoint to its reentrant
            # default, which recomputes through a hook that makes the frozen embeddings' output require grad.
            model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, peft_config)
        trainable, total = model.get_nb_trainable_parameters()
        log.info("%s: %d trainable of %d parameters", type(peft_config).__name__, trainable, total)
        result = fit(
            model, tokenizer, encode_dataset(tokenizer, train_sentences, settings.max_length),
            validation_sentences, settings, work_dir, save_best=lambda m: m.save_pretrained(adapter_dir),
            plan=plan, baseline=baseline, on_progress=on_progress, batching=batching,
        )
    finally:
        model = None  # the last name of the trained model here: gone before the memory is handed back
        free_memory(settings.device)
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
    method = "qlora" if settings.precision == "nf4" else "lora"
    return train_peft(base_path, tokenizer, train_sentences, validation_sentences, lora, settings=settings,
                      work_dir=work_dir, adapter_dir=adapter_dir, quantization=quantization,
                      trust_remote_code=trust_remote_code, on_progress=on_progress,
                      batching=batching_for(settings.packing, method, trust_remote_code=trust_remote_code))


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
    """PEFT prefix tuning: ``num_virtual_tokens`` trained key/value prefixes in every layer.

    The prefixes start at zero (PEFT's ``init_weights="zero"``): a zero key
    scores 0 against every query and a zero value adds nothing, so the
    untrained prefix only dilutes each attention head's weights a little and
    the model starts close to the base model. PEFT's default, N(0, 1) keys and
    values, starts far from it: on a tiny Llama of PPL 1.440, three zero
    prefixes give 1.516 and three random ones 2.179 (tests/unit/train/test_methods.py).
    Keys and values of real tokens (the base model's own cache) did worse than
    zeros on tiny models trained on single sentences, so they are not used.
    """
    from peft import PrefixTuningConfig

    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, init_weights="zero")
    return train_peft(base_path, tokenizer, train_sentences, validation_sentences, prefix, settings=settings,
                      work_dir=work_dir, adapter_dir=adapter_dir, trust_remote_code=trust_remote_code,
                      on_progress=on_progress,
                      batching=batching_for(settings.packing, "prefix", trust_remote_code=trust_remote_code))


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
    batching: Optional[Batching] = None,
) -> dict:
    """Every weight of a model trained; the best epoch saved as a full checkpoint (with tokenizer).

    A bf16/fp16 model is scored before training as loaded, then (by default)
    trained as fp32 master weights under autocast and saved in fp32; with
    ``settings.master_weights == "bf16"`` the weights stay bf16 and the update
    is Kahan-compensated (:func:`plan_precision`). ``batching`` defaults to
    :func:`batching_for` ``settings.packing`` for full fine-tuning; a caller
    with its own ``collator`` (distillation) passes the batching it was built for.
    Checkpoints are written at epoch ends only, whatever ``settings.checkpoint_steps``:
    each holds every weight and its optimizer state.
    """
    import torch
    from transformers import set_seed

    from ftflow.models.loading import load_model

    plan = plan_precision("full", settings.precision, settings.device, master_weights=settings.master_weights,
                          optimizer=settings.optimizer)
    if settings.checkpoint_steps is not None:
        # A full-weight checkpoint holds every weight and its optimizer state (a 2.5B model with fp32 AdamW:
        # ~30 GB); one every few steps would write terabytes over a study. Epoch ends only.
        log.info("full-weight run: checkpoints at epoch ends only (training.checkpoint_steps applies to PEFT runs)")
        settings = replace(settings, checkpoint_steps=None)
    set_seed(settings.seed)
    model = load_model(base_path, settings.precision, settings.device, trainable=True,
                       trust_remote_code=trust_remote_code)

    def save(m):
        m.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)

    if batching is None:
        batching = batching_for(settings.packing, "full", trust_remote_code=trust_remote_code)
    try:
        baseline = baseline_validation(model, tokenizer, validation_sentences, settings, plan, work_dir)
        if plan.trained_weights == "fp32" and settings.precision != "fp32":
            model = model.to(torch.float32)  # exact: every bf16/fp16 value is an fp32 value
        model.train()
        return fit(model, tokenizer, train_dataset, validation_sentences, settings, work_dir, save, plan=plan,
                   baseline=baseline, collator=collator, trainer_cls=trainer_cls, trainer_kwargs=trainer_kwargs,
                   on_progress=on_progress, batching=batching)
    finally:
        model = None  # the last name of the trained model here: gone before the memory is handed back
        free_memory(settings.device)
