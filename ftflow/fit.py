"""How a training run fits its memory budget: micro-batches, checkpointing, 8-bit state, half-precision weights.

:func:`choose_fit` is pure (a model config and numbers in, a :class:`FitPlan`
out; nothing is loaded). It starts from the run as configured (the configured
``batch_size`` in one pass, no gradient checkpointing, fp32 AdamW, fp32
master weights for full fine-tuning) and, while the predicted peak
(:func:`ftflow.memory.predict_training`) is over the training budget, turns
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
    (:mod:`ftflow.optimizers`).
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, get_args

from pydantic import BaseModel, ConfigDict

from ftflow.config import DEFAULT_FIT_ORDER, FitTechnique
from ftflow.errors import UserError
from ftflow.memory import (GB, MemoryPrediction, TrainingJob, longest_sequence, model_config_for, predict_training)
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
        prediction: the chosen setting's :class:`ftflow.memory.MemoryPrediction` (as a dict).
        tried: every setting predicted, in order, with its peak.
        reason: one line: what was chosen and why, or why nothing fits.
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
        config: the model's transformers config (:func:`ftflow.memory.model_config_for`).
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
    applicable = [t for t in fit_order
                  if not (t == "half_weights" and (not full or not bf16_supported))
                  and not (t == "paged_optimizer" and device != "cuda")
                  and not (t == "checkpointing" and method == "qlora")]

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
    train_precision = trained_precision(setting) if full and precision == "fp32" else precision
    master_weights = None
    if full and precision in ("bf16", "fp16"):
        master_weights = "bf16" if setting.half_weights else "fp32"
    if full and setting.half_weights:
        update = "adamw-8bit-stochastic-rounding" if setting.optimizer != "adamw" else "adamw-kahan"
    else:
        update = "adamw-8bit" if setting.optimizer != "adamw" else "adamw"
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


# ----------------------------------------------------------------------------- the study's runs, before running


ESTIMATED_TOKENS_PER_WORD = 1.5
"""Tokens per whitespace word assumed when a model's tokenizer is not available offline: BPE vocabularies of
30k-150k entries give 1.1-1.4 on lower-cased English sentences; 1.5 errs on the long side."""


@dataclass(frozen=True)
class TokenStats:
    """Token counts of one set of sentences under one model's tokenizer (start token included)."""

    sentences: int
    total: int
    longest: int
    exact: bool
    """Counted with the model's tokenizer; False: estimated at :data:`ESTIMATED_TOKENS_PER_WORD`."""

    def scaled(self, factor: float, longest_factor: float = 1.0) -> "TokenStats":
        """The statistics of a set ``factor`` times larger whose sentences are up to ``longest_factor`` longer."""
        return TokenStats(round(self.sentences * factor), round(self.total * factor * longest_factor),
                          math.ceil(self.longest * longest_factor), False)


def token_stats(tokenizer, sentences: Sequence[str], max_length: int) -> TokenStats:
    """Token counts of ``sentences`` as ftflow encodes them, or estimated from words when ``tokenizer`` is None."""
    if tokenizer is not None:
        from ftflow.tokens import sentence_ids

        lengths = [len(sentence_ids(tokenizer, s, max_length)[0]) for s in sentences]
        exact = True
    else:
        lengths = [min(max_length, 1 + math.ceil(ESTIMATED_TOKENS_PER_WORD * len(s.split()))) for s in sentences]
        exact = False
    return TokenStats(len(lengths), sum(lengths), max(lengths), exact)


def training_flops_per_token(parameters: int, trainable: int, gradient_checkpointing: bool) -> int:
    """FLOPs of one training token: forward ``2 N``, backward ``2 N`` (activation gradients, through every
    weight) + ``2 N_trainable`` (weight gradients, trained weights only), plus ``2 N`` when checkpointing
    recomputes the forward. Full fine-tuning: ``6 N``; LoRA: about ``4 N``. Attention's own FLOPs
    (``O(L^2)``, small at sentence lengths) are left out."""
    return 2 * parameters + 2 * parameters + 2 * trainable + (2 * parameters if gradient_checkpointing else 0)


GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    # name: (bf16 dense tensor-core peak, fp32 peak without TF32), TFLOP/s, from the vendors' data sheets.
    "a100-mig-3g.20gb": (312.0 * 42 / 108, 19.5 * 42 / 108),  # 42 of the A100's 108 SMs: the study's 20 GB slice
    "a100": (312.0, 19.5),
    "h100-sxm": (989.0, 67.0),
    "h100-pcie": (756.0, 51.0),
    "h200": (989.0, 67.0),
    "l40s": (362.0, 91.6),
    "l4": (121.0, 30.3),
    "a10": (125.0, 31.2),
}
"""Peaks the plan's time estimate divides by. fp32 matmuls run without TF32 (PyTorch's default), so fp32 models
train at the fp32 peak; bf16 weights, autocast and QLoRA's bf16 compute at the bf16 one."""
DEFAULT_GPU = "a100-mig-3g.20gb"
DEFAULT_UTILIZATION = 0.3
"""Share of the peak a fine-tuning run reaches (model FLOP utilisation): small batches of short sentences keep it
well under large-batch pretraining's 0.4-0.5."""


class PlannedRun(BaseModel):
    """One training run the config implies, with its fit and its compute (a row of ``ftflow plan``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    section: str
    title: str
    fit: FitPlan
    epochs: int
    train_tokens: int
    tokens_exact: bool
    compute_dtype: str
    train_flops: float
    eval_flops: float

    @property
    def flops(self) -> float:
        return self.train_flops + self.eval_flops

    def hours(self, gpu: str, utilization: float) -> float:
        """Wall-clock hours on ``gpu`` at ``utilization`` of its peak in the run's compute dtype."""
        bf16, fp32 = GPU_PEAK_TFLOPS[gpu]
        peak = (bf16 if self.compute_dtype == "bf16" else fp32) * 1e12
        return self.flops / (peak * utilization) / 3600


def _compute_dtype(fit: FitPlan) -> str:
    if fit.method == "qlora" or fit.train_precision in ("bf16", "fp16") or fit.master_weights == "fp32":
        return "bf16"  # bf16 weights, autocast over fp32 masters, QLoRA's compute dtype
    return "fp32"


def _section(method: str, train_set: str, in_grid: bool) -> str:
    if train_set != "main":
        return "3.4 augmentation"
    return {"lora": "3.1 LoRA grid" if in_grid else "3.1 per model", "qlora": "3.1 per model",
            "prefix": "3.2 prefix", "full": "3.3 full", "distill": "3.3 distillation"}[method]


