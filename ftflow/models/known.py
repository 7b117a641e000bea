"""Architecture numbers of the study's hub models, so memory planning works offline.

:func:`ftflow.models.architecture.model_config_for` builds a transformers config from these
numbers when a hub id is given and no config can be read, so the planner can
count parameters (exactly, on the ``meta`` device) and predict peaks without
the hub. They describe shapes only: nothing here is enough to load weights.

Sources: each model's ``config.json`` on the Hugging Face hub as published
(transcribed by hand; cross-checked against the parameter counts below, which
``tests/unit/plan/test_memory.py`` compares with the meta-device count).
Uncertain entries say so in a comment. An ``-Instruct`` variant has the same
shapes as its base model unless stated.

:data:`HUB_DTYPES` gives the dtype of each model's weights as stored on the hub
(its safetensors, or ``pytorch_model*.bin`` where the repository has no
safetensors), from which ``ftflow plan`` estimates download sizes offline.
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
# The 1M variant: same shapes, 1,010,000 positions (its config.json; dual-chunk attention over an original 262,144).
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
# Qwen3-4B: head_dim 128 is not hidden / heads (80); 40,960 positions; tied embeddings (Qwen/Qwen3-4B config.json:
# hidden 2560, 36 layers, 32 heads, 8 KV heads, intermediate 9728; the card's "4.0B, 3.6B non-embedding").
_QWEN3_4B = {**_arch("qwen3", 2560, 36, 32, 8, 9728, 151936, True, 40960), "head_dim": 128}
# DeepSeek-R1-Distill-Qwen-1.5B: Qwen2.5-Math-1.5B's shapes with an untied output layer (its safetensors hold
# lm_head.weight: 1.78B parameters where Qwen2.5-1.5B has 1.54B), 131,072 positions.
_R1_DISTILL_QWEN_15B = _arch("qwen2", 1536, 28, 12, 2, 8960, 151936, False, 131072)
# deepseek-llm-7b-chat (and -base): a Llama architecture with full multi-head attention (32 KV heads), 30 layers,
# vocabulary 102,400, untied, 4K context (the card's 7B; 6.91B counted).
_DEEPSEEK_LLM_7B = _arch("llama", 4096, 30, 32, 32, 11008, 102400, False, 4096)

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
    "Qwen/Qwen3-4B": _QWEN3_4B,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _R1_DISTILL_QWEN_15B,
    "deepseek-ai/deepseek-llm-7b-base": _DEEPSEEK_LLM_7B,
    "deepseek-ai/deepseek-llm-7b-chat": _DEEPSEEK_LLM_7B,
})
"""Hub id -> architecture numbers (see :data:`ARCHITECTURE_FIELDS`)."""

HUB_DTYPES: Mapping[str, str] = MappingProxyType({
    # Every model above is stored in bfloat16 on the hub ("torch_dtype": "bfloat16" in each config.json; the file
    # sizes agree, e.g. TinyLlama's model.safetensors 2.2 GB for 1.1B parameters, Llama-3.2-1B's 2.47 GB for 1.24B,
    # deepseek-llm-7b-chat's two pytorch_model*.bin shards 13.8 GB for 6.9B).
    model_id: "bf16" for model_id in KNOWN_MODELS
})
"""Hub id -> dtype of the weights files on the hub (``bf16``, ``fp16`` or ``fp32``)."""

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
    "Qwen/Qwen3-4B": 4.02e9,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1.78e9,
    "deepseek-ai/deepseek-llm-7b-chat": 6.91e9,
})
"""Hub id -> parameter count as published (rounded); the test allows 3%."""


def known_id(model_id: str) -> str | None:
    """The id as :data:`KNOWN_MODELS` spells it (hub ids are case-insensitive), or None."""
    if model_id in KNOWN_MODELS:
        return model_id
    lowered = model_id.lower()
    return next((known for known in KNOWN_MODELS if known.lower() == lowered), None)


def known_architecture(model_id: str) -> dict | None:
    """The architecture numbers of a known hub id (case-insensitive), or None."""
    known = known_id(model_id)
    return None if known is None else dict(KNOWN_MODELS[known])
