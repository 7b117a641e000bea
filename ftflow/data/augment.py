"""Training-set augmentation as in the study: EDA, back-translation, random masking.

Only the training split is ever augmented. The original sentences are kept as
they are (nothing is lost); ``round(n * (factor - 1))`` new sentences are
planned, each from one source sentence by one method, and each records the id
of its source, the method and its parameters.

Methods (weights in ``AugmentConfig.methods`` set the mix):

* EDA (Wei & Zou, 2019) through nlpaug where it fits: ``synonym`` (nlpaug's
  SynonymAug fed by an offline WordNet, see :mod:`ftflow.data.wordnet`),
  ``random_swap`` and ``random_delete`` (nlpaug's RandomWordAug);
  ``random_insert`` is EDA's "insert a synonym of a random word at a random
  place", which nlpaug has no WordNet version of, so it is written here.
* ``random_mask``: chosen words replaced by a mask token, or dropped.
* ``back_translation``: en -> pivot -> en through :mod:`ftflow.data.translate`,
  passed in as a callable so this module makes no network call itself.

Every method changes ``ceil(rate * words)`` words, at least one (nlpaug's rule).
Copies identical to their source, and exact duplicates of any sentence
already in the set, are dropped and counted; a stochastic method draws again
(up to ``max_attempts``), back-translation, being deterministic, does not.
Sentences that are empty, too long or not English are not used as sources
and are counted by reason; a sentence whose translation fails is counted and
left out, never replaced by another.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np

from ftflow.config import AUGMENT_METHODS, AugmentConfig

if TYPE_CHECKING:  # pragma: no cover
    from ftflow.data.translate import BackTranslator

WORDNET_METHODS = frozenset({"synonym", "random_insert"})


def wordnet_sha256(config: AugmentConfig) -> Optional[str]:
    """The content hash of the WordNet database ``config``'s augmentation reads (None when it reads none).

    Raises:
        ftflow.data.wordnet.WordNetMissing: it reads WordNet and none is installed (the message says how to install it).
    """
    used = {m for m, w in config.methods.items() if w > 0} if config.enabled else set()
    if not used & WORDNET_METHODS:
        return None
    from ftflow.data.wordnet import database_sha256, locate_wordnet

    return database_sha256(locate_wordnet(config.nltk_data_dir))
SKIP_REASONS = ("empty", "too_long", "non_english")
EXAMPLES_KEPT = 10

# EDA's stop-word list (Wei & Zou's reference code): never replaced by synonyms,
# and the function words that mark a sentence as English.
STOPWORDS = frozenset(
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers "
    "herself it its itself they them their theirs themselves what which who whom this that these those am is "
    "are was were be been being have has had having do does did doing a an the and but if or because as until "
    "while of at by for with about against between into through during before after above below to from up "
    "down in out on off over under again further then once here there when where why how all any both each few "
    "more most other some such no nor not only own same so than too very s t can will just don should now".split()
)


@dataclass(frozen=True)
class Augmented:
    """One augmented sentence and where it came from.

    Attributes:
        text: the new sentence.
        source_id: index of its source in the training sentences.
        method: the method that made it (a key of ``AugmentConfig.methods``).
        params: the method's settings, and the seed of the draw for stochastic methods.
    """

    text: str
    source_id: int
    method: str
    params: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Input screening
# ---------------------------------------------------------------------------


def looks_english(text: str, min_words_for_stopword_check: int = 8) -> bool:
    """A cheap heuristic: mostly ASCII letters, and longer sentences contain English function words.

    Sentences of fewer than ``min_words_for_stopword_check`` words are judged
    by their letters only (short English phrases often have no function word).
    """
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    if sum(c.isascii() for c in letters) / len(letters) < 0.9:
        return False
    words = [w.strip(".,;:!?\"'()[]").lower() for w in text.split()]
    words = [w for w in words if w]
    if len(words) < min_words_for_stopword_check:
        return True
    return sum(w in STOPWORDS for w in words) / len(words) >= 0.1


def screen_sentence(text: str, max_chars: int, check_english: bool = True) -> Optional[str]:
    """Why ``text`` cannot be a source (``empty``, ``too_long``, ``non_english``), or None if it can."""
    if not text or not text.strip():
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    if check_english and not looks_english(text):
        return "non_english"
    return None


# ---------------------------------------------------------------------------
# Pure word-level transforms (seeded through ``rng``)
# ---------------------------------------------------------------------------


def words_to_change(n_words: int, rate: float) -> int:
    """``ceil(rate * n_words)``, at least 1 (0 for an empty sentence): nlpaug's count."""
    return 0 if n_words == 0 else max(1, math.ceil(rate * n_words))


