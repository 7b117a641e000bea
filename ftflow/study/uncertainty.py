"""How sure a perplexity is: bootstrap intervals over the test sentences, and paired comparisons (pure, numpy).

A corpus perplexity is ``exp(sum of token NLL / scored tokens)`` over the test
sentences (:mod:`ftflow.perplexity`); had the test set held other sentences of
the same task, it would differ. The bootstrap measures by how much: it draws
``resamples`` sets of ``n`` sentences with replacement (seeded), recomputes the
corpus figure of each from its summed NLL and summed tokens (so every resample
stays token-weighted, like the figure itself, not a mean of per-sentence
perplexities), and takes the central ``level`` share of them (the 2.5th and
97.5th percentiles, numpy's linear interpolation) as the interval.

A comparison of two models is **paired**: each resample takes the same
sentences for both, and the interval is that of the difference ``a - b``. A
sentence that is hard for one model is usually hard for the other, so the
paired interval is much narrower than the two separate ones would suggest;
when it contains 0 the two are *within noise*: the test set cannot tell them
apart. Pairing needs the same sentences in the same order for both models
(checked by count and by the split's fingerprint). Token perplexities are only
comparable between models that tokenize the sentences alike; otherwise (other
families) the comparison is in bits per byte, ``sum NLL / (ln 2 * sum bytes)``
(:func:`comparable_metric`).

Every call with the same ``seed`` and sentence count draws the same resamples,
so all the report's figures come from one set of resamples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Mapping, Optional

import numpy as np

Metric = Literal["ppl", "bits_per_byte"]
METRIC_LABEL = {"ppl": "test PPL", "bits_per_byte": "test bits/byte"}

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95


class NotPairedError(ValueError):
    """Two models' per-sentence scores that are not over the same sentences, so they cannot be paired."""


@dataclass(frozen=True)
class SentenceScores:
    """One model's scores of one split, sentence by sentence, in the split's order.

    Attributes:
        nll: [n] float64, each sentence's summed token NLL in nats.
        tokens: [n] int64, each sentence's scored tokens.
        bytes: [n] int64, each sentence's scored UTF-8 bytes; None when not kept.
        fingerprint: the split's fingerprint (:func:`ftflow.perplexity.sentences_fingerprint`), or None.
    """

    nll: np.ndarray
    tokens: np.ndarray
    bytes: Optional[np.ndarray] = None
    fingerprint: Optional[str] = None

    def __post_init__(self) -> None:
        n = len(self.nll)
        if n < 1:
            raise ValueError("per-sentence scores need at least one sentence")
        if len(self.tokens) != n or (self.bytes is not None and len(self.bytes) != n):
            raise ValueError(f"per-sentence arrays differ in length: nll {n}, tokens {len(self.tokens)}, bytes "
                             f"{None if self.bytes is None else len(self.bytes)}")

    @classmethod
    def from_record(cls, record: Mapping) -> "SentenceScores":
        """From what a stage keeps per split (:meth:`ftflow.perplexity.PerplexityResult.per_sentence`)."""
        kept_bytes = record.get("bytes") or None
        return cls(nll=np.asarray(record["nll"], dtype=np.float64), tokens=np.asarray(record["tokens"], dtype=np.int64),
                   bytes=None if kept_bytes is None else np.asarray(kept_bytes, dtype=np.int64),
                   fingerprint=record.get("sentences_sha256"))

    @property
    def n(self) -> int:
        return len(self.nll)

    def value(self, metric: Metric) -> float:
        """The corpus figure over every sentence: PPL ``exp(sum nll / sum tokens)`` or bits per byte."""
        return float(_corpus(np.array([self.nll.sum()]), np.array([self.tokens.sum()]),
                             None if self.bytes is None else np.array([self.bytes.sum()]), metric)[0])


@dataclass(frozen=True)
class Interval:
    """A corpus figure and its bootstrap interval.

    Attributes:
        metric: ``ppl`` or ``bits_per_byte``.
        estimate: the figure over the whole split (not a bootstrap mean).
        low, high: the interval's ends.
        level: its coverage (0.95).
        resamples: bootstrap resamples it came from.
    """

    metric: str
    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES

    def text(self, digits: int = 4) -> str:
        """``4.1234 [4.0912, 4.1570]``."""
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class Comparison:
    """Model ``a`` against model ``b`` on the same sentences: the paired difference ``a - b`` and its interval.

    Attributes:
        metric: what is compared, ``ppl`` or ``bits_per_byte`` (lower is better).
        a, b: the two figures over the whole split.
        difference: ``a - b``.
        low, high: the paired bootstrap interval of ``a - b``.
        percent: ``100 (a - b) / b``.
        percent_low, percent_high: its paired interval.
        level: the intervals' coverage.
        resamples: bootstrap resamples.
    """

    metric: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    percent: float
    percent_low: float
    percent_high: float
    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES

    @property
    def within_noise(self) -> bool:
        """The interval of the difference contains 0: the test set cannot tell the two apart."""
        return self.low <= 0.0 <= self.high

    @property
    def verdict(self) -> str:
        """``lower``, ``higher`` (a against b, beyond noise) or ``within noise``."""
        if self.within_noise:
            return "within noise"
        return "lower" if self.difference < 0 else "higher"

    def percent_text(self) -> str:
        """``-1.20% [-2.10%, -0.31%]``."""
        return f"{self.percent:+.2f}% [{self.percent_low:+.2f}%, {self.percent_high:+.2f}%]"

    def text(self) -> str:
        """The difference in percent with its interval and the verdict: ``-1.20% [-2.10%, -0.31%], separable``."""
        return f"{self.percent_text()}, {'within noise' if self.within_noise else 'separable'}"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "a": self.a, "b": self.b, "difference": self.difference, "low": self.low,
                "high": self.high, "percent": self.percent, "percent_low": self.percent_low,
                "percent_high": self.percent_high, "within_noise": self.within_noise, "level": self.level,
                "resamples": self.resamples}


