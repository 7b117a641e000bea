"""Tiny tokenizers and models built in memory for tests (nothing is downloaded)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WORDS = (
    "the a cat dog bird sat on mat ran fast slow big small red blue green "
    "and is was very good bad film movie story plot acting fun dull"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran fast",
    "the film was very good",
    "the plot is dull and the acting is bad",
    "a big red bird",
    "the movie was fun",
    "a small blue cat sat",
    "the story is very very good and the acting was fun",
]


def tiny_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS; without BOS it behaves like Qwen2's."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>" if with_bos else None,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_model(architecture: str = "llama", vocab_size: int = len(SPECIALS) + len(WORDS), seed: int = 0,
               hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised causal LM of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif architecture == "granite":
        model = GraniteForCausalLM(GraniteConfig(**common))
    else:
        raise ValueError(architecture)
    return model.eval()


def saved_base(path, hidden_size: int = 64) -> dict:
    """A tiny Llama and its tokenizer saved in ``path``, as the pipeline's benchmarked model dict."""
    tiny_model("llama", hidden_size=hidden_size).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return {"name": "tiny", "path": str(path), "family": "tiny", "precision": "fp32", "trust_remote_code": False}
