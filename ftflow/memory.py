"""Memory planning: predict a model's peak memory before loading it (ARCHITECTURE.md, "Memory planning").

The planner answers the study's first question (which model fits a 20 GB GPU
at which precision) from the model's config alone:

1. :func:`model_config_for` gets a config without the hub (local directory,
   ftflow's table of known models, or the local Hugging Face cache).
2. :func:`count_config_parameters` instantiates it on the ``meta`` device: an exact
   count, no memory used.
3. :func:`predict_scoring` and :func:`predict_training` give a breakdown in
   bytes of the peak of perplexity scoring and of a training step by method.
4. :func:`choose_precision`, :func:`largest_batch_size` and :func:`plan_model`
   turn predictions into decisions; :func:`plan_table` and :func:`plot_plan`
   report them. How a training run is made to fit (micro-batches, gradient
   checkpointing, 8-bit optimizer state, bf16 weights) is chosen from
   :func:`predict_training` in :mod:`ftflow.fit`.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Protocol, Sequence, get_args

import torch

from ftflow.config import Method, Precision
from ftflow.known_models import known_architecture
from ftflow.perplexity import CHUNK_BYTES_PER_LOGIT, DEFAULT_LOGITS_CHUNK_TOKENS
from ftflow.tokens import sentence_ids

if TYPE_CHECKING:
    import pandas as pd

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
set of one steady-state step, :func:`ftflow.distill.kd_loss` against the
model's own loss, Qwen2 with vocabularies of 16k and 32k): 8.07 and 8.21 in
fp32, 6.03 and 6.23 in bf16."""

TRAINING_LOGITS_BYTES_PER_ELEMENT = 12
"""Bytes per logit element at the start of backward in a training step: the
fp32 log-softmax saved by the loss, the gradient nll_loss hands back, and the
gradient log_softmax produces (4 bytes each). The model's own logits are
released before backward in the Trainer (``compute_loss`` returns only the loss),
and the forward's ``d + 4 + 4`` is never more than this."""


class UnknownModelError(ValueError):
    """A model whose config ftflow cannot get offline; the message says how to fix it."""


# ----------------------------------------------------------------------------- configs and counts


