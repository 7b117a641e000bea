"""Memory decisions from predictions: the precision and batch size a model is scored at, the teacher pass's
batch, each candidate's plan (:func:`plan_candidate`, what the pipeline obeys), and the training memory checks.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ftflow.config import Method, Precision
from ftflow.models.architecture import UnknownModelError, count_config_parameters, model_config_for
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS
from ftflow.plan.predict import GB, Device, MemoryPrediction, predict_scoring, predict_teacher_pass, predict_training
from ftflow.tokens import sentence_ids

# ----------------------------------------------------------------------------- decisions


def gb(n_bytes: float) -> float:
    """Bytes in (decimal) GB."""
    return n_bytes / GB


def half_precision(bf16_supported: bool) -> str:
    """bf16 where the device supports it, else fp16."""
    return "bf16" if bf16_supported else "fp16"


def bf16_available(device: str) -> bool:
    """Whether ``device`` computes in bf16 (CPU always; CUDA from Ampere on)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return True


def choose_precision(
    config,
    budget_bytes: int,
    *,
    batch_size: int,
    max_length: int,
    allow_nf4: bool = True,
    bf16_supported: bool = True,
    device: Device = "cuda",
    kv_cache: bool = False,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    trust_remote_code: bool = False,
) -> dict:
    """The most precise precision whose predicted scoring peak fits the budget.

    Tried in order: fp32, then bf16 (fp16 when ``bf16_supported`` is False),
    then nf4 when ``allow_nf4``. The first that fits wins.

    Args:
        config: the model's transformers config.
        budget_bytes: memory available, in bytes.
        batch_size: sequences per forward pass the check is made at.
        max_length: tokens per sequence.
        allow_nf4: fall back to 4-bit weights.
        bf16_supported: the device computes in bf16.
        device: ``cuda`` or ``cpu`` (runtime overhead).
        kv_cache, logits_chunk_tokens: see :func:`predict_scoring`.
        trust_remote_code: see :func:`count_config_parameters`.

    Returns:
        ``{"precision": str | None, "peak_bytes": int, "reason": str,
        "tried": {precision: peak_bytes}}``. ``precision`` is None when nothing
        fits; ``peak_bytes`` is then the smallest predicted peak, and the reason
        names it and the budget.
    """
    order = ["fp32", half_precision(bf16_supported)] + (["nf4"] if allow_nf4 else [])
    tried: dict[str, int] = {}
    for precision in order:
        peak = predict_scoring(
            config, precision, batch_size, max_length, device=device, kv_cache=kv_cache,
            logits_chunk_tokens=logits_chunk_tokens, trust_remote_code=trust_remote_code,
        ).peak_bytes
        tried[precision] = peak
        if peak <= budget_bytes:
            rejected = "; ".join(f"{p} needs {gb(v):.2f} GB" for p, v in tried.items() if p != precision)
            reason = f"{precision}: predicted {gb(peak):.2f} GB <= budget {gb(budget_bytes):.2f} GB"
            if rejected:
                reason += f" ({rejected})"
            return {"precision": precision, "peak_bytes": peak, "reason": reason, "tried": tried}
    smallest = min(tried, key=tried.get)
    listing = ", ".join(f"{p} {gb(v):.2f} GB" for p, v in tried.items())
    hint = "" if allow_nf4 else "; nf4 not allowed"
    reason = (
        f"skipped: even the smallest predicted peak ({smallest}, {gb(tried[smallest]):.2f} GB) exceeds the budget "
        f"of {gb(budget_bytes):.2f} GB at batch size {batch_size} and {max_length} tokens ({listing}{hint})"
    )
    return {"precision": None, "peak_bytes": tried[smallest], "reason": reason, "tried": tried}


