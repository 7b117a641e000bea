"""Memory planning: predict a model's peak memory before loading it (docs/ARCHITECTURE.md, "Memory: planned,
measured, freed, recovered").

The planner answers the study's first question (which model fits a 20 GB GPU
at which precision) from the model's config alone:

1. :func:`model_config_for` gets a config without the hub (local directory,
   ftflow's table of known models, or the local Hugging Face cache).
2. :func:`count_config_parameters` instantiates it on the ``meta`` device: an exact
   count, no memory used.
3. :func:`predict_scoring` and :func:`predict_training` give a breakdown in
   bytes of the peak of perplexity scoring and of a training step by method.
4. :func:`ftflow.plan.decide.choose_precision`, ``largest_batch_size`` and
   ``plan_model`` turn predictions into decisions; :mod:`ftflow.plan.tables`
   and :mod:`ftflow.plan.plots` report them. How a training run is made to fit (micro-batches, gradient
   checkpointing, 8-bit optimizer state, bf16 weights) is chosen from
   :func:`predict_training` in :mod:`ftflow.plan.fit`.

What is modelled, and what is not, is stated where each number comes from.
The short version: weights are exact; activations, logits and optimizer state
follow what transformers 5 / PEFT / torch actually keep alive in ftflow's code
paths (measured with saved-tensor hooks on Llama, Qwen2 and Granite decoder
layers, see :data:`TRAINING_LAYER_BYTES`); the runtime overhead is a constant
per device; allocator fragmentation is not modelled. ``bench/memory_accuracy.py``
compares predictions with measured peaks.

Units: every ``*_bytes`` is bytes; ``GB`` is 10**9 bytes (the config's
``memory_budget_gb`` is read in these units; a "20 GB" MIG slice has about
20.9e9 bytes, so the decimal reading is the conservative one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Mapping, Optional, Sequence, get_args

from ftflow.config import Method, Precision
from ftflow.models.architecture import ParameterCounts, _Shape, _shape, parameter_counts
from ftflow.perplexity import CHUNK_BYTES_PER_LOGIT, DEFAULT_LOGITS_CHUNK_TOKENS

Device = Literal["cuda", "cpu"]

GB = 10**9
"""Bytes in a (decimal) gigabyte, the unit of ``memory_budget_gb``."""

PRECISIONS: tuple[str, ...] = get_args(Precision)
METHODS: tuple[str, ...] = get_args(Method)

ELEMENT_BYTES: Mapping[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "nf4": 2}
"""Bytes of one activation / unquantized weight element; nf4 computes in bf16."""

NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""bitsandbytes NF4 with double quantization (ftflow's ``quantization_config``):
4-bit codes (0.5 byte), one uint8 absmax per block of 64 weights, one fp32
second-level absmax per 256 blocks. Checked on bitsandbytes 0.50 (blocksize 64)."""

RUNTIME_OVERHEAD_BYTES: Mapping[str, int] = {"cuda": 512 * 2**20, "cpu": 448 * 2**20}
"""Memory used before any tensor exists. cuda: the CUDA context (driver state
and the kernels loaded lazily) and library handles, about 0.5 GiB; it is not
seen by ``torch.cuda.max_memory_allocated`` but counts against a GPU's capacity.
cpu: resident size of a Python process with torch, transformers and peft
imported (measured here: about 0.45 GiB). The caching allocator's reserved but
unused memory (a few percent on CUDA) is not modelled."""

SCORING_LOGITS_BYTES_PER_ELEMENT_EXTRA = 8
"""Full-logits scoring only (``logits_chunk_tokens=0``): bytes per logit element
kept besides the model's own logits (``d`` bytes each):
:func:`ftflow.perplexity.token_nll` copies the scored rows (boolean indexing,
then ``.float()``: 4 bytes alive at the peak whatever ``d``) and
``cross_entropy`` allocates its fp32 log-softmax (4 bytes). So full-logits
scoring holds ``(d + 8) * batch * length * vocab`` bytes at its peak. Chunked
scoring (the default) holds ``chunk * vocab * 8`` instead
(:data:`ftflow.perplexity.CHUNK_BYTES_PER_LOGIT`)."""

DISTILL_LOGITS_BYTES_PER_ELEMENT_EXTRA = {"fp32": 8, "half": 6}
"""Bytes per logit element that distillation's step adds to a full fine-tuning
step: the KD term's float32 log-softmax over the full vocabulary, saved for
backward (4 bytes), and its gradient branch, alive beside the cross-entropy's
until the two are summed (``d`` bytes): ``4 + d``. Measured on CPU (resident
set of one steady-state step, :func:`ftflow.distill.losses.kd_loss` against the
model's own loss, Qwen2 with vocabularies of 16k and 32k): 8.07 and 8.21 in
fp32, 6.03 and 6.23 in bf16."""

TRAINING_LOGITS_BYTES_PER_ELEMENT = 12
"""Bytes per logit element at the start of backward in a training step: the
fp32 log-softmax saved by the loss, the gradient nll_loss hands back, and the
gradient log_softmax produces (4 bytes each). The model's own logits are
released before backward in the Trainer (``compute_loss`` returns only the loss),
and the forward's ``d + 4 + 4`` is never more than this."""