def model_config_for(path_or_id: str, trust_remote_code: bool = False, config_dir: Optional[Path] = None):
    """The transformers config of a model, without reaching the hub.

    Looked up in this order: a local directory (its ``config.json``); a hub id
    that ftflow knows (:data:`ftflow.known_models.KNOWN_MODELS`, built through
    the transformers config class of its ``model_type``); the local Hugging Face
    cache (``AutoConfig`` with ``local_files_only=True``); ``config_dir``, where
    an online run keeps the ``config.json`` it read from the hub for an id it
    does not know (``<config_dir>/<org>/<name>/config.json``, written by
    :func:`ftflow.hub.fetch_configs`).

    Args:
        path_or_id: local checkpoint directory or hub id (``org/name``).
        trust_remote_code: allow a cached config that needs the repository's code.
        config_dir: the folder of configs read from the hub (None: not looked in).

    Returns:
        A ``PretrainedConfig``. For a known hub id it carries the shapes only
        (enough to count parameters and plan memory, not to load weights).

    Raises:
        UnknownModelError: none of these places has the model.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    local = Path(path_or_id).expanduser()
    if local.is_dir():
        try:
            return AutoConfig.from_pretrained(str(local), trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise UnknownModelError(
                f"cannot read a model config from directory {local}: {type(exc).__name__}: {exc}. "
                "A checkpoint directory needs a config.json (save_pretrained writes one)."
            ) from exc
    numbers = known_architecture(path_or_id)
    if numbers is not None:
        model_type = numbers.pop("model_type")
        return CONFIG_MAPPING[model_type](**numbers)
    try:
        return AutoConfig.from_pretrained(path_or_id, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        cache_error = type(exc).__name__
    fetched = None if config_dir is None else Path(config_dir) / path_or_id
    if fetched is not None and (fetched / "config.json").is_file():
        return AutoConfig.from_pretrained(str(fetched), trust_remote_code=trust_remote_code)
    raise UnknownModelError(
        f"cannot plan memory for {path_or_id!r}: it is not a local directory, not one of the hub models "
        "ftflow knows (ftflow/known_models.py), and its config is not in the local Hugging Face cache "
        f"({cache_error}) nor read from the hub by this run. Fix: check the id; give the path of a local checkpoint "
        "directory, add the model's architecture numbers to ftflow/known_models.py, or run once with network "
        f"access (ftflow reads its config.json from the hub; or: hf download {path_or_id} config.json)."
    )


def fetched_configs_dir(artifacts_dir: str | Path) -> Path:
    """Where an online run keeps the ``config.json`` it read from the hub for ids ftflow does not know
    (``config_dir`` of :func:`model_config_for`)."""
    return Path(artifacts_dir) / "hub" / "configs"


@dataclass(frozen=True)
class ParameterCounts:
    """Exact parameter counts of a causal LM, from a ``meta``-device instance.

    Attributes:
        total: every parameter, tied embeddings counted once.
        linear_weights: weights of the ``nn.Linear`` layers except the output
            layer: what NF4 quantizes and what LoRA ``all-linear`` adapts.
        linear_shapes: ``(in_features, out_features)`` of those layers.
        embedding: input embedding parameters.
        output_untied: output layer parameters when not tied to the embedding (else 0).
        tensor_sizes: elements of every parameter tensor (a tied one once), in the model's order: what
            the optimizer keeps one state per (8-bit states are per tensor, see :func:`adamw_8bit_state_bytes`).
    """

    total: int
    linear_weights: int
    linear_shapes: tuple[tuple[int, int], ...]
    embedding: int
    output_untied: int
    tensor_sizes: tuple[int, ...] = ()

    @property
    def unquantized(self) -> int:
        """Parameters NF4 leaves in the compute dtype: embeddings, output layer, norms, biases."""
        return self.total - self.linear_weights

    def lora(self, r: int) -> int:
        """Trainable parameters of LoRA rank ``r`` on every linear layer but the output one."""
        return sum(r * (fan_in + fan_out) for fan_in, fan_out in self.linear_shapes)

    @property
    def largest_linear(self) -> int:
        """Weights of the largest adapted/quantized linear layer."""
        return max((a * b for a, b in self.linear_shapes), default=0)


_COUNTS_CACHE: dict[str, ParameterCounts] = {}


def parameter_counts(config, trust_remote_code: bool = False) -> ParameterCounts:
    """Exact counts by instantiating ``AutoModelForCausalLM.from_config`` on the ``meta`` device.

    Nothing is allocated: meta tensors have shapes but no storage. Results are
    cached per config (by its JSON form).
    """
    key = config.to_json_string(use_diff=False)
    if key in _COUNTS_CACHE:
        return _COUNTS_CACHE[key]
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    output = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    shapes = tuple(
        (module.in_features, module.out_features)
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    )
    tied = output is not None and output.weight is embedding.weight
    counts = ParameterCounts(
        # parameters() yields a shared (tied) tensor once.
        total=int(sum(p.numel() for p in model.parameters())),
        linear_weights=int(sum(a * b for a, b in shapes)),
        linear_shapes=shapes,
        embedding=int(embedding.weight.numel()),
        output_untied=0 if output is None or tied else int(sum(p.numel() for p in output.parameters())),
        tensor_sizes=tuple(int(p.numel()) for p in model.parameters()),
    )
    _COUNTS_CACHE[key] = counts
    return counts


def count_config_parameters(config, trust_remote_code: bool = False) -> int:
    """Exact parameter count of ``config``'s causal LM (tied embeddings counted once)."""
    return parameter_counts(config, trust_remote_code).total


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int