def plan_study_runs(cfg, models: Sequence[dict], parameters: dict[str, int], stats: dict[str, dict[str, TokenStats]],
                    *, eval_batch_size: int, family: Optional[str] = None, device: str = "cuda",
                    bf16_supported: bool = True) -> tuple[list[PlannedRun], list[str]]:
    """Every training run ``cfg`` implies, each with its :class:`FitPlan` and compute, before anything runs.

    The family (teacher, student) is chosen by benchmarking; here it is ``family`` (default: the family of the
    largest model), its teacher the largest model and its student the largest within ``select.student_max_params``,
    as :func:`ftflow.selection.select_family` picks them. The per-model runs and the ablation use the best LoRA
    combination, known only after the grid: they are planned with the grid's largest rank and dropout (the most
    memory). Augmented ablation sets: ``augment.factor`` times the sentences, each up to ``random_insert`` longer.

    Args:
        cfg: the :class:`ftflow.config.PipelineConfig`.
        models: the benchmarked models as the runs see them (``name``, ``path``, ``family``, ``precision``,
            ``trust_remote_code``).
        parameters: exact parameter counts by model name.
        stats: by model name, :class:`TokenStats` of ``train``, ``validation`` and ``test``.
        eval_batch_size: the validation pass's batch size.
        family, device, bf16_supported: see above and :func:`choose_fit`.

    Returns:
        ``(runs, notes)``: the runs in the order the pipeline trains them (each once), and what was assumed.
    """
    from ftflow import design
    from ftflow.jobs import LoraJob

    family = family or max(models, key=lambda m: parameters[m["name"]])["family"]
    members = [m for m in models if m["family"] == family]
    if not members:
        raise ValueError(f"plan_study_runs: no model of family {family!r}; families: "
                         f"{sorted({m['family'] for m in models})}")
    teacher = max(members, key=lambda m: parameters[m["name"]])
    students = [m for m in members if m is not teacher and parameters[m["name"]] <= cfg.select.student_max_params]
    if not students:
        raise ValueError(f"family {family!r} has no student within select.student_max_params")
    student = max(students, key=lambda m: parameters[m["name"]])
    selection = design.Selection(teacher=teacher["name"], student=student["name"], teacher_model=teacher,
                                 student_model=student)
    benchmarks = [design.BenchmarkResult(name=m["name"], model=m, parameters=parameters[m["name"]]) for m in models]
    grid = design.lora_grid_jobs(cfg, selection)
    best = max(grid, key=lambda j: (j.r, j.dropout))
    jobs: list[tuple[Any, bool]] = [(j, True) for j in grid]
    jobs += [(j, False) for j in design.per_model_jobs(cfg, benchmarks, selection, best)]
    jobs += [(j, False) for j in design.distillation_jobs(cfg, selection)]
    ablation = design.ablation_runs(cfg, selection, best)
    jobs += [(r.job, False) for r in ablation]
    sources = {r.job.train_set: r.train_set.source for r in ablation}
    insert = cfg.augment.random_insert.rate if cfg.augment.methods.get("random_insert", 0) > 0 else 0.0
    notes = [f"family {family} as if selected: teacher {teacher['name']}, student {student['name']} (the family is "
             "chosen by benchmarking; --family NAME plans another)",
             "per-model and ablation runs planned with the grid's largest LoRA rank and dropout "
             f"({best.settings_label})"]
    runs, seen = [], set()
    for job, in_grid in jobs:
        if job.title in seen:
            continue
        seen.add(job.title)
        name = job.model["name"]
        train = stats[name]["train"]
        source = sources.get(job.train_set, "main")
        if source == "augment" or (source == "main" and cfg.augment.enabled):
            train = train.scaled(cfg.augment.factor, 1.0 + insert)
        fit = choose_fit(model_config_for(job.model["path"], job.model["trust_remote_code"]), job.precision,
                         job.method, batch_size=job.batch_size, max_length=train.longest,
                         budget_bytes=int(cfg.training_budget_gb * GB), fit_order=cfg.training.fit_order,
                         eval_batch_size=eval_batch_size, eval_length=stats[name]["validation"].longest,
                         logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens, device=device,
                         bf16_supported=bf16_supported, trust_remote_code=job.model["trust_remote_code"], name=name,
                         **job.memory_options())
        n = parameters[name]
        trainable = fit.prediction["trainable_parameters"]
        per_token = training_flops_per_token(n, trainable, fit.gradient_checkpointing)
        scored = stats[name]["validation"].total * (job.epochs + 1) + stats[name]["test"].total
        runs.append(PlannedRun(
            section=_section(job.method, job.train_set, in_grid and isinstance(job, LoraJob)), title=job.title,
            fit=fit, epochs=job.epochs, train_tokens=train.total, tokens_exact=train.exact,
            compute_dtype=_compute_dtype(fit), train_flops=float(per_token) * train.total * job.epochs,
            # Scoring: the base model and every epoch on validation, the best epoch on test (forward only).
            eval_flops=2.0 * n * scored if fit.fits else 0.0))
    return runs, notes


PLAN_RUN_COLUMNS = ("section", "run", "fits", "micro x accumulation", "checkpointing", "optimizer", "weights",
                    "peak_gb", "budget_gb", "epochs", "train tokens/epoch", "PFLOP", "hours")


def study_plan_table(runs: Sequence[PlannedRun], gpu: str, utilization: float) -> "Any":
    """One row per run: its fit, predicted peak, compute and hours (a pandas frame with :data:`PLAN_RUN_COLUMNS`)."""
    import pandas as pd

    rows = []
    for run in runs:
        fit = run.fit
        rows.append({
            "section": run.section, "run": run.title, "fits": fit.fits,
            "micro x accumulation": f"{fit.micro_batch_size} x {fit.accumulation_steps}",
            "checkpointing": fit.gradient_checkpointing, "optimizer": fit.optimizer,
            "weights": ("fp32 master" if fit.master_weights == "fp32" else fit.train_precision)
            + (f" ({fit.update})" if fit.update not in ("adamw", "adamw-8bit") else ""),
            "peak_gb": round(fit.peak_bytes / GB, 2), "budget_gb": fit.budget_bytes / GB, "epochs": run.epochs,
            "train tokens/epoch": run.train_tokens, "PFLOP": round(run.flops / 1e15, 1),
            "hours": round(run.hours(gpu, utilization), 2) if fit.fits else None,
        })
    return pd.DataFrame(rows, columns=list(PLAN_RUN_COLUMNS))


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