def random_mask(words: Sequence[str], rate: float, mode: str, token: str, rng: random.Random) -> list[str]:
    """``words`` with ``words_to_change`` of them replaced by ``token`` (mode token) or removed (mode drop).

    At least one word is always left as it was: a sentence of mask tokens only
    teaches nothing (a one-word sentence comes back unchanged, and is dropped).
    """
    chosen = set(rng.sample(range(len(words)), min(words_to_change(len(words), rate), max(len(words) - 1, 0))))
    if mode == "drop":
        return [w for i, w in enumerate(words) if i not in chosen]
    return [token if i in chosen else w for i, w in enumerate(words)]


def _bare(word: str) -> str:
    return word.strip(".,;:!?\"'()[]{}").lower()


def random_insert(words: Sequence[str], rate: float, synonyms_of: Callable[[str], list[str]],
                  rng: random.Random, tries_per_insert: int = 10) -> list[str]:
    """EDA random insertion: ``words_to_change`` times, a synonym of a random non-stop word at a random place.

    Words without synonyms are passed over (up to ``tries_per_insert`` draws
    per insertion), so fewer insertions than asked for may happen.
    """
    out = list(words)
    for _ in range(words_to_change(len(words), rate)):
        for _ in range(tries_per_insert):
            word = _bare(rng.choice(out))
            candidates = synonyms_of(word) if word and word.isalpha() and word not in STOPWORDS else []
            if candidates:
                out.insert(rng.randint(0, len(out)), rng.choice(candidates))
                break
    return out


# ---------------------------------------------------------------------------
# nlpaug augmenters
# ---------------------------------------------------------------------------


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


def _synonym_augmenter(rate: float, synonyms_of: Callable[[str], list[str]]):
    import nlpaug.augmenter.word as naw  # heavy: imported where used

    class _OfflineWordNet:
        # nlpaug's own WordNet model calls nltk.download when WordNet is missing and
        # tags parts of speech with a tagger that needs another download; EDA uses
        # no POS tags, and an empty tag makes nlpaug look at every sense of a word.
        def predict(self, word, pos=None):
            return synonyms_of(word)

        @staticmethod
        def pos_tag(tokens):
            return [(token, "") for token in tokens]

    class _OfflineSynonymAug(naw.SynonymAug):
        @classmethod
        def get_model(cls, *args, **kwargs):
            return _OfflineWordNet()

    return _OfflineSynonymAug(aug_p=rate, aug_min=1, aug_max=None, stopwords=sorted(STOPWORDS))


def _random_word_augmenter(action: str, rate: float):
    import nlpaug.augmenter.word as naw  # heavy: imported where used

    # aug_max=None: nlpaug caps at 10 words by default, which would break the rate on long sentences.
    return naw.RandomWordAug(action=action, aug_p=rate, aug_min=1, aug_max=None)


def _nlpaug_apply(augmenter, source: str, seed: int) -> str:
    with _seeded(seed):
        text = augmenter.augment(source)
    return text[0] if isinstance(text, list) else str(text)


# ---------------------------------------------------------------------------
# Planning and assembly
# ---------------------------------------------------------------------------