def _shape(config) -> _Shape:
    """The numbers the activation model needs, read from a (decoder-only) config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return _Shape(
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size,
    )


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
"""How a teacher run is loaded for its pass (:func:`ftflow.methods.load_trained`): a full checkpoint (``full``,
``distill``), the base with a LoRA adapter (``lora``; ``qlora`` on 4-bit weights) or a prefix adapter (``prefix``)."""

TEACHER_DRAW_CHUNK_ELEMENTS = 1 << 25
"""Elements of the float64 cumulative sums the sampled variant's draws hold at once
(:data:`ftflow.distill.DRAW_CHUNK_ELEMENTS`; a test checks they are equal, as for
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
    """Peak memory of the teacher pass (:func:`ftflow.distill.compute_teacher_topk`) at one batch.

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
"""Elements of a tensor ftflow's 8-bit AdamW updates at once (:data:`ftflow.optimizers.SLICE_ELEMENTS`; a test
checks they are equal. Not imported: the memory plan's code key would then reach the optimizer's module)."""


def adamw_8bit_step_bytes(tensor_sizes: Sequence[int], half_weights: bool, device: str) -> int:
    """Bytes ftflow's 8-bit AdamW step adds, at its peak, to the weights, gradients and state.

    The tensors are updated one at a time, each in slices (:mod:`ftflow.optimizers`): the peak is one slice of
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

    ftflow's training paths (:mod:`ftflow.training`) are assumed:

    * ``full``: every weight trained in ``precision`` (fp32, bf16 or fp16): weights
      ``d``, gradients ``d``, AdamW moments ``2 d`` bytes per parameter (kept in the
      parameter dtype, no temporaries), plus, in half precision, the ``d``-byte
      Kahan compensation buffer of the bf16 update (10 bytes per parameter in
      bf16). fp32 master weights under bf16 autocast are planned as ``fp32``.
      With ``optimizer`` 8-bit the moments are bitsandbytes' 8-bit state
      (:func:`adamw_8bit_state_bytes`, about 2 bytes per parameter) and bf16
      weights are updated with stochastic rounding (no compensation buffer,
      :mod:`ftflow.optimizers`; its step updates one slice of one tensor at a
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
    split after every epoch (:func:`ftflow.training.fit`) with the weights and
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
            # Half-precision weights train with optimi's Kahan-compensated AdamW (ftflow.training.plan_precision):
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

    Planned on the teacher run as :func:`ftflow.methods.load_trained` loads it (:func:`teacher_pass_options`) and
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


# ----------------------------------------------------------------------------- reporting

PLAN_COLUMNS = (
    "model", "parameters", "precision", "batch_size", "max_length", "weights_gb", "logits_gb",
    "activations_gb", "overhead_gb", "peak_gb", "budget_gb", "fits", "chosen", "eval_batch_size",
    "eval_peak_gb", "reason",
)


def plan_table(plans: Sequence[ModelPlan]) -> "pd.DataFrame":
    """One row per model and precision: predicted scoring peak and its parts, in GB.

    Each row is the prediction at the batch size the precision was decided at
    (``batch_size``); ``fits`` says whether it is within the budget; ``chosen``
    marks the planner's choice, whose row also gives the evaluation batch size
    and its predicted peak. A skipped model has no chosen row and its reason
    on every row.
    """
    import pandas as pd

    rows = []
    for plan in plans:
        for precision, prediction in plan.predictions.items():
            chosen = precision == plan.precision
            rows.append({
                "model": plan.name,
                "parameters": plan.parameters,
                "precision": precision,
                "batch_size": prediction.batch_size,
                "max_length": prediction.max_length,
                "weights_gb": gb(prediction.weights_bytes),
                "logits_gb": gb(prediction.logits_bytes),
                "activations_gb": gb(prediction.activations_bytes),
                "overhead_gb": gb(prediction.overhead_bytes),
                "peak_gb": gb(prediction.peak_bytes),
                "budget_gb": gb(plan.budget_bytes),
                "fits": prediction.peak_bytes <= plan.budget_bytes,
                "chosen": chosen,
                "eval_batch_size": plan.batch_size if chosen else None,
                "eval_peak_gb": gb(plan.peak_bytes) if chosen else None,
                "reason": plan.reason if (chosen or plan.precision is None) else "",
            })
    frame = pd.DataFrame(rows, columns=list(PLAN_COLUMNS))
    frame["eval_batch_size"] = frame["eval_batch_size"].astype("Int64")  # integers with gaps
    return frame


def plan_markdown(frame: "pd.DataFrame") -> str:
    """A GitHub Markdown table of :func:`plan_table`'s frame."""
    import pandas as pd

    def cell(value) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, bool):
            return "yes" if value else ""
        if isinstance(value, float):
            return f"{value:.2f}"
        if isinstance(value, int) and value >= 10_000:
            return f"{value:,}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for record in frame.to_dict("records"):
        lines.append("| " + " | ".join(cell(record[c]) for c in frame.columns) + " |")
    return "\n".join(lines)


