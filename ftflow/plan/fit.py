"""How a training run fits its memory budget: micro-batches, checkpointing, 8-bit state, half-precision weights.

:func:`choose_fit` is pure (a model config and numbers in, a :class:`FitPlan`
out; nothing is loaded). It starts from the run as configured (the configured
``batch_size`` in one pass, no gradient checkpointing, fp32 AdamW, fp32
master weights for full fine-tuning) and, while the predicted peak
(:func:`ftflow.plan.predict.predict_training`) is over the training budget, turns
on the next technique of ``fit_order`` (``training.fit_order``):

``micro_batch``
    the configured batch becomes the *effective* batch: micro-batches of the
    largest divisor of it that fits, with gradient accumulation making up the
    rest, so every optimizer step sees the same sentences, and the loss is
    the mean over all of their target tokens (the Trainer's
    ``num_items_in_batch``): learning rate and steps do not change.
``checkpointing``
    gradient checkpointing: each decoder layer keeps only its input and is
    recomputed in backward (about a third more compute).
``optimizer_8bit``
    bitsandbytes' 8-bit AdamW state (about 2 bytes per trained weight instead
    of 8); bf16 weights are then updated with stochastic rounding
    (:mod:`ftflow.train.optimizers`).
``half_weights``
    full fine-tuning and distillation only: the trained weights in bf16
    instead of fp32 (master weights, or the fp32 model itself), with an
    update that keeps small steps: optimi's Kahan-compensated AdamW, or
    stochastic rounding with 8-bit state. Needs bf16 on the device.
``paged_optimizer``
    the 8-bit state in CUDA unified memory (bitsandbytes' paged AdamW): the
    driver moves it to host memory under pressure. CUDA only, and predicted
    (only the largest tensor's state counted resident), not measured here.

Once the run fits, the techniques turned on are tried off again, the last
one first (a technique late in the order is the last resort), and each stays
off if the run still fits without it; finally the micro-batch is raised to
the largest divisor of the batch that still fits. So a technique is on only
when the run does not fit without it. A run that fits with everything in
``fit_order`` on is skipped, with its smallest predicted peak and why.

A prediction can be short of what the device needs (fragmentation, another
process, a kernel's workspace). :func:`next_fit` (pure, like the rest) gives
the setting to try after a run ran out of memory: the next technique of
``fit_order`` not on yet, else the micro-batch halved; the effective batch
never changes, so the retried run, resumed from its last checkpoint,
optimises the same thing (:func:`ftflow.train.runner.run_job`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Protocol, Sequence, get_args

from pydantic import BaseModel, ConfigDict

from ftflow.config import DEFAULT_FIT_ORDER, FitTechnique
from ftflow.errors import UserError
from ftflow.plan.predict import GB, MemoryPrediction, predict_training
from ftflow.plan.decide import longest_sequence
from ftflow.models.architecture import model_config_for
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS

FIT_TECHNIQUES: tuple[str, ...] = get_args(FitTechnique)
# DEFAULT_FIT_ORDER (training.fit_order's default, ftflow/config.py): the cheapest in time and quality first.

FULL_METHODS = ("full", "distill")


@dataclass(frozen=True)
class _Setting:
    micro_batch_size: int
    gradient_checkpointing: bool
    optimizer: str  # adamw | adamw-8bit | paged-adamw-8bit
    half_weights: bool


class FitPlan(BaseModel):
    """How one training run is carried out to fit the training budget (recorded as ``fit_plan`` in its manifest).

    Attributes:
        method: the run's method (``qlora`` for LoRA on a 4-bit model).
        model: the model's short name (for the summary line).
        precision: the model's precision in the config.
        fits: whether any setting fits; False means the run is skipped (``reason`` says why).
        batch_size: the effective batch (the configured ``batch_size``).
        micro_batch_size: sentences per forward pass.
        accumulation_steps: micro-batches per optimizer step (``batch_size / micro_batch_size``).
        gradient_checkpointing: activations recomputed in backward.
        optimizer: ``adamw`` (torch, fp32 moments; optimi's Kahan AdamW for bf16 weights), ``adamw-8bit`` or
            ``paged-adamw-8bit`` (bitsandbytes).
        train_precision: precision the model is loaded and trained in (bf16 for an fp32 model with ``half_weights``).
        master_weights: full fine-tuning / distillation of a half-precision run: ``fp32`` (master weights under
            autocast) or ``bf16`` (the weights themselves); None otherwise.
        update: how trained weights are updated: ``adamw``, ``adamw-kahan`` (compensated bf16),
            ``adamw-8bit``, ``adamw-8bit-stochastic-rounding`` (bf16 weights).
        techniques: the ``fit_order`` techniques the run needed, in that order.
        fit_order: the order they were tried in.
        peak_bytes: predicted peak of the chosen setting (when skipped: the smallest tried).
        budget_bytes: the training budget.
        max_length: tokens of the longest training sentence planned for.
        prediction: the chosen setting's :class:`ftflow.plan.predict.MemoryPrediction` (as a dict).
        tried: every setting predicted, in order, with its peak.
        reason: one line: what was chosen and why, or why nothing fits.
        oom_retries: out-of-memory errors on the device that led to this setting (:func:`next_fit`); 0 for the
            planned setting, whose prediction ``peak_bytes`` and ``prediction`` stay (they are not re-predicted).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    model: str
    precision: str
    fits: bool
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    gradient_checkpointing: bool
    optimizer: str
    train_precision: str
    master_weights: Optional[str]
    update: str
    techniques: tuple[str, ...]
    fit_order: tuple[str, ...]
    peak_bytes: int
    budget_bytes: int
    max_length: int
    prediction: dict[str, Any]
    tried: tuple[dict[str, Any], ...]
    reason: str
    oom_retries: int = 0

    @property
    def setting(self) -> str:
        """``micro-batch 2 x 2, checkpointing, adamw-8bit``: the setting alone (as ``tried`` names them)."""
        return _describe(_setting_of(self), self.batch_size)

    @property
    def summary(self) -> str:
        """``granite-3.3-8b-base lora: micro-batch 1 x 4 accumulation, checkpointing on, predicted 18.9 GB``."""
        if not self.fits:
            return f"{self.model} {self.method}: skipped, {self.reason}"
        parts = [f"micro-batch {self.micro_batch_size} x {self.accumulation_steps} accumulation"
                 if self.accumulation_steps > 1 else f"batch {self.batch_size}",
                 "checkpointing on" if self.gradient_checkpointing else "checkpointing off",
                 {"adamw": "fp32 AdamW", "adamw-8bit": "8-bit AdamW",
                  "paged-adamw-8bit": "paged 8-bit AdamW"}[self.optimizer]]
        if self.master_weights is not None or self.train_precision != self.precision:
            parts.append(f"{'fp32 master' if self.master_weights == 'fp32' else self.train_precision} weights "
                         f"({self.update})")
        if self.oom_retries:
            return (f"{self.model} {self.method}: {', '.join(parts)}, after {self.oom_retries} out-of-memory "
                    f"error(s) on the device (the plan predicted {self.peak_bytes / GB:.1f} GB, budget "
                    f"{self.budget_bytes / GB:g} GB)")
        return (f"{self.model} {self.method}: {', '.join(parts)}, predicted {self.peak_bytes / GB:.1f} GB "
                f"(budget {self.budget_bytes / GB:g} GB)")


def _describe(s: _Setting, batch_size: int) -> str:
    parts = [f"micro-batch {s.micro_batch_size} x {batch_size // s.micro_batch_size}"]
    if s.gradient_checkpointing:
        parts.append("checkpointing")
    if s.optimizer != "adamw":
        parts.append(s.optimizer)
    if s.half_weights:
        parts.append("bf16 weights")
    return ", ".join(parts)


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _weights(method: str, precision: str, s: _Setting) -> tuple[str, Optional[str], str]:
    """``(train_precision, master_weights, update)`` of a setting (see :class:`FitPlan`)."""
    full = method in FULL_METHODS
    train_precision = ("bf16" if s.half_weights else "fp32") if full and precision == "fp32" else precision
    master_weights = None
    if full and precision in ("bf16", "fp16"):
        master_weights = "bf16" if s.half_weights else "fp32"
    if full and s.half_weights:
        update = "adamw-8bit-stochastic-rounding" if s.optimizer != "adamw" else "adamw-kahan"
    else:
        update = "adamw-8bit" if s.optimizer != "adamw" else "adamw"
    return train_precision, master_weights, update


def _setting_of(plan: "FitPlan") -> _Setting:
    half = plan.method in FULL_METHODS and (plan.master_weights == "bf16"
                                            or (plan.precision == "fp32" and plan.train_precision == "bf16"))
    return _Setting(plan.micro_batch_size, plan.gradient_checkpointing, plan.optimizer, half)


def _applicable(technique: str, method: str, precision: str, device: str, bf16_supported: bool) -> bool:
    """Whether a technique can apply to the run at all (as :func:`choose_fit` decides it)."""
    if technique == "half_weights":
        return method in FULL_METHODS and bf16_supported and precision != "fp16"
    if technique == "paged_optimizer":
        return device == "cuda"
    if technique == "checkpointing":
        return method != "qlora"  # always on (prepare_model_for_kbit_training)
    return True


def choose_fit(
    config,
    precision: str,
    method: str,
    *,
    batch_size: int,
    max_length: int,
    budget_bytes: int,
    fit_order: Sequence[str] = DEFAULT_FIT_ORDER,
    eval_batch_size: Optional[int] = None,
    eval_length: Optional[int] = None,
    lora_r: int = 8,
    lora_dropout: float = 0.05,
    num_virtual_tokens: int = 8,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    device: str = "cuda",
    bf16_supported: bool = True,
    trust_remote_code: bool = False,
    name: str = "",
) -> FitPlan:
    """Choose micro-batch, checkpointing, optimizer state and trained-weights precision for one run (pure).

    See the module docstring for the techniques and the search. Half-precision
    models in full fine-tuning start from fp32 master weights under autocast
    (planned as an fp32 run, whose peak bounds theirs); ``half_weights`` then
    trains the bf16 weights themselves. QLoRA always checkpoints
    (``prepare_model_for_kbit_training``).

    Args:
        config: the model's transformers config (:func:`ftflow.models.architecture.model_config_for`).
        precision: the model's precision (fp32, bf16, fp16; nf4 with ``method="qlora"``).
        method: full, distill, lora, qlora or prefix (``lora`` on nf4 is planned as qlora).
        batch_size: the effective batch (sentences per optimizer step).
        max_length: tokens of the longest training sentence.
        budget_bytes: the training budget.
        fit_order: techniques to try, in order (a subset of :data:`FIT_TECHNIQUES`; empty: only check).
        eval_batch_size, eval_length: the validation pass between epochs (see ``predict_training``).
        lora_r, lora_dropout, num_virtual_tokens: the method's own settings.
        logits_chunk_tokens, trust_remote_code: see ``predict_training``.
        device: ``cuda`` or ``cpu`` (paging needs CUDA).
        bf16_supported: whether the device trains in bf16 (``half_weights`` needs it).
        name: the model's short name, for the summary.

    Returns:
        The plan; ``fits`` False when nothing in ``fit_order`` makes the run fit.
    """
    unknown = [t for t in fit_order if t not in FIT_TECHNIQUES]
    repeated = sorted({t for t in fit_order if list(fit_order).count(t) > 1})
    if unknown or repeated or batch_size < 1:
        raise ValueError(f"choose_fit: fit_order must name each of {FIT_TECHNIQUES} at most once (unknown: "
                         f"{unknown}, repeated: {repeated}); batch_size must be >= 1 (got {batch_size})")
    if method == "lora" and precision == "nf4":
        method = "qlora"
    full = method in FULL_METHODS
    if full and precision == "fp16" and "half_weights" in fit_order:
        # fp16 weights cannot be trained without fp32 master weights (plan_precision): nothing to fall back to.
        fit_order = [t for t in fit_order if t != "half_weights"]
    applicable = [t for t in fit_order if _applicable(t, method, precision, device, bf16_supported)]

    def trained_precision(s: _Setting) -> str:
        if not full:
            return precision
        return "bf16" if s.half_weights else "fp32"  # fp32: the model itself, or fp32 master weights

    tried: list[dict[str, Any]] = []
    cache: dict[_Setting, MemoryPrediction] = {}

    def predict(s: _Setting) -> MemoryPrediction:
        if s not in cache:
            cache[s] = predict_training(
                config, trained_precision(s), method, s.micro_batch_size, max_length, lora_r=lora_r,
                num_virtual_tokens=num_virtual_tokens, lora_dropout=lora_dropout,
                gradient_checkpointing=True if method == "qlora" else s.gradient_checkpointing,
                eval_batch_size=eval_batch_size, eval_length=eval_length, logits_chunk_tokens=logits_chunk_tokens,
                device=device, trust_remote_code=trust_remote_code, optimizer=s.optimizer,
                accumulation_steps=batch_size // s.micro_batch_size)
            tried.append({"setting": _describe(s, batch_size), "peak_bytes": cache[s].peak_bytes})
        return cache[s]

    def fits(s: _Setting) -> bool:
        return predict(s).peak_bytes <= budget_bytes

    def turn(s: _Setting, technique: str, on: bool, micro: int) -> _Setting:
        if technique == "micro_batch":
            return replace(s, micro_batch_size=1 if on else micro)
        if technique == "checkpointing":
            return replace(s, gradient_checkpointing=on)
        if technique == "optimizer_8bit":
            return replace(s, optimizer=("paged-adamw-8bit" if s.optimizer == "paged-adamw-8bit" else "adamw-8bit")
                           if on else "adamw")
        if technique == "paged_optimizer":
            return replace(s, optimizer="paged-adamw-8bit" if on else
                           ("adamw-8bit" if "optimizer_8bit" in enabled else "adamw"))
        return replace(s, half_weights=on)

    setting = _Setting(batch_size, method == "qlora", "adamw", False)
    enabled: list[str] = []
    for technique in applicable:
        if fits(setting):
            break
        setting = turn(setting, technique, True, batch_size)
        enabled.append(technique)
    fitted = fits(setting)
    if fitted:
        # Each technique only where needed: undo the last resorts first, keep undone what is not needed.
        for technique in reversed(list(enabled)):
            if technique == "micro_batch" or (technique == "optimizer_8bit" and "paged_optimizer" in enabled):
                continue  # the micro-batch is raised below; paged state is 8-bit state
            candidate = turn(setting, technique, False, setting.micro_batch_size)
            if fits(candidate):
                setting = candidate
                enabled.remove(technique)
        if "micro_batch" in enabled:
            setting = next(replace(setting, micro_batch_size=m) for m in _divisors_descending(batch_size)
                           if fits(replace(setting, micro_batch_size=m)))
            if setting.micro_batch_size == batch_size:
                enabled.remove("micro_batch")
    else:
        setting = min(cache, key=lambda s: cache[s].peak_bytes)
    prediction = predict(setting)
    train_precision, master_weights, update = _weights(method, precision, setting)
    if fitted:
        needed = f" (needed: {', '.join(enabled)})" if enabled else " (nothing needed)"
        reason = (f"{_describe(setting, batch_size)}: predicted {prediction.peak_bytes / GB:.2f} GB <= training "
                  f"budget {budget_bytes / GB:.2f} GB{needed}")
    else:
        reason = (f"nothing in fit_order {list(fit_order)} fits: the smallest predicted peak is "
                  f"{prediction.peak_bytes / GB:.2f} GB ({_describe(setting, batch_size)}), over the training "
                  f"budget of {budget_bytes / GB:.2f} GB at {max_length} tokens; raise training.memory_budget_gb, "
                  "add techniques to training.fit_order, or train a smaller model (or LoRA instead of in full)")
    return FitPlan(
        method=method, model=name, precision=precision, fits=fitted, batch_size=batch_size,
        micro_batch_size=setting.micro_batch_size, accumulation_steps=batch_size // setting.micro_batch_size,
        gradient_checkpointing=setting.gradient_checkpointing, optimizer=setting.optimizer,
        train_precision=train_precision, master_weights=master_weights, update=update,
        techniques=tuple(t for t in fit_order if t in enabled) if fitted else tuple(applicable),
        fit_order=tuple(fit_order), peak_bytes=prediction.peak_bytes, budget_bytes=budget_bytes,
        max_length=max_length, prediction=prediction.to_dict(), tried=tuple(tried), reason=reason,
    )


def next_fit(plan: FitPlan, *, device: str = "cuda", bf16_supported: bool = True) -> Optional[FitPlan]:
    """The setting to try after a run with ``plan`` ran out of device memory (pure); None when nothing is left.

    The first technique of ``plan.fit_order`` that is not on yet and applies to the run is turned on
    (``micro_batch``: the micro-batch halved, gradient accumulation making up the rest; ``optimizer_8bit``,
    ``paged_optimizer``: that optimizer state; ``checkpointing``; ``half_weights``: bf16 trained weights);
    when every one is on, the micro-batch is halved (to the largest divisor of the batch at most half of it),
    down to 1. Nothing outside ``fit_order`` is used. ``batch_size``, the effective batch, never changes.

    Args:
        plan: the setting the run was using (the planned one, or an earlier retry's).
        device: ``cuda`` or ``cpu`` (paged state needs CUDA).
        bf16_supported: whether the device trains in bf16 (``half_weights`` needs it).

    Returns:
        The next setting, with ``oom_retries`` one more and ``reason`` saying what changed, or None.
    """
    if not plan.fits:
        raise ValueError(f"next_fit: {plan.model} {plan.method} was not trained ({plan.reason}); nothing to retry")
    old = _setting_of(plan)

    def halved(s: _Setting) -> Optional[_Setting]:
        smaller = [d for d in _divisors_descending(plan.batch_size) if d <= s.micro_batch_size // 2]
        return replace(s, micro_batch_size=smaller[0]) if smaller else None

    on = {"micro_batch": old.micro_batch_size < plan.batch_size, "checkpointing": old.gradient_checkpointing,
          "optimizer_8bit": old.optimizer != "adamw", "half_weights": old.half_weights,
          "paged_optimizer": old.optimizer == "paged-adamw-8bit"}
    new, added = None, None
    for technique in plan.fit_order:
        if on[technique] or not _applicable(technique, plan.method, plan.precision, device, bf16_supported):
            continue
        if technique == "micro_batch":
            new = halved(old)
        elif technique == "checkpointing":
            new = replace(old, gradient_checkpointing=True)
        elif technique == "optimizer_8bit":
            new = replace(old, optimizer="adamw-8bit")
        elif technique == "paged_optimizer":
            new = replace(old, optimizer="paged-adamw-8bit")
        else:
            new = replace(old, half_weights=True)
        if new is not None:
            added = technique
            break
    if new is None and "micro_batch" in plan.fit_order:
        new, added = halved(old), "micro_batch"
    if new is None:
        return None
    change = "halved the micro-batch" if added == "micro_batch" else f"turned on {added}"
    train_precision, master_weights, update = _weights(plan.method, plan.precision, new)
    techniques = tuple(t for t in plan.fit_order if t in plan.techniques or t == added)
    return plan.model_copy(update=dict(
        micro_batch_size=new.micro_batch_size, accumulation_steps=plan.batch_size // new.micro_batch_size,
        gradient_checkpointing=new.gradient_checkpointing, optimizer=new.optimizer, train_precision=train_precision,
        master_weights=master_weights, update=update, techniques=techniques, oom_retries=plan.oom_retries + 1,
        reason=f"out of memory on the device with {_describe(old, plan.batch_size)}: {change}, now "
               f"{_describe(new, plan.batch_size)} (the effective batch stays {plan.batch_size})"))


def out_of_memory_refit(device: str, bf16_supported: bool) -> Callable[[dict], Optional[dict]]:
    """:func:`next_fit` on fit plans as dicts (with their ``summary``), as :func:`ftflow.train.runner.run_job` takes them."""

    def refit(used: dict) -> Optional[dict]:
        plan = FitPlan.model_validate({k: v for k, v in used.items() if k != "summary"})
        following = next_fit(plan, device=device, bf16_supported=bf16_supported)
        return None if following is None else {**following.model_dump(mode="json"), "summary": following.summary}

    return refit


class TrainingJob(Protocol):
    """What :func:`plan_training_job` reads of a training job (:data:`ftflow.train.jobs.Job`, every method's class)."""

    method: str
    model: dict[str, Any]
    precision: str
    batch_size: int

    def memory_options(self) -> dict[str, Any]: ...


def plan_training_job(
    job: TrainingJob,
    *,
    tokenizer,
    train_sentences: Sequence[str],
    validation_sentences: Sequence[str],
    eval_batch_size: int,
    max_length: int,
    budget_bytes: int,
    fit_order: Sequence[str] = DEFAULT_FIT_ORDER,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    device: str = "cuda",
    bf16_supported: bool = True,
) -> FitPlan:
    """:func:`choose_fit` for one job on its own data: the longest training and validation sentences (tokenized)."""
    config = model_config_for(job.model["path"], job.model["trust_remote_code"])
    return choose_fit(
        config, job.precision, job.method, batch_size=job.batch_size,
        max_length=longest_sequence(tokenizer, train_sentences, max_length), budget_bytes=budget_bytes,
        fit_order=fit_order, eval_batch_size=eval_batch_size,
        eval_length=longest_sequence(tokenizer, validation_sentences, max_length),
        logits_chunk_tokens=logits_chunk_tokens, device=device, bf16_supported=bf16_supported,
        trust_remote_code=job.model["trust_remote_code"], name=job.model["name"], **job.memory_options())


class GridDoesNotFitError(UserError):
    """Not one combination of the teacher's LoRA grid fits the training budget: nothing after it can run."""


def check_grid_fits(plans: Sequence[FitPlan], titles: Sequence[str]) -> list[FitPlan]:
    """``plans`` if at least one grid combination fits; else one :class:`GridDoesNotFitError` saying why.

    The pipeline calls this before the first training run: every later stage needs the grid's best
    combination, so a grid that cannot fit is said once, with the figure, instead of after 24 skipped runs.
    """
    if any(plan.fits for plan in plans):
        return list(plans)
    smallest = min(zip(plans, titles), key=lambda pt: pt[0].peak_bytes)
    raise GridDoesNotFitError(
        f"no combination of the teacher's LoRA grid ({len(plans)} runs) fits the training budget: the smallest, "
        f"{smallest[1]}, {smallest[0].reason}. Nothing was trained.")


def training_flops_per_token(parameters: int, trainable: int, gradient_checkpointing: bool) -> int:
    """FLOPs of one training token: forward ``2 N``, backward ``2 N`` (activation gradients, through every
    weight) + ``2 N_trainable`` (weight gradients, trained weights only), plus ``2 N`` when checkpointing
    recomputes the forward. Full fine-tuning: ``6 N``; LoRA: about ``4 N``. Attention's own FLOPs
    (``O(L^2)``, small at sentence lengths) are left out."""
    return 2 * parameters + 2 * parameters + 2 * trainable + (2 * parameters if gradient_checkpointing else 0)


def run_compute(fit: FitPlan, epoch_tokens: int) -> dict[str, int]:
    """What a run's training costs, for the report's compute figures (successive halving against the grid):
    ``epoch_tokens`` (its training set's tokens, once) and ``flops_per_token`` (:func:`training_flops_per_token`
    with the fit's checkpointing)."""
    return {"epoch_tokens": int(epoch_tokens),
            "flops_per_token": training_flops_per_token(fit.prediction["parameters"],
                                                        fit.prediction["trainable_parameters"],
                                                        fit.gradient_checkpointing)}