def largest_batch_size(
    config,
    precision: Precision,
    budget_bytes: int,
    max_length: int,
    cap: int = 256,
    *,
    device: Device = "cuda",
    kv_cache: bool = False,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    trust_remote_code: bool = False,
) -> int:
    """The largest scoring batch size in ``[1, cap]`` whose predicted peak fits; 0 if none does.

    The predicted peak grows with the batch size, so a binary search finds it.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")

    def fits(batch: int) -> bool:
        return predict_scoring(
            config, precision, batch, max_length, device=device, kv_cache=kv_cache,
            logits_chunk_tokens=logits_chunk_tokens, trust_remote_code=trust_remote_code,
        ).peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, cap  # fits(low) holds
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def largest_teacher_batch_size(config, precision: Precision, budget_bytes: int, max_length: int, cap: int = 256,
                               **options) -> int:
    """The largest teacher-pass batch size in ``[1, cap]`` whose :func:`predict_teacher_pass` fits; 0 if none.

    ``options``: :func:`predict_teacher_pass`'s keywords (``k`` required). The peak grows with the batch size,
    so a binary search finds it.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")

    def fits(batch: int) -> bool:
        return predict_teacher_pass(config, precision, batch, max_length, **options).peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, cap  # fits(low) holds
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class TeacherPassPlan:
    """The teacher pass's batch size and predicted peak (recorded in the ``teacher_logits`` manifest).

    Attributes:
        batch_size: sentences per forward pass.
        max_length: tokens of the longest training sentence, planned for.
        prediction: :func:`predict_teacher_pass` at ``batch_size``.
        budget_bytes: the budget planned against.
        reason: one line: what was chosen and why.
    """

    batch_size: int
    max_length: int
    prediction: MemoryPrediction
    budget_bytes: int
    reason: str


def teacher_pass_options(teacher_run: Mapping[str, Any]) -> dict[str, Any]:
    """How a trained run is loaded as a teacher, as :func:`predict_teacher_pass`'s keywords (``method``,
    ``lora_r``, ``num_virtual_tokens``) and its ``precision`` (nf4 for QLoRA), from the run's manifest."""
    job = teacher_run.get("job") or {}
    method, precision = teacher_run["method"], teacher_run["precision"]
    if method == "lora" and precision == "nf4":
        method = "qlora"  # LoRA on a model benchmarked in 4 bits is QLoRA (as check_training_fits plans it)
    options: dict[str, Any] = {"method": method, "precision": precision}
    if method in ("lora", "qlora"):
        options["lora_r"] = int(job.get("r", 8))
    if method == "prefix":
        options["num_virtual_tokens"] = int(job.get("num_virtual_tokens", 8))
    return options


def plan_teacher_pass(
    teacher_run: Mapping[str, Any],
    *,
    tokenizer,
    sentences: Sequence[str],
    max_length: int,
    k: int,
    variant: str,
    budget_bytes: int,
    batch_size: int | str = "auto",
    batch_size_cap: int = 256,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    device: Device = "cuda",
) -> TeacherPassPlan:
    """The teacher pass's batch size: the largest its memory plan says fits, or the configured one if it fits.

    Planned on the teacher run as :func:`ftflow.models.loading.load_trained` loads it (:func:`teacher_pass_options`) and
    on the longest of ``sentences`` under the teacher's ``tokenizer`` (at most ``max_length`` tokens), with the
    teacher's whole vocabulary (the range shared with a student is never larger).

    Args:
        teacher_run: the chosen teacher run's manifest (``method``, ``precision``, ``base_model``, ``job``, ``name``).
        tokenizer: the teacher's tokenizer.
        sentences: the training sentences the pass runs over.
        max_length, k, variant, logits_chunk_tokens, device: as the pass runs (:func:`predict_teacher_pass`).
        budget_bytes: the memory budget.
        batch_size: ``auto`` (the largest that fits, up to ``batch_size_cap``) or a fixed size, lowered to the
            largest that fits when predicted over the budget.
        batch_size_cap: upper bound of ``auto``.

    Raises:
        MemoryBudgetError: not even one sentence a pass fits; the message says what to lower.
    """
    base = teacher_run["base_model"]
    trust = bool(base.get("trust_remote_code", False))
    config = model_config_for(base["path"], trust)
    length = longest_sequence(tokenizer, sentences, max_length)
    options = teacher_pass_options(teacher_run)
    precision = options.pop("precision")
    options.update(k=k, variant=variant, logits_chunk_tokens=logits_chunk_tokens, device=device,
                   trust_remote_code=trust)
    cap = batch_size_cap if batch_size == "auto" else int(batch_size)
    fitting = largest_teacher_batch_size(config, precision, budget_bytes, length, cap, **options)
    name = teacher_run.get("name", base["path"])
    if fitting == 0:
        at_one = predict_teacher_pass(config, precision, 1, length, **options)
        raise MemoryBudgetError(
            f"the teacher pass of {name} ({precision}, {options['method']}, {length} tokens) is predicted to peak at "
            f"{gb(at_one.peak_bytes):.2f} GB with one sentence a pass, over the {gb(budget_bytes):.2f} GB budget. "
            "Lower benchmark.logits_chunk_tokens or max_length, or raise memory_budget_gb.")
    prediction = predict_teacher_pass(config, precision, fitting, length, **options)
    if batch_size == "auto":
        how = f"the largest that fits (cap {batch_size_cap})"
    elif fitting == int(batch_size):
        how = "fixed in config (distill.teacher_batch_size)"
    else:
        how = f"lowered from {batch_size} (distill.teacher_batch_size, predicted over the budget)"
    reason = (f"batch size {fitting}, {how}: predicted {gb(prediction.peak_bytes):.2f} GB <= budget "
              f"{gb(budget_bytes):.2f} GB ({variant}, k {k}, {length} tokens)")
    return TeacherPassPlan(batch_size=fitting, max_length=length, prediction=prediction, budget_bytes=budget_bytes,
                           reason=reason)