# ----------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class MemoryPrediction:
    """A predicted peak and its parts, in bytes.

    ``peak_bytes`` is not always the plain sum of the parts: parts that are
    never alive at the same time are combined with ``max`` (the docstring of
    the function that made the prediction says how).

    Attributes:
        case: ``"scoring"`` or ``"train-<method>"``.
        precision: weights precision.
        batch_size: sequences per step.
        max_length: tokens per sequence (every sequence assumed this long).
        parameters: model parameters (exact).
        trainable_parameters: parameters with gradients (0 for scoring).
        weights_bytes: model weights (and adapter weights) in memory.
        logits_bytes: logits and what the loss keeps of them at the peak.
        activations_bytes: activations alive at the peak (one layer when scoring,
            all saved for backward when training).
        overhead_bytes: runtime overhead (:data:`RUNTIME_OVERHEAD_BYTES`).
        gradients_bytes: gradients of the trainable parameters.
        optimizer_bytes: AdamW state (two moments per trainable parameter).
        peak_bytes: predicted peak, overhead included.
        step_peak_bytes: training only: the peak of one training step, overhead
            included (``peak_bytes`` is the larger of it and ``eval_peak_bytes``).
        eval_peak_bytes: training only: the peak of the validation pass scored
            between epochs, with the optimizer state still resident (0 when not
            planned).
        eval_batch_size, eval_length: the validation pass planned (0 when none).
    """

    case: str
    precision: str
    batch_size: int
    max_length: int
    parameters: int
    trainable_parameters: int
    weights_bytes: int
    logits_bytes: int
    activations_bytes: int
    overhead_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    peak_bytes: int
    step_peak_bytes: int = 0
    eval_peak_bytes: int = 0
    eval_batch_size: int = 0
    eval_length: int = 0

    @property
    def allocated_bytes(self) -> int:
        """The peak without the runtime overhead: what ``torch.cuda.max_memory_allocated`` reports."""
        return self.peak_bytes - self.overhead_bytes

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)


def _check(precision: str, batch_size: int, max_length: int, device: str, problems: list[str]) -> None:
    if precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        problems.append(f"max_length must be >= 2, got {max_length}")
    if device not in RUNTIME_OVERHEAD_BYTES:
        problems.append(f"device must be one of {sorted(RUNTIME_OVERHEAD_BYTES)}, got {device!r}")


def _weights_bytes(counts: ParameterCounts, precision: str, unquantized_bytes: Optional[int] = None) -> int:
    """Bytes of the weights: NF4 for linear layers (and the compute dtype for the rest), else all in one dtype."""
    if precision == "nf4":
        rest = ELEMENT_BYTES["nf4"] if unquantized_bytes is None else unquantized_bytes
        return math.ceil(counts.linear_weights * NF4_BYTES_PER_PARAM) + counts.unquantized * rest
    return counts.total * ELEMENT_BYTES[precision]


def _attention_mask_bytes(batch_size: int, query_length: int, key_length: int) -> int:
    # transformers materialises a [B, 1, Lq, Lk] boolean mask when a batch has padding.
    return batch_size * query_length * key_length


SCORING_LAYER_ELEMENTS = {"hidden": 2, "intermediate": 3}
"""Elements per token alive in one decoder layer at scoring's in-layer peak (the
MLP product): the residual stream and the normed input (2 x hidden), and the
activated gate, the up projection and their product (3 x intermediate). Under
``torch.inference_mode`` nothing else is kept; attention runs through SDPA,
which never materialises the [L, L] score matrix. For every model ftflow plans
the logits phase is larger, so this term seldom decides the peak (and the
bench does not isolate it)."""


def _scoring_phases(counts: ParameterCounts, shape: _Shape, d: int, batch_size: int, max_length: int,
                    logits_chunk_tokens: int, nf4: bool) -> tuple[int, int]:
    """(one layer's activations, the logits phase) of a scoring forward, in bytes, weights excluded.

    The logits phase of chunked scoring (:func:`ftflow.perplexity.batch_nll`)
    is the largest of three moments: the head's check (the decoder's last
    hidden state [B, L, H], the forward's last-position logits and the
    check's own, ``B * V * (2 d + 8)``), the gather of the scored hidden states
    (two [B, L, H] copies) and one chunk (the scored hidden states and
    ``chunk * V`` logits at :data:`CHUNK_BYTES_PER_LOGIT`). Full logits
    (``logits_chunk_tokens=0``): ``(d + 8)`` bytes per [B, L, V] element.
    """
    tokens = batch_size * max_length
    per_token = (SCORING_LAYER_ELEMENTS["hidden"] * shape.hidden
                 + SCORING_LAYER_ELEMENTS["intermediate"] * shape.intermediate)
    layer = tokens * per_token * d + _attention_mask_bytes(batch_size, max_length, max_length)
    if nf4:
        layer += counts.largest_linear * ELEMENT_BYTES["nf4"]
    if logits_chunk_tokens == 0:
        return layer, tokens * shape.vocab * (d + SCORING_LOGITS_BYTES_PER_ELEMENT_EXTRA)
    hidden = tokens * shape.hidden * d
    chunk_rows = min(logits_chunk_tokens, batch_size * (max_length - 1))
    check = hidden + batch_size * shape.vocab * (2 * d + 8)
    chunk = hidden + chunk_rows * shape.vocab * CHUNK_BYTES_PER_LOGIT
    return layer, max(check, 2 * hidden, chunk)