def plan_methods(weights: dict[str, float], wanted: int, seed: int) -> list[str]:
    """Which method makes each of ``wanted`` new sentences: shares by weight, seeded order.

    Counts are ``wanted * weight / total`` rounded by largest remainder (ties
    in :data:`ftflow.config.AUGMENT_METHODS` order), so they sum to ``wanted``.
    """
    active = [m for m in AUGMENT_METHODS if weights.get(m, 0) > 0]
    if wanted <= 0 or not active:
        return []
    total = sum(weights[m] for m in active)
    exact = {m: wanted * weights[m] / total for m in active}
    counts = {m: math.floor(exact[m]) for m in active}
    by_remainder = sorted(active, key=lambda m: (-(exact[m] - counts[m]), active.index(m)))
    for m in by_remainder[: wanted - sum(counts.values())]:
        counts[m] += 1
    schedule = [m for m in active for _ in range(counts[m])]
    random.Random(seed).shuffle(schedule)
    return schedule


def _params(config: AugmentConfig, method: str, back_translator) -> dict:
    if method == "back_translation":
        bt = config.back_translation
        service = getattr(back_translator, "service_id", bt.service)
        return {"service": service, "source_lang": bt.source_lang, "pivot_lang": bt.pivot_lang}
    return getattr(config, method).model_dump()


def _empty_stats(config: AugmentConfig, n_sentences: int, wanted: int) -> dict:
    return {
        "original": n_sentences,
        "wanted": wanted,
        "made": 0,
        "per_method": {},
        "skipped_sources": {reason: 0 for reason in SKIP_REASONS},
        "skipped_examples": {reason: [] for reason in SKIP_REASONS},
        "dropped_same_as_source": 0,
        "dropped_duplicate": 0,
        "gave_up": 0,
        "translation_failed": {"network": 0, "empty": 0, "rejected": 0},
        "translation_failed_examples": [],
    }