@dataclass(frozen=True)
class ModelPlan:
    """What the planner decided for one model.

    Attributes:
        name: short name of the model.
        path: hub id or directory.
        parameters: exact parameter count.
        precision: chosen precision, None when skipped.
        decision_batch_size: the batch size the precision was chosen at.
        batch_size: evaluation batch size (the largest that fits when chosen
            automatically; 0 when skipped).
        peak_bytes: predicted scoring peak at the chosen precision and
            ``batch_size`` (when skipped: the smallest peak tried).
        max_length: tokens per sequence planned for.
        budget_bytes: the budget.
        reason: why this precision and batch size (or why skipped).
        predictions: scoring predictions at ``decision_batch_size`` for fp32,
            the half precision and nf4, whether or not nf4 was allowed.
    """

    name: str
    path: str
    parameters: int
    precision: Optional[str]
    decision_batch_size: int
    batch_size: int
    peak_bytes: int
    max_length: int
    budget_bytes: int
    reason: str
    predictions: dict[str, MemoryPrediction] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        """Whether the model is loaded at all."""
        return self.precision is not None


def plan_model(
    name: str,
    path_or_id: str,
    budget_bytes: int,
    *,
    max_length: int,
    batch_size: Optional[int] = None,
    batch_size_cap: int = 256,
    allow_nf4: bool = True,
    bf16_supported: bool = True,
    device: Device = "cuda",
    kv_cache: bool = False,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    trust_remote_code: bool = False,
    config=None,
    config_dir: Optional[Path] = None,
) -> ModelPlan:
    """Choose the precision and evaluation batch size of one model, loading nothing.

    Args:
        name: short name for tables.
        path_or_id: hub id or local directory.
        budget_bytes: memory budget in bytes.
        max_length: tokens per sequence to plan for: the longest sequence the
            data will produce, at most the configured ``max_length`` (planning at
            2048 tokens for sentences of 60 is planning for 30x the logits).
        batch_size: a fixed evaluation batch size; None chooses the precision at
            batch size 1 (precision before throughput, as the study did) and
            then the largest batch size that fits, up to ``batch_size_cap``.
        batch_size_cap: upper bound of the automatic batch size.
        allow_nf4, bf16_supported, device, kv_cache, logits_chunk_tokens,
            trust_remote_code: see :func:`choose_precision`.
        config: the model's config when already at hand (else :func:`model_config_for`).
        config_dir: configs this run read from the hub (see :func:`model_config_for`).

    Raises:
        UnknownModelError: no config can be found offline.
    """
    if config is None:
        config = model_config_for(path_or_id, trust_remote_code, config_dir)
    decision_batch = batch_size or 1
    options = dict(device=device, kv_cache=kv_cache, logits_chunk_tokens=logits_chunk_tokens,
                   trust_remote_code=trust_remote_code)
    choice = choose_precision(
        config, budget_bytes, batch_size=decision_batch, max_length=max_length, allow_nf4=allow_nf4,
        bf16_supported=bf16_supported, **options,
    )
    precision = choice["precision"]
    predictions = {
        p: predict_scoring(config, p, decision_batch, max_length, **options)
        for p in ("fp32", half_precision(bf16_supported), "nf4")
    }
    reason = choice["reason"]
    if precision is None:
        chosen_batch, peak = 0, choice["peak_bytes"]
    elif batch_size is None:
        chosen_batch = largest_batch_size(config, precision, budget_bytes, max_length, batch_size_cap, **options)
        peak = predict_scoring(config, precision, chosen_batch, max_length, **options).peak_bytes
        reason = (f"{reason} at batch size 1; batch size {chosen_batch} is the largest that fits "
                  f"({gb(peak):.2f} GB, cap {batch_size_cap})")
    else:
        chosen_batch, peak = batch_size, choice["peak_bytes"]
    return ModelPlan(
        name=name,
        path=path_or_id,
        parameters=predictions["fp32"].parameters,
        precision=precision,
        decision_batch_size=decision_batch,
        batch_size=chosen_batch,
        peak_bytes=peak,
        max_length=max_length,
        budget_bytes=budget_bytes,
        reason=reason,
        predictions=predictions,
    )


