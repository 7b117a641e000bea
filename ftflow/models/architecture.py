"""A model's architecture from its config alone: exact parameter counts on the ``meta`` device, the shapes the
memory planner needs (hidden, intermediate, key/value widths, vocabulary).

:func:`model_config_for` gets a config without the hub (local directory, ftflow's table of known models,
or the configs an online run fetched).
"""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ftflow.models.known import known_architecture


class UnknownModelError(ValueError):
    """A model whose config ftflow cannot get offline; the message says how to fix it."""


# ----------------------------------------------------------------------------- configs and counts


def model_config_for(path_or_id: str, trust_remote_code: bool = False, config_dir: Optional[Path] = None):
    """The transformers config of a model, without reaching the hub.

    Looked up in this order: a local directory (its ``config.json``); a hub id
    that ftflow knows (:data:`ftflow.models.known.KNOWN_MODELS`, built through
    the transformers config class of its ``model_type``); the local Hugging Face
    cache (``AutoConfig`` with ``local_files_only=True``); ``config_dir``, where
    an online run keeps the ``config.json`` it read from the hub for an id it
    does not know (``<config_dir>/<org>/<name>/config.json``, written by
    :func:`ftflow.models.hub.fetch_configs`).

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
        "ftflow knows (ftflow/models/known.py), and its config is not in the local Hugging Face cache "
        f"({cache_error}) nor read from the hub by this run. Fix: check the id; give the path of a local checkpoint "
        "directory, add the model's architecture numbers to ftflow/models/known.py, or run once with network "
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

