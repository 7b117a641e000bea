"""Architecture numbers of the study's hub models, so memory planning works offline.

:func:`ftflow.memory.model_config_for` builds a transformers config from these
numbers when a hub id is given and no config can be read, so the planner can
count parameters (exactly, on the ``meta`` device) and predict peaks without
the hub. They describe shapes only: nothing here is enough to load weights.

Sources: each model's ``config.json`` on the Hugging Face hub as published
(transcribed by hand; cross-checked against the parameter counts below, which
``tests/unit/test_memory.py`` compares with the meta-device count).
Uncertain entries say so in a comment. An ``-Instruct`` variant has the same
shapes as its base model unless stated.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
)
"""Fields every entry of :data:`KNOWN_MODELS` has (``head_dim`` is optional, default hidden / heads; Granite
entries also have its four multipliers, see ``_GRANITE_8B_SCALING``)."""


def _arch(model_type, hidden, layers, heads, kv_heads, intermediate, vocab, tied, max_positions) -> dict:
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": max_positions,
    }


_TINYLLAMA = _arch("llama", 2048, 22, 32, 4, 5632, 32000, False, 2048)
_QWEN25_05B = _arch("qwen2", 896, 24, 14, 2, 4864, 151936, True, 32768)
_QWEN25_15B = _arch("qwen2", 1536, 28, 12, 2, 8960, 151936, True, 131072)
_QWEN25_15B_INSTRUCT = {**_QWEN25_15B, "max_position_embeddings": 32768}
_QWEN25_7B = _arch("qwen2", 3584, 28, 28, 4, 18944, 152064, False, 131072)
_QWEN25_7B_INSTRUCT = {**_QWEN25_7B, "max_position_embeddings": 32768}
# The 1M variant: same shapes; its context length is from memory (unused by the planner).
_QWEN25_7B_INSTRUCT_1M = {**_QWEN25_7B, "max_position_embeddings": 1010000}
_LLAMA32_1B = _arch("llama", 2048, 16, 32, 8, 8192, 128256, True, 131072)
_LLAMA32_3B = _arch("llama", 3072, 28, 24, 8, 8192, 128256, True, 131072)
# Granite 3.0: 4K context, vocabulary 49155. Granite 3.1/3.2: same shapes, 128K context.
# Granite 3.3: vocabulary 49159 (confirmed by the published 2,533,539,840 and 8,170,864,640 counts).
# Granite's forward also scales: embeddings x embedding_multiplier, attention scores x attention_multiplier
# (1 / head_dim), each residual branch x residual_multiplier, logits / logits_scaling. They change no shape
# (the planner ignores them) but they do change the forward that ftflow's chunked scoring must reproduce, so
# checkpoints built from these numbers (bench/rehearsal.py, bench/gpu_check.py) carry them. Transcribed from
# granite-3.3-8b-base's and granite-3.1-2b-base's config.json; the other sizes' from memory (same per size).
_GRANITE_2B_SCALING = {"embedding_multiplier": 12.0, "attention_multiplier": 0.015625, "residual_multiplier": 0.22,
                       "logits_scaling": 8.0}
_GRANITE_8B_SCALING = {"embedding_multiplier": 12.0, "attention_multiplier": 0.0078125, "residual_multiplier": 0.22,
                       "logits_scaling": 16.0}
_GRANITE30_2B = {**_arch("granite", 2048, 40, 32, 8, 8192, 49155, True, 4096), **_GRANITE_2B_SCALING}
_GRANITE30_8B = {**_arch("granite", 4096, 40, 32, 8, 12800, 49155, True, 4096), **_GRANITE_8B_SCALING}
_GRANITE31_2B = {**_GRANITE30_2B, "max_position_embeddings": 131072}
_GRANITE31_8B = {**_GRANITE30_8B, "max_position_embeddings": 131072}
_GRANITE33_2B = {**_GRANITE31_2B, "vocab_size": 49159}
_GRANITE33_8B = {**_GRANITE31_8B, "vocab_size": 49159}

KNOWN_MODELS: Mapping[str, Mapping] = MappingProxyType({
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": _TINYLLAMA,
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "Qwen/Qwen2.5-1.5B": _QWEN25_15B,
    "Qwen/Qwen2.5-1.5B-Instruct": _QWEN25_15B_INSTRUCT,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B_INSTRUCT,
    "Qwen/Qwen2.5-7B-Instruct-1M": _QWEN25_7B_INSTRUCT_1M,
    "meta-llama/Llama-3.2-1B": _LLAMA32_1B,
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA32_1B,
    "meta-llama/Llama-3.2-3B": _LLAMA32_3B,
    "meta-llama/Llama-3.2-3B-Instruct": _LLAMA32_3B,
    "ibm-granite/granite-3.0-2b-base": _GRANITE30_2B,
    "ibm-granite/granite-3.0-2b-instruct": _GRANITE30_2B,
    "ibm-granite/granite-3.0-8b-base": _GRANITE30_8B,
    "ibm-granite/granite-3.0-8b-instruct": _GRANITE30_8B,
    "ibm-granite/granite-3.1-2b-base": _GRANITE31_2B,
    "ibm-granite/granite-3.1-2b-instruct": _GRANITE31_2B,
    "ibm-granite/granite-3.1-8b-base": _GRANITE31_8B,
    "ibm-granite/granite-3.1-8b-instruct": _GRANITE31_8B,
    "ibm-granite/granite-3.2-2b-instruct": _GRANITE31_2B,
    "ibm-granite/granite-3.2-8b-instruct": _GRANITE31_8B,
    "ibm-granite/granite-3.3-2b-base": _GRANITE33_2B,
    "ibm-granite/granite-3.3-2b-instruct": _GRANITE33_2B,
    "ibm-granite/granite-3.3-8b-base": _GRANITE33_8B,
    "ibm-granite/granite-3.3-8b-instruct": _GRANITE33_8B,
})
"""Hub id -> architecture numbers (see :data:`ARCHITECTURE_FIELDS`)."""

PUBLISHED_PARAMETERS: Mapping[str, float] = MappingProxyType({
    # Rounded figures from the model cards / hub pages ("0.49B", "7.61B"...).
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1.1e9,
    "Qwen/Qwen2.5-0.5B": 0.49e9,
    "Qwen/Qwen2.5-1.5B": 1.54e9,
    "Qwen/Qwen2.5-7B": 7.61e9,
    "meta-llama/Llama-3.2-1B": 1.24e9,
    "meta-llama/Llama-3.2-3B": 3.21e9,
    # Hub pages of Granite 3.3 list 2.53B and 8.17B. The 3.0 / 3.1 cards say "2B" and "8B";
    # their shapes differ from 3.3 only by four vocabulary rows, so 2.53B / 8.17B apply.
    "ibm-granite/granite-3.0-2b-base": 2.53e9,
    "ibm-granite/granite-3.0-8b-base": 8.17e9,
    "ibm-granite/granite-3.3-2b-base": 2.53e9,
    "ibm-granite/granite-3.3-8b-base": 8.17e9,
})
"""Hub id -> parameter count as published (rounded); the test allows 3%."""


def known_architecture(model_id: str) -> dict | None:
    """The architecture numbers of a known hub id (case-insensitive), or None."""
    if model_id in KNOWN_MODELS:
        return dict(KNOWN_MODELS[model_id])
    lowered = model_id.lower()
    for known, numbers in KNOWN_MODELS.items():
        if known.lower() == lowered:
            return dict(numbers)
    return None