def plan_candidate(
    name: str,
    path_or_id: str,
    budget_bytes: int,
    *,
    precision: str,
    batch_size: int | str,
    max_length: int,
    batch_size_cap: int = 256,
    allow_nf4: bool = True,
    device: Device = "cuda",
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    trust_remote_code: bool = False,
    config_dir: Optional[Path] = None,
) -> dict:
    """The pipeline's decision for one candidate: precision and batch size, or a skip with its reason.

    ``precision="auto"`` lets :func:`plan_model` choose (fp32, else the half
    precision, else nf4 when allowed); a fixed precision is only checked against
    the budget. ``batch_size="auto"`` takes the largest that fits.

    Returns:
        JSON-ready ``{"precision" (None when skipped), "batch_size", "parameters",
        "peak_bytes", "reason"}``; a model whose config cannot be found offline
        (nor in ``config_dir``, see :func:`model_config_for`) is skipped with
        :class:`UnknownModelError`'s message as the reason.
    """
    try:
        config = model_config_for(path_or_id, trust_remote_code, config_dir)
    except UnknownModelError as exc:
        return {"precision": None, "batch_size": 0, "parameters": None, "peak_bytes": None,
                "reason": f"cannot plan: {exc}"}
    fixed_batch = None if batch_size == "auto" else int(batch_size)
    if precision == "auto":
        plan = plan_model(name, path_or_id, budget_bytes, max_length=max_length, batch_size=fixed_batch,
                          batch_size_cap=batch_size_cap, allow_nf4=allow_nf4,
                          # Planning for a GPU this machine does not have: assume bf16 (Ampere or newer).
                          bf16_supported=True if device == "cuda" and not torch.cuda.is_available()
                          else bf16_available(device),
                          device=device, logits_chunk_tokens=logits_chunk_tokens,
                          trust_remote_code=trust_remote_code, config=config)
        return {"precision": plan.precision, "batch_size": plan.batch_size, "parameters": plan.parameters,
                "peak_bytes": plan.peak_bytes, "reason": plan.reason}
    options = dict(device=device, logits_chunk_tokens=logits_chunk_tokens, trust_remote_code=trust_remote_code)
    parameters = count_config_parameters(config, trust_remote_code)
    at_one = predict_scoring(config, precision, 1, max_length, **options)
    if at_one.peak_bytes > budget_bytes:
        return {"precision": None, "batch_size": 0, "parameters": parameters, "peak_bytes": at_one.peak_bytes,
                "reason": f"skipped: {precision} (fixed in config) needs {gb(at_one.peak_bytes):.2f} GB at batch size 1, "
                          f"over the {gb(budget_bytes):.2f} GB budget; use precision: auto or a smaller precision"}
    fitting = largest_batch_size(config, precision, budget_bytes, max_length, batch_size_cap, **options)
    if fixed_batch is None:
        chosen, how = fitting, f"batch size {fitting} is the largest that fits (cap {batch_size_cap})"
    elif fixed_batch <= fitting:
        chosen, how = fixed_batch, f"batch size {fixed_batch} (fixed in config)"
    else:
        chosen, how = fitting, f"batch size lowered from {fixed_batch} (predicted over the budget) to {fitting}"
    peak = predict_scoring(config, precision, chosen, max_length, **options).peak_bytes
    return {"precision": precision, "batch_size": chosen, "parameters": parameters, "peak_bytes": peak,
            "reason": f"{precision} (fixed in config): predicted {gb(peak):.2f} GB <= budget "
                      f"{gb(budget_bytes):.2f} GB; {how}"}