def predict_scoring(
    config,
    precision: Precision,
    batch_size: int,
    max_length: int,
    *,
    device: Device = "cuda",
    kv_cache: bool = False,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    trust_remote_code: bool = False,
) -> MemoryPrediction:
    """Peak memory of perplexity scoring (one forward pass and the loss, no gradients).

    Assumptions (ftflow's :func:`ftflow.perplexity.score_sentences`): every
    sequence of the batch is ``max_length`` tokens long (the worst case of a
    batch; shorter real data uses less); ``inference_mode`` (no activations kept
    across layers); SDPA attention (no [L, L] score matrix); weights at
    ``precision`` (nf4: :data:`NF4_BYTES_PER_PARAM` for linear layers, bf16 for
    embeddings, output layer, norms and biases, plus one linear layer
    dequantized to bf16 at a time).

    Peak = weights + KV cache + max(one layer's activations, logits phase) +
    overhead: the layers have finished (and their activations are gone) when
    the logits and the loss are computed.

    * activations: :data:`SCORING_LAYER_ELEMENTS` elements per token in the
      compute dtype, plus the padding mask (1 byte per query-key pair), plus the
      KV cache of every layer when ``kv_cache`` (transformers builds one unless
      the forward gets ``use_cache=False``; it is returned with the logits);
    * logits: the LM head on ``logits_chunk_tokens`` scored positions at a time,
      ``chunk * vocab * 8`` bytes plus the hidden states they come from (see
      :func:`_scoring_phases`); with ``logits_chunk_tokens=0`` the full
      [batch, length, vocab] logits at ``(d + 8)`` bytes per element
      (:data:`SCORING_LOGITS_BYTES_PER_ELEMENT_EXTRA`).

    Args:
        config: the model's transformers config (see :func:`model_config_for`).
        precision: fp32, bf16, fp16 or nf4.
        batch_size: sequences per forward pass.
        max_length: tokens per sequence.
        device: ``cuda`` or ``cpu``; sets the runtime overhead.
        kv_cache: count the KV cache the forward builds when ``use_cache`` is on.
        logits_chunk_tokens: scored positions whose logits exist at once
            (``benchmark.logits_chunk_tokens``); 0 = full logits.
        trust_remote_code: allow the model's own code when counting parameters.

    Returns:
        The breakdown; ``gradients_bytes`` and ``optimizer_bytes`` are 0.
    """
    problems: list[str] = []
    _check(precision, batch_size, max_length, device, problems)
    if logits_chunk_tokens < 0:
        problems.append(f"logits_chunk_tokens must be >= 0 (0: full logits), got {logits_chunk_tokens}")
    if problems:
        raise ValueError("predict_scoring: " + "; ".join(problems))
    counts = parameter_counts(config, trust_remote_code)
    shape = _shape(config)
    d = ELEMENT_BYTES[precision]
    tokens = batch_size * max_length

    weights = _weights_bytes(counts, precision)
    layer, logits = _scoring_phases(counts, shape, d, batch_size, max_length, logits_chunk_tokens,
                                    nf4=precision == "nf4")
    # The cache, when kept, is returned with the logits: alive in both phases.
    cache = 2 * shape.layers * tokens * shape.kv_dim * d if kv_cache else 0
    overhead = RUNTIME_OVERHEAD_BYTES[device]
    activations = layer + cache
    peak = weights + cache + max(layer, logits) + overhead
    return MemoryPrediction(
        case="scoring",
        precision=precision,
        batch_size=batch_size,
        max_length=max_length,
        parameters=counts.total,
        trainable_parameters=0,
        weights_bytes=weights,
        logits_bytes=logits,
        activations_bytes=activations,
        overhead_bytes=overhead,
        gradients_bytes=0,
        optimizer_bytes=0,
        peak_bytes=peak,
    )


TEACHER_METHODS = ("full", "distill", "lora", "qlora", "prefix")
"""How a teacher run is loaded for its pass (:func:`ftflow.models.loading.load_trained`): a full checkpoint (``full``,
``distill``), the base with a LoRA adapter (``lora``; ``qlora`` on 4-bit weights) or a prefix adapter (``prefix``)."""

TEACHER_DRAW_CHUNK_ELEMENTS = 1 << 25
"""Elements of the float64 cumulative sums the sampled variant's draws hold at once
(:data:`ftflow.distill.teacher.DRAW_CHUNK_ELEMENTS`; a test checks they are equal, as for
:data:`ADAMW_8BIT_SLICE_ELEMENTS`)."""

TEACHER_LAYER_ELEMENTS = {"hidden": 4, "intermediate": 3}
"""Elements per token alive in one decoder layer at the teacher pass's in-layer peak (the MLP product), in the
compute dtype: :data:`SCORING_LAYER_ELEMENTS` (the residual stream, the normed input, the MLP's three products)
plus the layer's input, which the decoder's loop holds until the layer returns, and the embedding output, which
the model's forward holds to its end (one of the two when the model has one layer: its input is that output).
Measured on a CPU (forked child, VmHWM of ``use_cache=False`` forwards): a one-layer Granite (hidden 1024,
intermediate 3200), slope between 1024 and 3072 tokens, 25,770 bytes per token in bf16 against 25,344
predicted and 51,720 in fp32 against 50,688; a 12-layer Llama (hidden 768, intermediate 2048) at 4 x 512
tokens, one pad, fp32: 78.1 MB against 76.5 MB."""

TEACHER_LORA_BYTES_PER_TOKEN = {"hidden": 4, "intermediate": 8, "cpu_mixed_add": 4}
"""An unmerged LoRA teacher's bytes per token in one decoder layer beyond :data:`TEACHER_LAYER_ELEMENTS`, as
``hidden x H + (intermediate - d) x I``. Each adapted linear layer (PEFT's ``lora.Linear``) casts its input to
the adapters' fp32 (a copy of the normed input, ``4 H``, unless it is fp32 already) and adds the scaled fp32
adapter output to the base output in fp32 before casting back: beside the activated gate, the MLP's up
projection then holds its base output (``d``), the scaled adapter output and the fp32 sum (``4 + 4``), so
``(2 d + 8) x I`` where the base model's product holds ``3 d x I``. On a CPU the mixed-dtype add also makes an
fp32 copy of a half-precision base output first (``cpu_mixed_add``, 4 bytes per I; CUDA casts on the fly).
Measured as above with LoRA r 8 on every linear layer (unmerged): 62,084 bytes per token in bf16 on a CPU
against 61,440 predicted, 64,572 in fp32 against 63,488."""