def plot_plan(frame: "pd.DataFrame", budget_bytes: int, path) -> None:
    """Grouped bars of predicted scoring peak per model and precision, with the budget as a line.

    Bars are the peaks the precision was decided on (the table's ``peak_gb``);
    chosen precisions are solid, the others hatched and faded; a model's label
    carries its evaluation batch size (``skipped`` when nothing fits).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(frame["model"]))
    precisions = list(dict.fromkeys(frame["precision"]))
    colours = {"fp32": "#1f77b4", "bf16": "#ff7f0e", "fp16": "#d62728", "nf4": "#2ca02c"}
    width = 0.8 / max(1, len(precisions))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(models) + 2), 4.8))
    for k, precision in enumerate(precisions):
        part = frame[frame["precision"] == precision].set_index("model")
        xs = [i + (k - (len(precisions) - 1) / 2) * width for i in range(len(models))]
        heights = [float(part.loc[m, "peak_gb"]) if m in part.index else 0.0 for m in models]
        chosen = [bool(part.loc[m, "chosen"]) if m in part.index else False for m in models]
        bars = ax.bar(xs, heights, width, label=precision, color=colours.get(precision, "#777"))
        for bar, is_chosen in zip(bars, chosen):
            if not is_chosen:
                bar.set_alpha(0.45)
                bar.set_hatch("//")
    ax.axhline(gb(budget_bytes), color="black", linestyle="--", linewidth=1.2,
               label=f"budget {gb(budget_bytes):.0f} GB")
    labels = []
    for model in models:
        picked = frame[(frame["model"] == model) & frame["chosen"]]
        labels.append(f"{model}\n(eval batch {int(picked['eval_batch_size'].iloc[0])})" if len(picked)
                      else f"{model}\n(skipped)")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("predicted scoring peak (GB)")
    decided = ", ".join(map(str, sorted(set(frame["batch_size"]))))
    lengths = ", ".join(map(str, sorted(set(frame["max_length"]))))
    ax.set_title(f"Memory plan: scoring peak at batch size {decided}, {lengths} tokens (solid = chosen)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLAN_FILES = {"csv": "plan.csv", "markdown": "plan.md", "plot": "plan.png"}
"""The memory plan's tables, as :func:`write_plan` names them in its directory."""


def write_plan(plans: Sequence[ModelPlan], budget_bytes: int, out: Path) -> "pd.DataFrame":
    """Write the plan's table (``plan.csv``, ``plan.md``) and plot (``plan.png``) into ``out``; return the table.

    The one writer of these files: ``ftflow plan`` and the pipeline's ``plan_memory`` stage both call it.
    """
    frame = plan_table(plans)
    out = Path(out)
    frame.to_csv(out / PLAN_FILES["csv"], index=False)
    (out / PLAN_FILES["markdown"]).write_text(plan_markdown(frame) + "\n", encoding="utf-8")
    plot_plan(frame, budget_bytes, out / PLAN_FILES["plot"])
    return frame


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
    :func:`ftflow.training.train_lora` runs then.
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