def _corpus(nll_sums: np.ndarray, token_sums: np.ndarray, byte_sums: Optional[np.ndarray],
            metric: Metric) -> np.ndarray:
    """Corpus figures from sums: [R] PPL ``exp(nll / tokens)`` or bits per byte ``nll / (ln 2 bytes)``."""
    if metric == "ppl":
        return np.exp(nll_sums / token_sums)
    if metric == "bits_per_byte":
        if byte_sums is None:
            raise ValueError("bits per byte needs each sentence's bytes, and these scores do not keep them")
        return nll_sums / (math.log(2) * byte_sums)
    raise ValueError(f"unknown metric {metric!r}; use ppl or bits_per_byte")


@lru_cache(maxsize=4)
def resample_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """The bootstrap's draws: [resamples, n] sentence indices, with replacement, from ``numpy.random.default_rng(seed)``.

    The same ``(n, resamples, seed)`` always gives the same draws (and the same array: read only).
    """
    if n < 1 or resamples < 1:
        raise ValueError(f"need n >= 1 and resamples >= 1, got {n} and {resamples}")
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    indices.setflags(write=False)
    return indices


def _resampled(scores: SentenceScores, indices: np.ndarray, metric: Metric) -> np.ndarray:
    """[R] corpus figures, one per row of ``indices`` ([R, n]), each from its resample's sums."""
    return _corpus(scores.nll[indices].sum(axis=1), scores.tokens[indices].sum(axis=1),
                   None if scores.bytes is None else scores.bytes[indices].sum(axis=1), metric)


def _ends(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def interval(scores: SentenceScores, metric: Metric = "ppl", *, resamples: int = DEFAULT_RESAMPLES,
             seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> Interval:
    """The corpus figure of ``scores`` and its bootstrap interval over sentences.

    Args:
        scores: one model's per-sentence scores of the split.
        metric: ``ppl`` (token-weighted corpus perplexity) or ``bits_per_byte``.
        resamples: bootstrap resamples of the sentences.
        seed: seed of the draws (:func:`resample_indices`).
        level: the interval's coverage.

    Returns:
        The :class:`Interval`: the figure over every sentence, and the ``level`` central share of the resampled ones.
    """
    values = _resampled(scores, resample_indices(scores.n, resamples, seed), metric)
    low, high = _ends(values, level)
    return Interval(metric, scores.value(metric), low, high, level, resamples)


def comparable_metric(a: SentenceScores, b: SentenceScores) -> Metric:
    """``ppl`` when both models scored every sentence in the same tokens (one tokenizer), else ``bits_per_byte``."""
    return "ppl" if np.array_equal(a.tokens, b.tokens) else "bits_per_byte"


def check_paired(a: SentenceScores, b: SentenceScores) -> None:
    """Raise :class:`NotPairedError` unless ``a`` and ``b`` score the same sentences in the same order."""
    if a.n != b.n:
        raise NotPairedError(f"the two models were scored on different sentences ({a.n} vs {b.n}), so they cannot "
                             "be compared sentence by sentence")
    if a.fingerprint is not None and b.fingerprint is not None and a.fingerprint != b.fingerprint:
        raise NotPairedError("the two models were scored on different sentences (the splits' fingerprints "
                             f"{a.fingerprint[:12]} and {b.fingerprint[:12]} differ), so they cannot be compared "
                             "sentence by sentence")


def paired_difference(a: SentenceScores, b: SentenceScores, metric: Optional[Metric] = None, *,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                      level: float = DEFAULT_LEVEL) -> Comparison:
    """Model ``a`` against model ``b``: the difference of their corpus figures and its paired bootstrap interval.

    Each resample draws one set of sentence indices and recomputes both
    models' corpus figures over it; the interval is that of the per-resample
    differences ``a - b`` (and of ``100 (a - b) / b``). A model against itself
    gives exactly 0 and an interval [0, 0].

    Args:
        a, b: the two models' per-sentence scores of one split.
        metric: ``ppl`` or ``bits_per_byte``; None: :func:`comparable_metric`.
        resamples, seed, level: as for :func:`interval`.

    Returns:
        The :class:`Comparison`.

    Raises:
        NotPairedError: the two were not scored on the same sentences.
    """
    check_paired(a, b)
    metric = metric or comparable_metric(a, b)
    indices = resample_indices(a.n, resamples, seed)
    values_a, values_b = _resampled(a, indices, metric), _resampled(b, indices, metric)
    low, high = _ends(values_a - values_b, level)
    percent_low, percent_high = _ends(100.0 * (values_a / values_b - 1.0), level)
    value_a, value_b = a.value(metric), b.value(metric)
    return Comparison(metric, value_a, value_b, value_a - value_b, low, high, 100.0 * (value_a / value_b - 1.0),
                      percent_low, percent_high, level, resamples)
