"""Bootstrap intervals and paired comparisons over test sentences: exact values on a small fixed example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ftflow.perplexity import PerplexityResult
from ftflow.study.uncertainty import (Interval, NotPairedError, SentenceScores, _resampled, comparable_metric, interval,
                                      paired_difference, resample_indices)

# Five sentences: summed NLL (nats), scored tokens, bytes.
NLL_A = [12.0, 3.5, 20.25, 7.0, 9.75]
NLL_B = [11.0, 3.75, 18.5, 7.5, 9.0]
TOKENS = [6, 2, 9, 4, 5]
BYTES = [30, 9, 44, 18, 25]


def scores(nll, tokens=TOKENS, nbytes=BYTES, fingerprint="f") -> SentenceScores:
    return SentenceScores.from_record({"nll": nll, "tokens": tokens, "bytes": nbytes, "sentences_sha256": fingerprint})


def percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, by hand: between the two order statistics around q (n - 1)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def by_loop(nll, tokens, draws) -> list[float]:
    """Each resample's corpus PPL from its summed NLL and summed tokens, one resample at a time."""
    return [math.exp(math.fsum(nll[i] for i in row) / sum(tokens[i] for i in row)) for row in draws.tolist()]


def test_each_resample_is_token_weighted_from_its_sums_by_hand():
    a = scores(NLL_A)
    draws = np.array([[0, 0, 1, 1, 1], [2, 2, 2, 2, 2], [4, 3, 2, 1, 0]])
    ppl = _resampled(a, draws, "ppl")
    assert ppl[0] == pytest.approx(math.exp((12.0 * 2 + 3.5 * 3) / (6 * 2 + 2 * 3)), rel=1e-15)
    assert ppl[1] == pytest.approx(math.exp(20.25 / 9), rel=1e-15)
    assert ppl[2] == pytest.approx(math.exp(52.5 / 26), rel=1e-15)  # the whole set, in another order
    # Not the mean of per-sentence perplexities, which the short, hard sentence 1 would dominate.
    assert ppl[0] != pytest.approx((2 * math.exp(12 / 6) + 3 * math.exp(3.5 / 2)) / 5)
    bpb = _resampled(a, draws, "bits_per_byte")
    assert bpb[0] == pytest.approx((12.0 * 2 + 3.5 * 3) / (math.log(2) * (30 * 2 + 9 * 3)), rel=1e-15)


def test_interval_is_the_corpus_ppl_and_the_percentiles_of_1000_seeded_resamples():
    a = scores(NLL_A)
    result = interval(a)  # 1000 resamples, seed 0, 95%
    assert result.estimate == pytest.approx(math.exp(sum(NLL_A) / sum(TOKENS)), rel=1e-15)
    draws = np.random.default_rng(0).integers(0, 5, size=(1000, 5))
    values = by_loop(NLL_A, TOKENS, draws)
    assert (result.low, result.high) == pytest.approx((percentile(values, 0.025), percentile(values, 0.975)),
                                                      rel=1e-12)
    assert result.low < result.estimate < result.high and result.resamples == 1000 and result.level == 0.95
    assert interval(a, seed=0) == result  # seeded: the same draws every time
    assert interval(a, seed=1) != result
    assert result.text() == f"{result.estimate:.4f} [{result.low:.4f}, {result.high:.4f}]"
    one = interval(scores([5.0], [2], [10]))  # one sentence: every resample is that sentence
    assert (one.low, one.estimate, one.high) == pytest.approx((math.exp(2.5),) * 3, rel=1e-15)