def predict_teacher_pass(
    config,
    precision: Precision,
    batch_size: int,
    max_length: int,
    *,
    k: int,
    variant: str = "topk",
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    device: Device = "cuda",
    trust_remote_code: bool = False,
    method: str = "full",
    lora_r: int = 8,
    lora_merged: bool = False,
    num_virtual_tokens: int = 8,
    vocab_size: Optional[int] = None,
) -> MemoryPrediction:
    """Peak memory of the teacher pass (:func:`ftflow.distill.teacher.compute_teacher_topk`) at one batch.

    The pass runs one forward without a KV cache (``use_cache=False``, ``logits_to_keep=1``) and keeps the
    decoder's last hidden state [B, L, H]; then the LM head runs on ``logits_chunk_tokens`` real positions at a
    time, and each chunk's log-softmax (float32, over the first ``vocab_size`` ids), top-k and tail (or k
    draws) are taken before the next. Every sequence is assumed ``max_length`` tokens long. Peak = weights +
    the largest of these phases + overhead:

    * the forward: one decoder layer's activations (:data:`TEACHER_LAYER_ELEMENTS`, the padding mask, nf4's
      dequantized weight, as :func:`predict_scoring` counts them), plus an unmerged LoRA teacher's fp32 adapter
      arithmetic (:data:`TEACHER_LORA_BYTES_PER_TOKEN`) and a prefix teacher's key/value cache: PEFT hands the
      forward the prefix as a cache, which every layer extends with its keys and values
      (``2 x layers x B x (L + prefix) x kv_dim x d``) whatever ``use_cache`` says, until the forward returns;
    * the head's check (:func:`ftflow.perplexity._check_head`): the hidden states, the forward's last-position
      logits and the check's own (``B x V x (2 d + 8)``), the prefix cache still held by the outputs;
    * the gather of the real positions' hidden states (two [B, L, H] copies);
    * one chunk of ``c`` positions beside the gathered states [B L, H]: the head's output in the model's dtype
      and its float32 copy (``c x V x d + c x V' x 4``), the float32 logits and their log-softmax (8 bytes per
      element), then ``topk``: the log-softmax and the tail's ``exp`` (8), or ``sampled``: the log-softmax and
      the draw's float64 cumulative sums over at most :data:`TEACHER_DRAW_CHUNK_ELEMENTS` elements
      (``4 c V' + 8 min(c, rows) V'``); and the chunk's results until they are moved to the CPU (ids int64,
      log-probs, their clamped copy and the tail: ``c x (16 k + 4)``, the draws' float64 uniforms too).

    With ``logits_chunk_tokens=0`` (or a model without a separable head) the forward returns the full
    [B, L, V] logits (``d`` bytes each; twice for a model that scales its logits, e.g. Granite's
    ``logits_scaling``, whose division makes a copy) and each sentence is taken from them in turn (its float32
    copy and log-softmax, ``L x V' x 8``).

    Args:
        config: the teacher's base model config (:func:`model_config_for`).
        precision: the run's precision (nf4 for a QLoRA teacher; its unquantized tensors and compute in bf16).
        batch_size: sentences per forward pass.
        max_length: tokens per sentence (the longest of the training set).
        k: ids stored per position.
        variant: ``topk`` or ``sampled``.
        logits_chunk_tokens: positions whose logits exist at once; 0 = full logits.
        device: ``cuda`` or ``cpu`` (runtime overhead; a CPU's mixed-dtype add in an unmerged LoRA).
        trust_remote_code: allow the model's own code when counting parameters.
        method: how the teacher run is loaded (:data:`TEACHER_METHODS`): ``full``/``distill`` (a full
            checkpoint), ``lora``/``qlora`` (base + LoRA adapter, fp32 as PEFT loads it for inference on a
            half-precision base), ``prefix`` (base + prefix table, fp32).
        lora_r: the LoRA rank (``lora``, ``qlora``), on every linear layer but the output one.
        lora_merged: the adapter is merged into the weights (then the teacher is its base model).
        num_virtual_tokens: the prefix length (``prefix``).
        vocab_size: ids the log-softmax runs over (V', shared with the student); None = the teacher's V.

    Returns:
        The breakdown (``case`` ``teacher-<variant>``); ``activations_bytes`` is the forward's phase,
        ``logits_bytes`` the largest phase after it.
    """
    problems: list[str] = []
    _check(precision, batch_size, max_length, device, problems)
    if k < 1:
        problems.append(f"k must be >= 1, got {k}")
    if variant not in ("topk", "sampled"):
        problems.append(f"variant must be topk or sampled, got {variant!r}")
    if logits_chunk_tokens < 0:
        problems.append(f"logits_chunk_tokens must be >= 0 (0: full logits), got {logits_chunk_tokens}")
    if method not in TEACHER_METHODS:
        problems.append(f"method must be one of {TEACHER_METHODS}, got {method!r}")
    elif (method == "qlora") != (precision == "nf4"):
        problems.append(f"a {method} teacher at precision {precision}: QLoRA teachers are nf4, and only they")
    if lora_r < 1 or num_virtual_tokens < 1:
        problems.append(f"lora_r and num_virtual_tokens must be >= 1, got {lora_r} and {num_virtual_tokens}")
    if problems:
        raise ValueError("predict_teacher_pass: " + "; ".join(problems))
    counts = parameter_counts(config, trust_remote_code)
    shape = _shape(config)
    vocab = shape.vocab if vocab_size is None else min(vocab_size, shape.vocab)
    d = ELEMENT_BYTES[precision]
    tokens = batch_size * max_length
    lora = method in ("lora", "qlora") and not lora_merged
    prefix = num_virtual_tokens if method == "prefix" else 0

    weights = _weights_bytes(counts, precision)
    if lora:
        weights += counts.lora(lora_r) * 4
    elif prefix:
        weights += prefix * shape.layers * 2 * shape.kv_dim * 4

    hidden_elements = TEACHER_LAYER_ELEMENTS["hidden"] - (1 if shape.layers == 1 else 0)
    per_token = (hidden_elements * shape.hidden + TEACHER_LAYER_ELEMENTS["intermediate"] * shape.intermediate) * d
    if lora:
        cast = d != 4  # a half-precision base: the adapters' input and the base output are cast to fp32
        mixed_add = TEACHER_LORA_BYTES_PER_TOKEN["cpu_mixed_add"] if cast and device == "cpu" else 0
        per_token += ((TEACHER_LORA_BYTES_PER_TOKEN["hidden"] if cast else 0) * shape.hidden
                      + (TEACHER_LORA_BYTES_PER_TOKEN["intermediate"] - d + mixed_add) * shape.intermediate)
    layer = tokens * per_token + _attention_mask_bytes(batch_size, max_length, max_length + prefix)
    if precision == "nf4":
        layer += counts.largest_linear * ELEMENT_BYTES["nf4"]
    # A prefix teacher's cache: the prefix (handed over in fp32, then cast) and every layer's keys and values.
    cache = (2 * shape.layers * batch_size * (max_length + prefix) * shape.kv_dim * d
             + batch_size * prefix * shape.layers * 2 * shape.kv_dim * 4) if prefix else 0
    forward = layer + cache

    if logits_chunk_tokens == 0:
        scaled = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                         "logits_scaling", None) is not None
        full = tokens * shape.vocab * d
        logits = max(full * (2 if scaled else 1), full + max_length * vocab * 8)
    else:
        hidden = tokens * shape.hidden * d
        c = min(logits_chunk_tokens, tokens)
        check = hidden + batch_size * shape.vocab * (2 * d + 8) + cache
        if d == 4:  # the float32 cast is the head's output itself (a view when V' < V)
            softmax = c * shape.vocab * 4 + c * vocab * 4
        else:
            softmax = max(c * shape.vocab * d + c * vocab * 4, 8 * c * vocab)
        if variant == "topk":
            select = 8 * c * vocab
        else:
            select = 4 * c * vocab + 8 * min(c, max(1, TEACHER_DRAW_CHUNK_ELEMENTS // vocab)) * vocab
        results = c * (16 * k + 4) + (c * k * 8 if variant == "sampled" else 0)
        chunk = hidden + max(softmax, select) + results
        logits = max(check, 2 * hidden, chunk)
    overhead = RUNTIME_OVERHEAD_BYTES[device]
    return MemoryPrediction(
        case=f"teacher-{variant}",
        precision=precision,
        batch_size=batch_size,
        max_length=max_length,
        parameters=counts.total,
        trainable_parameters=0,
        weights_bytes=weights,
        logits_bytes=logits,
        activations_bytes=forward,
        overhead_bytes=overhead,
        gradients_bytes=0,
        optimizer_bytes=0,
        peak_bytes=weights + max(forward, logits) + overhead,
    )


@dataclass(frozen=True)
class LayerBytes:
    """Bytes saved for backward per token in one decoder layer, as a linear form of its shape."""

    hidden: float
    intermediate: float
    kv_dim: float
    heads: float
    constant: float
    per_adapter_rank: float = 0.0

    def per_token(self, shape: _Shape, lora_r: int = 0) -> float:
        """Bytes per token for one layer of ``shape`` (LoRA rank ``lora_r`` where it applies)."""
        return (
            self.hidden * shape.hidden
            + self.intermediate * shape.intermediate
            + self.kv_dim * shape.kv_dim
            + self.heads * shape.heads
            + self.constant
            + self.per_adapter_rank * lora_r
        )


TRAINING_LAYER_BYTES: Mapping[tuple[str, str], LayerBytes] = {
    ("full", "fp32"): LayerBytes(32, 16, 8, 4, 8),
    ("full", "half"): LayerBytes(20, 8, 4, 4, 8),
    ("lora", "fp32"): LayerBytes(64, 20, 8, 4, 8, 28),
    ("lora", "half"): LayerBytes(60, 14, 4, 4, 8, 28),
    ("lora-no-dropout", "fp32"): LayerBytes(24, 16, 8, 4, 8, 28),
    ("lora-no-dropout", "half"): LayerBytes(36, 10, 4, 4, 8, 28),
    ("prefix", "fp32"): LayerBytes(25, 12, 0, 30, 0),
    ("prefix", "half"): LayerBytes(16.6, 6, 0, 17, 0),
}
"""Bytes saved for backward per token and decoder layer, by method and weights dtype.

Measured, not derived: the storages packed by ``torch.autograd.graph.saved_tensors_hooks``
during a training forward (parameters excluded), on transformers 5.24 Llama,
Qwen2 and Granite layers (identical) with SDPA attention, fitted over seven
shapes. Full, LoRA rows are exact fits (e.g. full fp32 =
``4 * (8 hidden + 4 intermediate + 2 kv_dim + heads + 2)``: the MLP keeps four
intermediate-sized tensors, RMSNorm keeps fp32 copies, SDPA keeps q, k, v, its
output and a per-head log-sum-exp). LoRA (``all-linear``, seven adapted layers
per decoder layer) adds the dropout output and mask of every adapter input, in
fp32 because PEFT casts adapter inputs to the adapters' fp32 dtype; its
``per_adapter_rank`` term is the rank-r output of the seven ``lora_A``.
Prefix tuning (frozen base, a longer key/value sequence) is a rounded
least-squares fit, within 4% of the measured shapes at 8 virtual tokens and 64 tokens. "half" covers bf16 and fp16."""

CHECKPOINT_BYTES_PER_HIDDEN = {"fp32": 4, "half": 2}
"""With gradient checkpointing each decoder layer keeps only its input (hidden
size elements per token in the stream's dtype); one layer is recomputed at a
time during backward."""

_EXTRA_HIDDEN_PER_TOKEN = 5
"""Outside the decoder layers, training keeps the embedding output, the final
norm's inputs and the output layer's input: about ``2 * d + 5`` bytes per token
and hidden unit (measured 12.5 in fp32, 8.3 in bf16)."""


Optimizer = Literal["adamw", "adamw-8bit", "paged-adamw-8bit"]
"""The optimizer state a training run keeps: the Trainer's torch AdamW (two fp32 moments per trainable weight,
or the weights' dtype for half-precision weights, see :func:`predict_training`), or bitsandbytes' blockwise 8-bit
AdamW (``paged-``: its state in CUDA unified memory, which the driver pages out to host memory under pressure)."""
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)

BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps fp32 moments for a tensor of fewer elements (``min_8bit_size``, its default)."""
BNB_BLOCK = 256
"""Elements per quantization block of bitsandbytes' 8-bit optimizer state (one fp32 absmax per block and moment)."""
BNB_QMAP_BYTES = 2 * 256 * 4
"""The two 256-entry fp32 quantization maps, shared by every tensor of one optimizer."""
ADAMW_8BIT_STEP_BYTES_PER_ELEMENT: Mapping[tuple[str, str], int] = {
    ("cuda", "fp32"): 0, ("cuda", "half"): 13, ("cpu", "fp32"): 20, ("cpu", "half"): 28}
"""Bytes per element of the slice being updated that ftflow's 8-bit AdamW step holds besides the weights,
gradients and state, by device and weights dtype (``half``: bf16 weights, stochastically rounded). The step
updates each tensor in slices of at most :data:`ADAMW_8BIT_SLICE_ELEMENTS` elements, so this is paid
on one slice at a time (:func:`adamw_8bit_step_bytes`), not on the largest tensor.

* bf16 weights: fp32 copies of the slice's weights and gradient (8), then the rounding's int32 noise and
  finite mask (5): 13 on CUDA, whose fused kernel keeps nothing else in memory (it works in registers; not
  measured here, no GPU).
* On a CPU, bitsandbytes 0.50's reference kernel holds both moments dequantized to fp32, the scaled fp32
  gradient and two fp32 temporaries of the denominator (20), beside the copies for bf16 weights (28); its
  temporaries are gone before the rounding's.

Measured (CPU, forked child, ``VmHWM`` growth over one step of a 32M-element tensor whose state exists, 8
slices; ``bench/memory_accuracy.py``, case ``step-8bit``): 27.96 bytes per slice element for bf16 weights,
19.95 for fp32. Before slicing the same step held 28.0 (bf16) and 20.0 (fp32) bytes per element of the
whole tensor, and on CUDA about 21 for bf16 (fp32 copies and five rounding temporaries of the whole tensor,
where the plan counted 8)."""


ADAMW_8BIT_SLICE_ELEMENTS = 1 << 22
"""Elements of a tensor ftflow's 8-bit AdamW updates at once (:data:`ftflow.train.optimizers.SLICE_ELEMENTS`; a test
checks they are equal. Not imported: the memory plan's code key would then reach the optimizer's module)."""


def adamw_8bit_step_bytes(tensor_sizes: Sequence[int], half_weights: bool, device: str) -> int:
    """Bytes ftflow's 8-bit AdamW step adds, at its peak, to the weights, gradients and state.

    The tensors are updated one at a time, each in slices (:mod:`ftflow.train.optimizers`): the peak is one slice of
    the largest tensor with 8-bit state (:data:`ADAMW_8BIT_STEP_BYTES_PER_ELEMENT` per element). Tensors under
    bitsandbytes' ``min_8bit_size`` (fp32 moments, at most 4095 elements) are updated whole, a few tens of KB.
    """
    largest = max((n for n in tensor_sizes if n >= BNB_MIN_8BIT_SIZE), default=0)
    per_element = ADAMW_8BIT_STEP_BYTES_PER_ELEMENT[(device, "half" if half_weights else "fp32")]
    return per_element * min(largest, ADAMW_8BIT_SLICE_ELEMENTS)


def adamw_8bit_state_bytes(tensor_sizes: Sequence[int]) -> int:
    """Bytes of bitsandbytes' 8-bit AdamW state for trainable tensors of these sizes (checked on bitsandbytes 0.50).

    Per tensor of ``n >= 4096`` elements: two uint8 moments (``2 n``) and one fp32 absmax per block of 256 for each
    (``8 ceil(n / 256)``); a smaller tensor keeps two fp32 moments (``8 n``). The two quantization maps are shared.
    """
    total, quantized = 0, False
    for n in tensor_sizes:
        if n < BNB_MIN_8BIT_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
            quantized = True
    return total + (BNB_QMAP_BYTES if quantized else 0)


def _trainable_tensor_sizes(counts: ParameterCounts, shape: "_Shape", method: str, lora_r: int,
                            num_virtual_tokens: int) -> tuple[int, ...]:
    """Elements of each trainable tensor: every parameter (full), LoRA's A and B per adapted layer, the prefix table."""
    if method in ("full", "distill"):
        return counts.tensor_sizes or (counts.total,)
    if method == "prefix":
        # PEFT's prefix encoder: one embedding of num_virtual_tokens x (layers * 2 * kv_dim).
        return (num_virtual_tokens * shape.layers * 2 * shape.kv_dim,)
    return tuple(size for fan_in, fan_out in counts.linear_shapes for size in (lora_r * fan_in, fan_out * lora_r))


def _optimizer_bytes(optimizer: str, sizes: Sequence[int], moment_bytes: int) -> int:
    """Resident bytes of the optimizer state: AdamW's two moments (``moment_bytes`` each), or bitsandbytes' 8-bit state.

    Paged 8-bit state lives in CUDA unified memory; under memory pressure the driver moves it to host memory and
    back one tensor at a time as the step reaches it, so only the largest tensor's state is counted as resident
    (a model, not a measurement: paging needs CUDA, and nothing here has measured it).
    """
    if optimizer == "adamw":
        return 2 * moment_bytes * sum(sizes)
    if optimizer == "paged-adamw-8bit":
        return adamw_8bit_state_bytes([max(sizes)]) if sizes else 0
    return adamw_8bit_state_bytes(sizes)


def _dtype_group(element_bytes: int) -> str:
    return "fp32" if element_bytes == 4 else "half"


def predict_training(
    config,
    precision: Precision,
    method: Method,
    batch_size: int,
    max_length: int,
    lora_r: int = 8,
    num_virtual_tokens: int = 8,
    gradient_checkpointing: Optional[bool] = None,
    *,
    lora_dropout: float = 0.05,
    eval_batch_size: Optional[int] = None,
    eval_length: Optional[int] = None,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    device: Device = "cuda",
    trust_remote_code: bool = False,
    optimizer: Optimizer = "adamw",
    accumulation_steps: int = 1,
) -> MemoryPrediction:
    """Peak memory of a training run: one steady-state step (forward, backward, AdamW step), or
    the validation pass between epochs, whichever is larger.

    ftflow's training paths (:mod:`ftflow.train.trainer`) are assumed:

    * ``full``: every weight trained in ``precision`` (fp32, bf16 or fp16): weights
      ``d``, gradients ``d``, AdamW moments ``2 d`` bytes per parameter (kept in the
      parameter dtype, no temporaries), plus, in half precision, the ``d``-byte
      Kahan compensation buffer of the bf16 update (10 bytes per parameter in
      bf16). fp32 master weights under bf16 autocast are planned as ``fp32``.
      With ``optimizer`` 8-bit the moments are bitsandbytes' 8-bit state
      (:func:`adamw_8bit_state_bytes`, about 2 bytes per parameter) and bf16
      weights are updated with stochastic rounding (no compensation buffer,
      :mod:`ftflow.train.optimizers`; its step updates one slice of one tensor at a
      time, beside all gradients: :func:`adamw_8bit_step_bytes`).
    * ``lora``: frozen weights in ``precision`` plus LoRA rank ``lora_r`` on every
      linear layer but the output one; PEFT keeps adapters in fp32, so they cost
      4 + 4 + 8 bytes per trainable parameter (weight, gradient, moments).
    * ``qlora``: ``precision`` must be ``nf4``. ``prepare_model_for_kbit_training``
      casts everything that is not 4-bit (embeddings, output layer, norms) to
      fp32, which also makes the residual stream and the logits fp32, and turns
      gradient checkpointing on (``gradient_checkpointing=None`` follows that).
      The compute dtype is taken as half (bitsandbytes' bf16, ftflow's default):
      its autocast saves a half copy of the fp32 output layer's weight for
      backward (with compute_dtype fp32 there is none: the plan is that much over).
    * ``prefix``: frozen weights plus ``num_virtual_tokens`` key/value vectors per
      layer (fp32), keys and values ``num_virtual_tokens`` longer.
    * ``distill``: ``full`` training of the student plus the KD term's
      full-vocabulary log-softmax and its gradient
      (:data:`DISTILL_LOGITS_BYTES_PER_ELEMENT_EXTRA`, ``4 + d`` bytes per logit
      element; the teacher's top-k, ``B * L * k * 6`` bytes, are negligible).

    Activations are :data:`TRAINING_LAYER_BYTES` per token and layer (with
    gradient checkpointing: :data:`CHECKPOINT_BYTES_PER_HIDDEN` per layer, and
    one full layer while it is recomputed in backward, which is never alive
    with the logits' loss buffers: the larger of the two counts), plus the
    tokens' embedding/norm inputs outside the layers and the padding mask.
    Logits cost :data:`TRAINING_LOGITS_BYTES_PER_ELEMENT`.

    Peak: for ``full``, gradients grow while activations are released during
    backward, so peak = weights + optimizer + max(activations + logits +
    output-layer gradient, gradients + tied-embedding extra) + overhead, where
    the extra is two embedding-sized tensors when input and output embeddings
    are tied (the input side's gradient and the out-of-place sum that
    accumulates it) and 0 otherwise. For the adapter methods the
    gradients are tiny and peak = weights + optimizer + gradients + activations
    + logits + overhead. Every sequence is assumed ``max_length`` tokens long.

    The validation pass (``eval_batch_size`` given): ftflow scores the selection
    split after every epoch (:func:`ftflow.train.trainer.fit`) with the weights and
    the AdamW state resident; the gradients are not (the Trainer's
    ``model.zero_grad()`` after each optimizer step sets them to None). Its peak
    = weights + optimizer + the scoring forward's larger phase
    (:func:`predict_scoring`'s, at ``eval_batch_size`` x ``eval_length`` in the
    training compute dtype) + overhead, and the run's peak is
    ``max(step peak, validation peak)``.

    Args:
        config: the model's transformers config.
        precision: weights precision (``nf4`` only with ``qlora``).
        method: ``full``, ``lora``, ``qlora`` or ``prefix``.
        batch_size: sequences per forward pass (the micro-batch when ``accumulation_steps`` > 1).
        max_length: tokens per sequence.
        lora_r: LoRA rank (lora, qlora).
        num_virtual_tokens: prefix length (prefix).
        gradient_checkpointing: recompute activations in backward; None = what
            ftflow does (on for qlora, off otherwise).
        lora_dropout: LoRA dropout; 0 removes the dropout copies.
        eval_batch_size: sentences per forward pass of the validation pass;
            None leaves it out (one training step only).
        eval_length: tokens per validation sequence (default ``max_length``).
        logits_chunk_tokens: see :func:`predict_scoring`.
        device: ``cuda`` or ``cpu``; sets the runtime overhead.
        trust_remote_code: allow the model's own code when counting parameters.
        optimizer: ``adamw`` (torch), ``adamw-8bit`` or ``paged-adamw-8bit`` (bitsandbytes; see
            :func:`_optimizer_bytes` for what paging is assumed to keep resident).
        accumulation_steps: micro-batches of ``batch_size`` per optimizer step. From the second one on, the
            gradients of the earlier ones are alive during forward and backward: in full fine-tuning the
            peak is then weights + optimizer + gradients + activations + logits (no longer the larger of
            the last two groups).

    Returns:
        The breakdown of the predicted peak.
    """
    problems: list[str] = []
    _check(precision, batch_size, max_length, device, problems)
    if optimizer not in OPTIMIZERS:
        problems.append(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if accumulation_steps < 1:
        problems.append(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    if method not in METHODS:
        problems.append(f"method must be one of {METHODS}, got {method!r}")
    elif method == "qlora" and precision != "nf4":
        problems.append(f"qlora trains LoRA on 4-bit weights: precision must be nf4, got {precision!r}")
    elif method != "qlora" and precision == "nf4":
        problems.append(f"nf4 weights cannot be trained with method {method!r}; use method='qlora'")
    if lora_r < 1:
        problems.append(f"lora_r must be >= 1, got {lora_r}")
    if num_virtual_tokens < 1:
        problems.append(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
    if eval_batch_size is not None and eval_batch_size < 1:
        problems.append(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    if eval_length is not None and eval_length < 2:
        problems.append(f"eval_length must be >= 2, got {eval_length}")
    if logits_chunk_tokens < 0:
        problems.append(f"logits_chunk_tokens must be >= 0 (0: full logits), got {logits_chunk_tokens}")
    if problems:
        raise ValueError("predict_training: " + "; ".join(problems))

    counts = parameter_counts(config, trust_remote_code)
    shape = _shape(config)
    tokens = batch_size * max_length
    if gradient_checkpointing is None:
        gradient_checkpointing = method == "qlora"

    sizes = _trainable_tensor_sizes(counts, shape, method, lora_r, num_virtual_tokens)
    full_half = method in ("full", "distill") and precision in ("bf16", "fp16")
    if method in ("full", "distill"):
        d = ELEMENT_BYTES[precision]
        trainable = counts.total
        weights = counts.total * d
        gradients = trainable * d
        optimizer_state = _optimizer_bytes(optimizer, sizes, d)
        if precision in ("bf16", "fp16") and optimizer == "adamw":
            # Half-precision weights train with optimi's Kahan-compensated AdamW (ftflow.train.trainer.plan_precision):
            # its compensation buffer is one more tensor of the weights' size. The 8-bit optimizer rounds
            # stochastically instead and keeps no buffer.
            optimizer_state += trainable * d
    else:
        if method == "qlora":
            # prepare_model_for_kbit_training: everything not 4-bit becomes fp32.
            d = 4
            weights = _weights_bytes(counts, "nf4", unquantized_bytes=4)
        else:
            d = ELEMENT_BYTES[precision]
            weights = counts.total * d
        if method == "prefix":
            trainable = num_virtual_tokens * shape.layers * 2 * shape.kv_dim
        else:
            trainable = counts.lora(lora_r)
        weights += trainable * 4  # adapters are fp32 (PEFT's autocast_adapter_dtype)
        gradients = trainable * 4
        optimizer_state = _optimizer_bytes(optimizer, sizes, 4)

    group = _dtype_group(d)
    row = {"qlora": "lora", "distill": "full"}.get(method, method)
    if row == "lora" and lora_dropout == 0:
        row = "lora-no-dropout"
    layer = TRAINING_LAYER_BYTES[(row, group)].per_token(shape, lora_r if row.startswith("lora") else 0)
    recompute = 0
    if gradient_checkpointing:
        per_token_layers = shape.layers * CHECKPOINT_BYTES_PER_HIDDEN[group] * shape.hidden
        # One layer's activations, rebuilt in backward: after the logits' buffers are gone (see below).
        recompute = math.ceil(tokens * layer)
    else:
        per_token_layers = shape.layers * layer
    key_length = max_length + (num_virtual_tokens if method == "prefix" else 0)
    activations = math.ceil(tokens * (per_token_layers + (2 * d + _EXTRA_HIDDEN_PER_TOKEN) * shape.hidden))
    activations += _attention_mask_bytes(batch_size, max_length, key_length)
    head_copy = 0
    if method == "qlora":
        activations += counts.largest_linear * ELEMENT_BYTES["nf4"]  # one weight dequantized at a time
        # The output layer's fp32 weight (prepare_model_for_kbit_training's upcast) runs under the compute dtype's
        # autocast, which casts it anew at every forward (a frozen weight is not in autocast's cache) and the
        # product saves that copy for backward: alive with the logits until the head's backward, on any device.
        head_copy = (counts.output_untied or counts.embedding) * ELEMENT_BYTES["nf4"]
    logits = tokens * shape.vocab * TRAINING_LOGITS_BYTES_PER_ELEMENT
    if method == "distill":
        logits += tokens * shape.vocab * DISTILL_LOGITS_BYTES_PER_ELEMENT_EXTRA[group]
    overhead = RUNTIME_OVERHEAD_BYTES[device]
    # With checkpointing the recomputed layer and the logits' loss buffers are never alive together: the
    # logits' gradient has reached the last hidden state before the last layer is rebuilt (measured: summing
    # them over-predicted LoRA + checkpointing by one layer, 6.6% fp32 and 11.1% bf16).
    head = max(logits + head_copy, recompute)

    if method in ("full", "distill"):
        output_layer_grad = (counts.output_untied or counts.embedding) * d
        # Tied embeddings get a second gradient (from the input side) at the end of backward,
        # added out of place to the first: two more embedding-sized tensors (measured).
        tied_extra = 2 * counts.embedding * d if counts.output_untied == 0 else 0
        if accumulation_steps > 1:
            # The earlier micro-batches' gradients are alive through this one's forward and backward.
            dynamic = gradients + max(activations + head + output_layer_grad, tied_extra)
        else:
            dynamic = max(activations + head + output_layer_grad, gradients + tied_extra)
        peak = weights + optimizer_state + dynamic + overhead
    else:
        peak = weights + optimizer_state + gradients + activations + head + overhead
    if optimizer != "adamw":
        # The 8-bit step updates one slice of one tensor at a time while every gradient is alive.
        peak = max(peak, weights + optimizer_state + gradients + adamw_8bit_step_bytes(sizes, full_half, device)
                   + overhead)
    step_peak, eval_peak = peak, 0
    if eval_batch_size is not None:
        layer, scoring_logits = _scoring_phases(counts, shape, d, eval_batch_size, eval_length or max_length,
                                                logits_chunk_tokens, nf4=method == "qlora")
        # Scoring casts the head's weight too, for each chunk's product (freed after it).
        eval_peak = weights + optimizer_state + max(layer, scoring_logits + head_copy) + overhead
        peak = max(step_peak, eval_peak)
    return MemoryPrediction(
        case=f"train-{method}",
        precision=precision,
        batch_size=batch_size,
        max_length=max_length,
        parameters=counts.total,
        trainable_parameters=trainable,
        weights_bytes=weights,
        logits_bytes=logits + head_copy,
        activations_bytes=activations + recompute,
        overhead_bytes=overhead,
        gradients_bytes=gradients,
        optimizer_bytes=optimizer_state,
        peak_bytes=peak,
        step_peak_bytes=step_peak,
        eval_peak_bytes=eval_peak,
        eval_batch_size=eval_batch_size or 0,
        eval_length=(eval_length or max_length) if eval_batch_size is not None else 0,
    )

