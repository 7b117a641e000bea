"""ftflow.perplexity: exact values, invariance to batching, and the edges of the definition."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ftflow import perplexity
from ftflow.perplexity import LogitsMismatchError, PerplexityResult, batch_nll, score_sentences, token_nll
from ftflow.tokens import IGNORE_INDEX, sentence_ids
from tests.tiny import SENTENCES, tiny_model, tiny_tokenizer

VOCAB = 33  # len(SPECIALS) + len(WORDS) in tests.tiny
BOS, EOS = 2, 3


def confident(model: nn.Module, std: float = 0.2, seed: int = 1) -> nn.Module:
    """Re-draw the weight matrices with a larger scale.

    At the default init a tiny model's predictions are almost uniform, which
    would hide a masking bug under float noise; larger weights make every
    token's NLL depend strongly on its context.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def tokenizer_for(architecture: str):
    """Qwen2 tokenizers have no BOS, the others do."""
    return tiny_tokenizer(with_bos=architecture != "qwen2")


def hand_nll(model: nn.Module, ids: list[int]) -> float:
    """Sum of -log p(ids[t] | ids[:t]) for t >= 1, log-softmax written out in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total = 0.0
    for t in range(1, len(ids)):
        row = logits[t - 1].tolist()
        peak = max(row)
        log_normalizer = peak + math.log(sum(math.exp(x - peak) for x in row))
        total += log_normalizer - row[ids[t]]
    return total


class ZeroLogits(nn.Module):
    """A model stub whose logits are all zero (uniform prediction); records what it was given."""

    def __init__(self, vocab_size: int = VOCAB):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the stub a device
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask, position_ids, use_cache=None):
        self.calls.append(
            dict(
                input_ids=input_ids.clone(),
                attention_mask=attention_mask.clone(),
                position_ids=position_ids.clone(),
                training=self.training,
                inference_mode=torch.is_inference_mode_enabled(),
            )
        )
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


# --- exact values -----------------------------------------------------------


def test_total_nll_matches_a_hand_computation():
    model = confident(tiny_model("llama"))
    tokenizer = tiny_tokenizer()
    text = SENTENCES[3]
    ids, _ = sentence_ids(tokenizer, text, max_length=2048)

    result = score_sentences(model, tokenizer, [text], progress=False)

    assert result.total_nll == pytest.approx(hand_nll(model, ids), rel=1e-6, abs=1e-6)
    # "the plot is dull and the acting is bad": 9 words, all predicted after <s>.
    assert result.scored_tokens == len(ids) - 1 == 9
    assert result.corpus_ppl == pytest.approx(math.exp(hand_nll(model, ids) / 9), rel=1e-6)


def test_zero_logits_give_perplexity_equal_to_vocab_size():
    result = score_sentences(ZeroLogits(), tiny_tokenizer(), SENTENCES, batch_size=3, progress=False)

    assert result.corpus_ppl == pytest.approx(VOCAB, rel=1e-6)
    assert result.mean_sentence_ppl == pytest.approx(VOCAB, rel=1e-6)
    assert result.total_nll == pytest.approx(result.scored_tokens * math.log(VOCAB), rel=1e-6)


def test_zeroed_lm_head_gives_perplexity_equal_to_vocab_size():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()

    result = score_sentences(model, tiny_tokenizer(), SENTENCES, batch_size=4, progress=False)

    assert result.corpus_ppl == pytest.approx(VOCAB, rel=1e-6)


def test_bits_per_byte_by_hand():
    # "the cat sat": 3 words predicted after <s>, 11 UTF-8 bytes, uniform over 33 ids.
    result = score_sentences(ZeroLogits(), tiny_tokenizer(), ["the cat sat"], progress=False)

    assert result.scored_tokens == 3
    assert result.total_bytes == 11
    assert result.bits_per_byte == pytest.approx(3 * math.log2(VOCAB) / 11, rel=1e-6)
    assert result.nll_per_token == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_total_bytes_counts_utf8_bytes_not_characters():
    # "é" is an unknown word (one <unk> token) but 2 UTF-8 bytes.
    result = score_sentences(ZeroLogits(), tiny_tokenizer(), ["the café"], progress=False)

    assert result.scored_tokens == 2
    assert result.total_bytes == len("the café".encode("utf-8")) == 9


def test_truncation_is_counted_and_only_the_kept_part_is_scored():
    long_sentence = SENTENCES[7]  # "the story is very very good and the acting was fun"
    result = score_sentences(
        ZeroLogits(), tiny_tokenizer(), [long_sentence, "a dog"], max_length=3, progress=False
    )

    assert result.n_truncated == 1
    assert result.sentence_tokens == (2, 2)
    assert result.scored_tokens == 4
    # Kept part of the long sentence decodes to "the story" (9 bytes), plus "a dog" (5).
    assert result.total_bytes == 9 + 5
    assert result.sentence_bytes == (9, 5)  # per sentence too: bits per byte of any resample (ftflow.study.uncertainty)


def test_sentences_at_exactly_max_length_are_not_truncated():
    result = score_sentences(ZeroLogits(), tiny_tokenizer(), ["the cat sat"], max_length=4, progress=False)

    assert result.n_truncated == 0
    assert result.scored_tokens == 3


# --- batching does not change the result ------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "granite"])
def test_batch_size_and_padding_side_do_not_change_the_result(architecture):
    model = confident(tiny_model(architecture))
    tokenizer = tokenizer_for(architecture)
    reference = score_sentences(model, tokenizer, SENTENCES, batch_size=1, progress=False)

    for batch_size in (1, 3, 32):
        for padding_side in ("right", "left"):
            result = score_sentences(
                model, tokenizer, SENTENCES, batch_size=batch_size, padding_side=padding_side, progress=False
            )
            assert result.corpus_ppl == pytest.approx(reference.corpus_ppl, rel=1e-5), (batch_size, padding_side)
            assert result.sentence_nll == pytest.approx(reference.sentence_nll, rel=1e-5)
            assert result.sentence_tokens == reference.sentence_tokens
            assert result.total_bytes == reference.total_bytes


def _out_of_memory_on(monkeypatch, failing_calls: set[int]) -> list[int]:
    """batch_nll raises CUDA's out-of-memory error on the given calls (0-based); returns each call's batch size."""
    sizes = []
    real = perplexity.batch_nll

    def flaky(model, inputs, labels, **kwargs):
        sizes.append(labels.shape[0])
        if len(sizes) - 1 in failing_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, inputs, labels, **kwargs)

    monkeypatch.setattr(perplexity, "batch_nll", flaky)
    return sizes


def test_out_of_memory_halves_the_batch_and_gives_the_smaller_batchs_result(monkeypatch, caplog):
    model, tokenizer = confident(tiny_model("llama")), tokenizer_for("llama")
    at_four = score_sentences(model, tokenizer, SENTENCES, batch_size=4, progress=False)
    sizes = _out_of_memory_on(monkeypatch, {0})
    with caplog.at_level("WARNING", logger="ftflow.perplexity"):
        result = score_sentences(model, tokenizer, SENTENCES, batch_size=8, progress=False)
    # The first batch of 8 failed; every batch from it on was one of 4: the same batches, the same sums.
    assert sizes == [8, 4, 4]
    assert result == at_four
    assert "out of memory scoring 8 sentences" in caplog.text and "at batch size 4" in caplog.text


def test_out_of_memory_midway_goes_on_from_the_failed_batch(monkeypatch):
    model, tokenizer = confident(tiny_model("llama")), tokenizer_for("llama")
    reference = score_sentences(model, tokenizer, SENTENCES, batch_size=1, progress=False)
    sizes = _out_of_memory_on(monkeypatch, {1})  # the second batch of 3 fails: 3 // 2 = 1 from there on
    result = score_sentences(model, tokenizer, SENTENCES, batch_size=3, progress=False)
    assert sizes == [3, 3, 1, 1, 1, 1, 1]  # 3 scored, then each of the 5 left on its own
    # Every sentence scored once; batching changes sums only by float rounding (as for any batch size).
    assert result.sentence_tokens == reference.sentence_tokens
    assert result.sentence_nll == pytest.approx(reference.sentence_nll, rel=1e-5)


def test_a_single_sentence_that_does_not_fit_fails(monkeypatch):
    model, tokenizer = tiny_model("llama"), tokenizer_for("llama")
    _out_of_memory_on(monkeypatch, {0, 1})
    with pytest.raises(torch.OutOfMemoryError):
        score_sentences(model, tokenizer, SENTENCES[:2], batch_size=2, progress=False)


def test_per_sentence_values_come_back_in_input_order():
    model = confident(tiny_model("llama"))
    tokenizer = tiny_tokenizer()

    together = score_sentences(model, tokenizer, SENTENCES, batch_size=3, progress=False)
    alone = [score_sentences(model, tokenizer, [text], progress=False) for text in SENTENCES]

    assert together.sentence_nll == pytest.approx([r.total_nll for r in alone], rel=1e-5)
    assert together.sentence_tokens == tuple(r.scored_tokens for r in alone)
    assert together.total_nll == pytest.approx(sum(r.total_nll for r in alone), rel=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pads_are_masked(padding_side):
    model = confident(tiny_model("llama"))
    tokenizer = tiny_tokenizer()
    short = "a dog ran fast"
    long = " ".join(["the story is very good"] * 8)

    alone = score_sentences(model, tokenizer, [short], progress=False)
    with_long = score_sentences(model, tokenizer, [short, long], batch_size=2, padding_side=padding_side, progress=False)

    assert with_long.sentence_nll[0] == pytest.approx(alone.total_nll, rel=1e-5)
    assert with_long.sentence_tokens[0] == alone.scored_tokens == 4
    # The short sentence really shared a batch with 36 pads.
    assert with_long.sentence_tokens[1] == 40


def test_batches_are_length_sorted_longest_first():
    model = ZeroLogits()
    score_sentences(model, tiny_tokenizer(), ["a", "the cat sat on the mat", "a dog"], batch_size=1, progress=False)

    assert [call["input_ids"].shape[1] for call in model.calls] == [7, 3, 2]


# --- start token, modes, model variants ---------------------------------------


def test_tokenizer_without_bos_uses_eos_as_start_token():
    model = ZeroLogits()
    score_sentences(model, tiny_tokenizer(with_bos=False), ["the cat", "a dog ran"], batch_size=2, progress=False)

    (call,) = model.calls
    assert call["input_ids"].tolist() == [[EOS, 5, 7, 12], [EOS, 4, 6, 0]]
    assert call["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 2]]
    assert call["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_qwen2_without_bos_matches_hand_computation_with_eos_start():
    model = confident(tiny_model("qwen2"))
    tokenizer = tiny_tokenizer(with_bos=False)
    text = SENTENCES[0]

    result = score_sentences(model, tokenizer, [text], progress=False)

    ids = [EOS, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert result.total_nll == pytest.approx(hand_nll(model, ids), rel=1e-6, abs=1e-6)


def test_runs_in_eval_and_inference_mode_and_restores_training_flag():
    model = ZeroLogits().train()
    score_sentences(model, tiny_tokenizer(), ["the cat"], progress=False)

    assert model.calls[0]["training"] is False
    assert model.calls[0]["inference_mode"] is True
    assert model.training is True


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft vs transformers 5
def test_peft_wrapped_model_scores_like_its_base():
    import peft

    base = confident(tiny_model("llama"))
    tokenizer = tiny_tokenizer()
    expected = score_sentences(base, tokenizer, SENTENCES, batch_size=3, progress=False)

    # LoRA's B matrix starts at zero, so the adapted model equals its base.
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    result = score_sentences(wrapped, tokenizer, SENTENCES, batch_size=3, padding_side="left", progress=False)

    assert result.corpus_ppl == pytest.approx(expected.corpus_ppl, rel=1e-5)


def test_bf16_logits_are_scored_in_float32():
    model = confident(tiny_model("llama")).to(torch.bfloat16)
    tokenizer = tiny_tokenizer()
    text = SENTENCES[7]
    ids, _ = sentence_ids(tokenizer, text, max_length=2048)

    result = score_sentences(model, tokenizer, [text], progress=False)

    # The bf16 logits themselves are exact inputs; a bf16 log-softmax would be off by ~1e-2.
    assert result.total_nll == pytest.approx(hand_nll(model, ids), rel=1e-6)


def test_token_nll_masks_ignore_index_and_ignores_pad_logits():
    logits = torch.zeros(2, 3, 4)
    logits[1, 2] = float("nan")  # a pad position's logits must not matter
    labels = torch.tensor([[IGNORE_INDEX, 1, 2], [IGNORE_INDEX, 3, IGNORE_INDEX]])

    nll, count = token_nll(logits, labels)

    assert count.tolist() == [2, 1]
    assert nll.dtype == torch.float64
    assert nll.tolist() == pytest.approx([2 * math.log(4), math.log(4)], rel=1e-7)


# --- scoring without full logits ---------------------------------------------


def _wrapped(architecture: str, wrap: str | None, dtype=torch.float32) -> nn.Module:
    peft = pytest.importorskip("peft")
    model = confident(tiny_model(architecture))
    if architecture == "granite":
        model.config.logits_scaling = 4.0  # Granite's forward divides its logits by this
    if wrap == "lora":  # adapters that change the output (B not zero), on the LM head too
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                                           init_lora_weights=False))
    elif wrap == "prefix":  # PEFT's forward injects the prefix key/values: the backbone must run through it
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        with torch.no_grad():
            for param in model.prompt_encoder.parameters():
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    return model.to(dtype).eval()


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("wrap", [None, "lora", "prefix"])
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "granite"])
def test_chunked_head_gives_the_full_logits_nll(architecture, wrap):
    model = _wrapped(architecture, wrap)
    tokenizer = tokenizer_for(architecture)
    full = score_sentences(model, tokenizer, SENTENCES, batch_size=3, logits_chunk_tokens=0, progress=False)
    for chunk in (1, 5, 1024):
        for side in ("right", "left"):
            chunked = score_sentences(model, tokenizer, SENTENCES, batch_size=3, padding_side=side,
                                      logits_chunk_tokens=chunk, progress=False)
            assert chunked.sentence_nll == pytest.approx(full.sentence_nll, rel=1e-6), (chunk, side)
            assert chunked.sentence_tokens == full.sentence_tokens


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("architecture", ["llama", "granite"])
def test_chunked_head_in_bf16_equals_the_full_logits_path(architecture):
    model = _wrapped(architecture, None, torch.bfloat16)
    tokenizer = tokenizer_for(architecture)
    full = score_sentences(model, tokenizer, SENTENCES, batch_size=4, logits_chunk_tokens=0, progress=False)
    chunked = score_sentences(model, tokenizer, SENTENCES, batch_size=4, logits_chunk_tokens=7, progress=False)
    assert chunked.sentence_nll == pytest.approx(full.sentence_nll, rel=1e-6)


def test_chunked_head_on_a_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from ftflow.models.loading import load_model

    tiny_model("llama", hidden_size=64).save_pretrained(tmp_path)
    nf4 = load_model(str(tmp_path), "nf4", "cpu")
    tokenizer = tiny_tokenizer()
    full = score_sentences(nf4, tokenizer, SENTENCES, batch_size=4, logits_chunk_tokens=0, progress=False)
    chunked = score_sentences(nf4, tokenizer, SENTENCES, batch_size=4, logits_chunk_tokens=6, progress=False)
    assert chunked.sentence_nll == pytest.approx(full.sentence_nll, rel=1e-6)


def test_the_head_sees_only_scored_positions_in_chunks():
    model = confident(tiny_model("llama"))
    tokenizer = tiny_tokenizer()
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows.append(args[0].reshape(-1, 32).shape[0]))
    # Two sentences of 9 and 4 words: 13 scored positions (the pads and the last position get none).
    score_sentences(model, tokenizer, [SENTENCES[3], SENTENCES[1]], batch_size=2, logits_chunk_tokens=5,
                    progress=False)
    # The forward's own head call (logits_to_keep=1: one position per row), the check of the
    # head against it (rows whose last position is real: one), then chunks of 5, 5 and 3.
    assert rows == [2, 1, 5, 5, 3]


def test_full_logits_when_chunking_is_off():
    model = confident(tiny_model("llama"))
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows.append(args[0].reshape(-1, 32).shape[0]))
    score_sentences(model, tiny_tokenizer(), [SENTENCES[3], SENTENCES[1]], batch_size=2, logits_chunk_tokens=0,
                    progress=False)
    assert rows == [2 * 10]  # every position of the padded [2, 10] batch


def test_an_unknown_logit_transform_is_refused(monkeypatch):
    model = _wrapped("granite", None)
    # As if ftflow did not know Granite's logits_scaling: the check against the forward catches it.
    monkeypatch.setattr(perplexity, "_logits_transform", lambda base: perplexity._identity)
    with pytest.raises(LogitsMismatchError, match=r"GraniteForCausalLM.*benchmark.logits_chunk_tokens: 0"):
        score_sentences(model, tiny_tokenizer(), SENTENCES, batch_size=2, progress=False)


def test_batch_nll_refuses_a_negative_chunk():
    with pytest.raises(ValueError, match="logits_chunk_tokens must be >= 0"):
        batch_nll(ZeroLogits(), {}, torch.zeros(1, 2, dtype=torch.long), logits_chunk_tokens=-1)


# --- errors and progress ------------------------------------------------------


def test_empty_sentence_list_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        score_sentences(ZeroLogits(), tiny_tokenizer(), [], progress=False)


def test_blank_sentence_is_an_error_naming_its_index():
    with pytest.raises(ValueError, match=r"Sentence 1 .*Drop blank lines"):
        score_sentences(ZeroLogits(), tiny_tokenizer(), ["the cat", "  ", "a dog"], progress=False)


def test_bad_arguments_are_reported_together():
    with pytest.raises(ValueError, match=r"batch_size.*padding_side"):
        score_sentences(ZeroLogits(), tiny_tokenizer(), ["a"], batch_size=0, padding_side="up", progress=False)


def test_progress_bar_shows_only_when_asked(capsys):
    score_sentences(ZeroLogits(), tiny_tokenizer(), ["the cat"], progress=False)
    assert capsys.readouterr().err == ""

    score_sentences(ZeroLogits(), tiny_tokenizer(), ["the cat", "a dog"], progress=True, desc="val ppl")
    err = capsys.readouterr().err
    assert "val ppl" in err and "2/2" in err


# --- PerplexityResult ---------------------------------------------------------


def _result() -> PerplexityResult:
    return PerplexityResult(
        total_nll=6.0,
        scored_tokens=4,
        total_bytes=10,
        n_sentences=2,
        n_truncated=1,
        sentence_nll=(2.0, 4.0),
        sentence_tokens=(1, 3),
    )


def test_result_metrics_by_hand():
    result = _result()

    assert result.nll_per_token == 1.5
    assert result.corpus_ppl == pytest.approx(math.exp(1.5), rel=1e-12)
    assert result.mean_sentence_ppl == pytest.approx((math.exp(2.0) + math.exp(4.0 / 3)) / 2, rel=1e-12)
    assert result.bits_per_byte == pytest.approx(6.0 / (math.log(2) * 10), rel=1e-12)


def test_to_dict_is_json_ready_and_reads_back():
    result = _result()

    summary = json.loads(json.dumps(result.to_dict()))
    assert set(summary) == {
        "total_nll", "scored_tokens", "total_bytes", "n_sentences", "n_truncated",
        "corpus_ppl", "mean_sentence_ppl", "bits_per_byte", "nll_per_token",
    }  # fmt: skip
    assert summary["corpus_ppl"] == pytest.approx(math.exp(1.5))

    full = json.loads(json.dumps(result.to_dict(per_sentence=True)))
    assert full["sentence_nll"] == [2.0, 4.0]
    assert full["sentence_tokens"] == [1, 3]
    assert PerplexityResult.from_dict(full) == result

    # Without per-sentence values the mean sentence perplexity is kept as written.
    summary_back = PerplexityResult.from_dict(summary)
    assert summary_back.sentence_nll == ()
    assert summary_back.to_dict() == summary


def test_result_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="per-sentence values for 3 sentences"):
        PerplexityResult(6.0, 4, 10, 3, 0, sentence_nll=(2.0, 4.0), sentence_tokens=(1, 3))
    with pytest.raises(ValueError, match="scored_tokens"):
        PerplexityResult(0.0, 0, 10, 1, 0)