def test_a_paired_difference_resamples_the_same_sentences_for_both_models():
    a, b = scores(NLL_A), scores(NLL_B)
    result = paired_difference(a, b)
    assert result.metric == "ppl"  # same tokens per sentence: one tokenizer
    ppl_a, ppl_b = math.exp(sum(NLL_A) / sum(TOKENS)), math.exp(sum(NLL_B) / sum(TOKENS))
    assert (result.a, result.b, result.difference) == pytest.approx((ppl_a, ppl_b, ppl_a - ppl_b), rel=1e-12)
    assert result.percent == pytest.approx(100 * (ppl_a / ppl_b - 1), rel=1e-12)
    draws = np.random.default_rng(0).integers(0, 5, size=(1000, 5))
    differences = [x - y for x, y in zip(by_loop(NLL_A, TOKENS, draws), by_loop(NLL_B, TOKENS, draws))]
    assert (result.low, result.high) == pytest.approx(
        (percentile(differences, 0.025), percentile(differences, 0.975)), rel=1e-10)
    percents = [100 * (x / y - 1) for x, y in zip(by_loop(NLL_A, TOKENS, draws), by_loop(NLL_B, TOKENS, draws))]
    assert (result.percent_low, result.percent_high) == pytest.approx(
        (percentile(percents, 0.025), percentile(percents, 0.975)), rel=1e-10)
    # Paired, the interval is far narrower than the two models' own intervals overlap.
    assert result.high - result.low < interval(a).high - interval(a).low
    assert result.within_noise == (result.low <= 0 <= result.high)
    backwards = paired_difference(b, a)
    assert backwards.difference == pytest.approx(-result.difference, rel=1e-12)
    assert (backwards.low, backwards.high) == pytest.approx((-result.high, -result.low), rel=1e-10)


def test_a_model_against_itself_differs_by_exactly_zero():
    a = scores(NLL_A)
    same = paired_difference(a, a)
    assert (same.difference, same.low, same.high, same.percent, same.percent_low, same.percent_high) == (0.0,) * 6
    assert same.within_noise and same.verdict == "within noise"
    assert paired_difference(a, a, "bits_per_byte").difference == 0.0


def test_a_clear_difference_is_separable_and_a_small_one_is_within_noise():
    worse = scores([x + 3.0 for x in NLL_A])  # every sentence 3 nats worse
    clear = paired_difference(worse, scores(NLL_A))
    assert not clear.within_noise and clear.verdict == "higher" and clear.low > 0
    assert clear.text().endswith(", separable")
    mixed = scores([12.5, 3.0, 20.0, 7.5, 9.5])  # better on some sentences, worse on others, about equal overall
    assert paired_difference(mixed, scores(NLL_A)).within_noise


def test_other_tokenizers_are_compared_in_bits_per_byte():
    other = scores([10.0, 4.0, 21.0, 6.0, 10.0], tokens=[5, 3, 8, 4, 6])
    a = scores(NLL_A)
    assert comparable_metric(a, other) == "bits_per_byte" and comparable_metric(a, a) == "ppl"
    result = paired_difference(a, other)
    assert result.metric == "bits_per_byte"
    assert result.a == pytest.approx(sum(NLL_A) / (math.log(2) * sum(BYTES)), rel=1e-15)
    with pytest.raises(ValueError, match="bytes"):
        paired_difference(scores(NLL_A, nbytes=[]), scores(NLL_B, tokens=[1, 2, 3, 4, 5], nbytes=[]))


def test_scores_of_other_sentences_are_refused():
    a = scores(NLL_A)
    with pytest.raises(NotPairedError, match=r"different sentences \(5 vs 4\)"):
        paired_difference(a, scores(NLL_B[:4], TOKENS[:4], BYTES[:4]))
    with pytest.raises(NotPairedError, match="fingerprints"):
        paired_difference(a, scores(NLL_B, fingerprint="g"))


def test_the_scorer_keeps_what_the_bootstrap_needs():
    result = PerplexityResult(total_nll=6.0, scored_tokens=4, total_bytes=10, n_sentences=2, n_truncated=0,
                              sentence_nll=(2.0, 4.0), sentence_tokens=(1, 3), sentence_bytes=(3, 7))
    record = result.per_sentence(["abc", "defghij"])
    assert record["nll"] == [2.0, 4.0] and record["tokens"] == [1, 3] and record["bytes"] == [3, 7]
    assert len(record["sentences_sha256"]) == 64
    assert record["sentences_sha256"] != result.per_sentence(["abc", "defghik"])["sentences_sha256"]
    back = SentenceScores.from_record(record)
    assert back.value("ppl") == pytest.approx(result.corpus_ppl, rel=1e-15)
    assert back.value("bits_per_byte") == pytest.approx(result.bits_per_byte, rel=1e-15)
    assert isinstance(interval(back), Interval)
    assert resample_indices(2, 3, 0).shape == (3, 2)