def augment_sentences(
    sentences: Sequence[str],
    config: AugmentConfig,
    *,
    wordnet=None,
    back_translator: Optional["BackTranslator"] = None,
) -> tuple[list[Augmented], dict]:
    """Make ``round(len(sentences) * (factor - 1))`` new sentences (fewer when some are dropped).

    Sources are the sentences that pass :func:`screen_sentence`, drawn by a
    seeded shuffle (cycling when more new sentences than sources are needed);
    methods follow :func:`plan_methods`.

    Args:
        sentences: the training split, unchanged by this function.
        config: what to make; ``config.enabled`` is the caller's business.
        wordnet: an nltk WordNet reader; loaded by :func:`ftflow.data.wordnet.load_wordnet`
            when a WordNet method is on and none is given.
        back_translator: a :class:`ftflow.data.translate.BackTranslator` (or any object with
            ``back_translate_many(texts) -> {text: str | TranslationFailed}``); required
            when back-translation has a weight.

    Returns:
        ``(new_sentences, stats)``; stats (JSON-ready) count what was made per
        method, which sources were skipped and why, what was dropped and why,
        and which translations failed and why. ``dropped_*`` count draws;
        ``wanted == made + gave_up + sum(translation_failed.values())``.
    """
    from ftflow.data.translate import TranslationFailed

    wanted = round(len(sentences) * (config.factor - 1.0))
    stats = _empty_stats(config, len(sentences), wanted)
    schedule = plan_methods(config.methods, wanted, config.seed)
    used = set(schedule)
    stats["per_method"] = {m: {"planned": schedule.count(m), "made": 0} for m in AUGMENT_METHODS if m in used}

    eligible = []
    for i, text in enumerate(sentences):
        reason = screen_sentence(text, config.max_source_chars, config.check_english)
        if reason is None:
            eligible.append(i)
        else:
            stats["skipped_sources"][reason] += 1
            if len(stats["skipped_examples"][reason]) < EXAMPLES_KEPT:
                stats["skipped_examples"][reason].append(i)
    if not schedule or not eligible:
        stats["gave_up"] = len(schedule)
        return [], stats

    if "back_translation" in used and back_translator is None:
        raise ValueError("back_translation has a weight in augment.methods but no back_translator was given")
    if used & WORDNET_METHODS and wordnet is None:
        from ftflow.data.wordnet import load_wordnet

        wordnet = load_wordnet(config.nltk_data_dir)

    synonym_cache: dict[str, list[str]] = {}

    def synonyms_of(word: str) -> list[str]:
        if word not in synonym_cache:
            from ftflow.data.wordnet import synonyms

            synonym_cache[word] = synonyms(wordnet, word)
        return synonym_cache[word]

    nlpaug_augmenters = {}
    if "synonym" in used:
        nlpaug_augmenters["synonym"] = _synonym_augmenter(config.synonym.rate, synonyms_of)
    for method, action in (("random_swap", "swap"), ("random_delete", "delete")):
        if method in used:
            nlpaug_augmenters[method] = _random_word_augmenter(action, getattr(config, method).rate)

    order = list(eligible)
    random.Random(config.seed).shuffle(order)
    jobs = [(order[n % len(order)], method) for n, method in enumerate(schedule)]

    translated = {}
    if "back_translation" in used:
        texts = [sentences[i] for i, method in jobs if method == "back_translation"]
        translated = back_translator.back_translate_many(texts)

    seen = set(sentences)
    made: list[Augmented] = []
    params = {m: _params(config, m, back_translator) for m in used}
    for n, (source_id, method) in enumerate(jobs):
        source = sentences[source_id]
        if method == "back_translation":
            outcome = translated[source]
            if isinstance(outcome, TranslationFailed):
                stats["translation_failed"][outcome.reason] += 1
                if len(stats["translation_failed_examples"]) < EXAMPLES_KEPT:
                    stats["translation_failed_examples"].append({"source_id": source_id, "reason": outcome.reason,
                                                                 "detail": outcome.detail[:200]})
                continue
            draws = [(None, outcome)]
        else:
            draws = ((attempt, None) for attempt in range(config.max_attempts))
        for attempt, text in draws:
            draw_seed = None
            if text is None:
                draw_seed = config.seed * 1_000_003 + n * 101 + attempt
                text = _transform(method, source, config, draw_seed, nlpaug_augmenters, synonyms_of)
            text = " ".join(text.split())
            if not text or text == source:
                stats["dropped_same_as_source"] += 1
                continue
            if text in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(text)
            item_params = dict(params[method]) if draw_seed is None else {**params[method], "seed": draw_seed}
            made.append(Augmented(text=text, source_id=source_id, method=method, params=item_params))
            stats["per_method"][method]["made"] += 1
            break
        else:
            stats["gave_up"] += 1
    stats["made"] = len(made)
    if back_translator is not None and hasattr(back_translator, "stats"):
        stats["translation"] = back_translator.stats()
    return made, stats


def _transform(method: str, source: str, config: AugmentConfig, draw_seed: int, nlpaug_augmenters: dict,
               synonyms_of: Callable[[str], list[str]]) -> str:
    """One draw of a stochastic method on ``source``."""
    if method in nlpaug_augmenters:
        text = _nlpaug_apply(nlpaug_augmenters[method], source, draw_seed)
        # nlpaug's swap re-capitalises the new first word; keep an all-lowercase source lowercase.
        return text.lower() if source == source.lower() else text
    rng = random.Random(draw_seed)
    words = source.split()
    if method == "random_insert":
        return " ".join(random_insert(words, config.random_insert.rate, synonyms_of, rng))
    if method == "random_mask":
        mask = config.random_mask
        return " ".join(random_mask(words, mask.rate, mask.mode, mask.token, rng))
    raise ValueError(f"unknown augmentation method {method!r}; choose from {AUGMENT_METHODS}")