def check_training_run(
    path_or_id: str,
    precision: str,
    method: Method,
    *,
    tokenizer,
    train_sentences: Sequence[str],
    validation_sentences: Sequence[str],
    batch_size: int,
    eval_batch_size: int,
    max_length: int,
    budget_bytes: int,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    device: Device = "cuda",
    lora_r: int = 8,
    lora_dropout: float = 0.05,
    num_virtual_tokens: int = 8,
    trust_remote_code: bool = False,
) -> MemoryPrediction:
    """:func:`check_training_fits` at the lengths one run will see, measured on its own data.

    The step is planned on the longest sentence of ``train_sentences``, the
    set that trains (augmented: random insertion lengthens sentences, so the
    split it was made from understates it), and the validation pass on the
    longest of ``validation_sentences``, the split scored between epochs; both
    under the run's ``tokenizer`` and at most ``max_length`` tokens.

    Raises:
        MemoryBudgetError: the larger of the two peaks exceeds the budget.
    """
    return check_training_fits(
        path_or_id, precision, method, batch_size=batch_size,
        max_length=longest_sequence(tokenizer, train_sentences, max_length), budget_bytes=budget_bytes,
        eval_batch_size=eval_batch_size, eval_length=longest_sequence(tokenizer, validation_sentences, max_length),
        logits_chunk_tokens=logits_chunk_tokens, device=device, lora_r=lora_r, lora_dropout=lora_dropout,
        num_virtual_tokens=num_virtual_tokens, trust_remote_code=trust_remote_code,
    )


class TrainingJob(Protocol):
    """What the memory check reads of a training job (:data:`ftflow.jobs.Job`, every method's class)."""

    method: str
    model: dict[str, Any]
    precision: str
    batch_size: int

    def memory_options(self) -> dict[str, Any]: ...


def check_training_job(
    job: TrainingJob,
    *,
    tokenizer,
    train_sentences: Sequence[str],
    validation_sentences: Sequence[str],
    eval_batch_size: int,
    max_length: int,
    budget_bytes: int,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
    device: Device = "cuda",
) -> tuple[MemoryPrediction, Optional[str]]:
    """The memory plan of one training job, on its own data: ``(prediction, master_weights)``.

    The job's method (QLoRA as itself), precision, batch size and the method's
    own settings (LoRA rank and dropout, prefix length: ``job.memory_options()``)
    are what is planned. ``master_weights`` is None except for full fine-tuning
    and distillation of a bf16/fp16 model: ``fp32`` (master weights under
    autocast) when an fp32 run of the same job fits, whose peak bounds theirs,
    else the model's precision (bf16 weights with a compensated update, see
    :func:`ftflow.training.plan_precision`).

    Raises:
        MemoryBudgetError: the run is predicted over the budget, or an fp16 run
            whose fp32 master weights (which fp16 training needs) do not fit.
    """
    options = dict(tokenizer=tokenizer, train_sentences=train_sentences, validation_sentences=validation_sentences,
                   batch_size=job.batch_size, eval_batch_size=eval_batch_size, max_length=max_length,
                   budget_bytes=budget_bytes, logits_chunk_tokens=logits_chunk_tokens, device=device,
                   trust_remote_code=job.model["trust_remote_code"], **job.memory_options())
    path = job.model["path"]
    master_weights = None
    if job.method in ("full", "distill") and job.precision in ("bf16", "fp16"):
        try:
            check_training_run(path, "fp32", job.method, **options)
            master_weights = "fp32"
        except MemoryBudgetError as exc:
            if job.precision == "fp16":
                raise MemoryBudgetError(f"fp16 training needs fp32 master weights, which do not fit: {exc}")
            master_weights = job.precision
    return check_training_run(path, job.precision, job.method, **options), master_weights
