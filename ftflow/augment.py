"""Training-set augmentation through nlpaug, seeded and with provenance.

Only the training split is ever augmented. Every new sentence records the id
of the sentence it came from and the method that made it; copies identical to
their source, and exact duplicates of sentences already in the set, are
dropped and counted.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

ACTIONS = {"random_swap": "swap", "random_delete": "delete"}


@dataclass(frozen=True)
class Augmented:
    """One augmented sentence and where it came from."""

    text: str
    source_id: int
    method: str


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNGs nlpaug draws from, restoring them afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _augmenter(method: str, word_rate: float):
    import nlpaug.augmenter.word as naw  # heavy: imported where used

    if method not in ACTIONS:
        raise ValueError(f"unknown augmentation method {method!r}; choose from {sorted(ACTIONS)}")
    return naw.RandomWordAug(action=ACTIONS[method], aug_p=word_rate, aug_min=1)


def augment_sentences(
    sentences: Sequence[str],
    *,
    factor: float,
    methods: Sequence[str],
    word_rate: float,
    seed: int,
    max_attempts: int = 5,
) -> tuple[list[Augmented], dict]:
    """Make ``round(len(sentences) * (factor - 1))`` new sentences.

    Sources are drawn by a seeded shuffle (cycling when more new sentences than
    sources are needed); methods are used in turn. A draw that yields the
    source itself or a sentence already present is retried with a new seed up
    to ``max_attempts`` times and then skipped.

    Returns:
        ``(new_sentences, stats)``; stats counts what was made, per method, and
        what was dropped and why.
    """
    wanted = round(len(sentences) * (factor - 1.0))
    augmenters = {method: _augmenter(method, word_rate) for method in methods}
    seen = set(sentences)
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    made: list[Augmented] = []
    stats = {"wanted": wanted, "made": 0, "per_method": {m: 0 for m in methods},
             "dropped_same_as_source": 0, "dropped_duplicate": 0, "gave_up": 0}
    for n in range(wanted):
        source_id = order[n % len(order)]
        source = sentences[source_id]
        method = methods[n % len(methods)]
        for attempt in range(max_attempts):
            with _seeded(seed * 1_000_003 + n * 101 + attempt):
                text = augmenters[method].augment(source)
            text = text[0] if isinstance(text, list) else text
            text = " ".join(str(text).split())
            # nlpaug's swap re-capitalises the first word; keep the source's casing.
            if source == source.lower():
                text = text.lower()
            if not text or text == source:
                stats["dropped_same_as_source"] += 1
                continue
            if text in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(text)
            made.append(Augmented(text=text, source_id=source_id, method=method))
            stats["per_method"][method] += 1
            break
        else:
            stats["gave_up"] += 1
    stats["made"] = len(made)
    return made, stats