class MemoryBudgetError(RuntimeError):
    """A training run predicted not to fit the memory budget; raised before anything is loaded."""


def longest_sequence(tokenizer, sentences: Sequence[str], max_length: int) -> int:
    """Tokens of the longest of ``sentences`` as ftflow encodes them (start token included, at most ``max_length``).

    What memory is planned for: the longest batch the data can make, not the
    configured ``max_length`` (planning at 2048 tokens for sentences of 60 is
    planning for 30x the logits).

    Raises:
        ValueError: no sentences.
    """
    if len(sentences) == 0:
        raise ValueError("longest_sequence: no sentences to measure")
    return max(len(sentence_ids(tokenizer, text, max_length)[0]) for text in sentences)


def check_training_fits(
    path_or_id: str,
    precision: str,
    method: Method,
    *,
    batch_size: int,
    max_length: int,
    budget_bytes: int,
    eval_batch_size: Optional[int] = None,
    eval_length: Optional[int] = None,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    device: Device = "cuda",
    lora_r: int = 8,
    lora_dropout: float = 0.05,
    num_virtual_tokens: int = 8,
    trust_remote_code: bool = False,
) -> MemoryPrediction:
    """The predicted peak of a training run; :class:`MemoryBudgetError` if it exceeds the budget.

    ``max_length`` is the longest sequence of the set that trains (an
    augmented set, whose random insertions lengthen sentences, not the split
    it was made from); ``eval_batch_size`` x ``eval_length`` the validation
    pass between epochs (see :func:`predict_training`). ``method="lora"`` on
    an nf4 model is planned as QLoRA, which is what
    :func:`ftflow.train.trainer.train_lora` runs then.
    """
    config = model_config_for(path_or_id, trust_remote_code)
    if method == "lora" and precision == "nf4":
        method = "qlora"
    prediction = predict_training(config, precision, method, batch_size, max_length, lora_r=lora_r,
                                  num_virtual_tokens=num_virtual_tokens, lora_dropout=lora_dropout, device=device,
                                  eval_batch_size=eval_batch_size, eval_length=eval_length,
                                  logits_chunk_tokens=logits_chunk_tokens, trust_remote_code=trust_remote_code)
    if prediction.peak_bytes > budget_bytes:
        where = ""
        if prediction.eval_peak_bytes > prediction.step_peak_bytes:
            where = (f" in the validation pass between epochs (batch size {eval_batch_size}, {eval_length or max_length}"
                     " tokens, with the optimizer state resident; lower the evaluation batch size)")
        raise MemoryBudgetError(
            f"{method} training of {path_or_id} ({precision}, batch size {batch_size}, {max_length} tokens) is "
            f"predicted to peak at {gb(prediction.peak_bytes):.2f} GB{where}, over the {gb(budget_bytes):.2f} GB "
            "budget. Lower the stage's batch_size or max_length, or train a smaller model (or with LoRA instead of "
            "in full)."
        )
    return prediction
