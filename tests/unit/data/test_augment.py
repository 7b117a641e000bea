import json
import random

import nltk
import pytest
import yaml
from pydantic import ValidationError

from ftflow.data.augment import (STOPWORDS, augment_sentences, looks_english, plan_methods, random_insert, random_mask,
                                 screen_sentence, words_to_change)
from ftflow.config import AugmentConfig
from ftflow.data.translate import TranslationFailed, build_back_translator
from ftflow.data.wordnet import DEBIAN_WORDNET_DIR, INSTALL_COMMAND, load_wordnet
from tests.fake_libretranslate import FakeLibreTranslate
from tests.needs import needs

SENTENCES = [f"the film number {i} was good and the plot was fun" for i in range(20)] + ["short"]
OFFLINE = {"random_swap": 1, "random_delete": 1, "random_mask": 1}  # no WordNet, no network

requires_wordnet = needs((DEBIAN_WORDNET_DIR / "index.noun").is_file(), f"WordNet under {DEBIAN_WORDNET_DIR}",
                         INSTALL_COMMAND)


@pytest.fixture(scope="module")
def wordnet(tmp_path_factory):
    # Same folder as tests/unit/data/test_wordnet.py: the reader is opened once per session.
    return load_wordnet(search_nltk_path=False)


def config(**overrides) -> AugmentConfig:
    settings = dict(factor=1.5, methods=OFFLINE, seed=7, random_swap={"rate": 0.2}, random_delete={"rate": 0.2})
    settings.update(overrides)
    return AugmentConfig(**settings)


def run(sentences=SENTENCES, **overrides):
    return augment_sentences(sentences, config(**overrides))


class StubBackTranslator:
    """Round trips from a table; anything else fails as the service would."""

    service_id = "stub"

    def __init__(self, table):
        self.table, self.asked = table, []

    def back_translate_many(self, texts):
        self.asked.append(list(texts))
        return {t: self.table.get(t, TranslationFailed("network", "503")) for t in texts}


# -- pure helpers ---------------------------------------------------------------


def test_words_to_change_is_nlpaugs_count():
    assert [words_to_change(n, 0.1) for n in (0, 1, 10, 11, 25)] == [0, 1, 1, 2, 3]
    assert words_to_change(10, 0.15) == 2


def test_plan_splits_by_weight_in_a_seeded_order():
    plan = plan_methods({"random_swap": 1, "random_delete": 1}, 10, seed=0)
    assert sorted(plan) == ["random_delete"] * 5 + ["random_swap"] * 5
    assert plan == plan_methods({"random_delete": 1, "random_swap": 1}, 10, seed=0)  # key order is irrelevant
    assert plan != plan_methods({"random_swap": 1, "random_delete": 1}, 10, seed=1)
    uneven = plan_methods({"synonym": 2, "random_mask": 1, "back_translation": 0}, 10, seed=0)
    assert (uneven.count("synonym"), uneven.count("random_mask"), len(uneven)) == (7, 3, 10)
    three = plan_methods({"random_swap": 1, "random_delete": 1, "random_mask": 1}, 10, seed=0)
    assert [three.count(m) for m in ("random_swap", "random_delete", "random_mask")] == [4, 3, 3]
    assert plan_methods({"random_swap": 1}, 0, seed=0) == []


def test_masking_replaces_or_drops_the_chosen_words():
    words = "one two three four five six seven eight nine ten".split()
    masked = random_mask(words, 0.2, "token", "[MASK]", random.Random(0))
    assert len(masked) == 10 and masked.count("[MASK]") == 2
    assert [w for w in masked if w != "[MASK]"] == [w for w in words if w in masked]
    dropped = random_mask(words, 0.3, "drop", "[MASK]", random.Random(0))
    assert len(dropped) == 7 and all(w in words for w in dropped)
    assert random_mask(["alone"], 0.5, "token", "[MASK]", random.Random(0)) == ["alone"]  # one word always stays
    assert random_mask(["a", "b"], 0.5, "drop", "[MASK]", random.Random(0)) in (["a"], ["b"])
    assert random_mask(words, 0.2, "token", "<m>", random.Random(5)) == random_mask(words, 0.2, "token", "<m>",
                                                                                    random.Random(5))


def test_insertion_adds_synonyms_of_content_words_only():
    lexicon = {"film": ["movie"], "fun": ["merriment"]}
    asked = []

    def synonyms_of(word):
        asked.append(word)
        return lexicon.get(word, [])

    words = "the film was fun".split()
    out = random_insert(words, 0.5, synonyms_of, random.Random(0))
    assert len(out) == 6
    added = list(out)
    for w in words:
        added.remove(w)
    assert all(w in ("movie", "merriment") for w in added)
    assert not set(asked) & STOPWORDS
    assert random_insert("the was".split(), 0.5, synonyms_of, random.Random(0)) == ["the", "was"]  # nothing to insert


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("word " * 300, "too_long"),
    ("这部电影很好看，情节也很有趣", "non_english"),
    ("Этот фильм был очень хорошим", "non_english"),
    ("Der Film war sehr gut und die Handlung hat wirklich Spaß gemacht", "non_english"),
    ("12345 !!!", "non_english"),
    ("Great movie, loved it!", None),
    ("The film was good and the plot was fun, though the ending dragged a little.", None),
])
def test_screening_reasons(text, reason):
    assert screen_sentence(text, max_chars=1000) == reason


def test_english_check_can_be_switched_off():
    assert screen_sentence("这部电影很好看", max_chars=1000, check_english=False) is None
    assert looks_english("a reasonably ordinary English sentence about a film")


# -- augment_sentences: offline EDA + masking ---------------------------------------------


def test_expansion_factor_provenance_and_no_copies():
    made, stats = run()
    assert stats["wanted"] == round(len(SENTENCES) * 0.5) == 10
    assert len(made) + stats["gave_up"] == 10
    assert stats["made"] == len(made) == sum(m["made"] for m in stats["per_method"].values())
    assert {m: v["planned"] for m, v in stats["per_method"].items()} == {
        "random_swap": 4, "random_delete": 3, "random_mask": 3}
    assert len({a.text for a in made}) == len(made)
    for item in made:
        source = SENTENCES[item.source_id]
        assert item.text != source and item.text not in SENTENCES
        assert isinstance(item.params["seed"], int)
        if item.method == "random_swap":
            assert sorted(item.text.split()) == sorted(source.split())
            assert item.params["rate"] == 0.2
        elif item.method == "random_delete":
            assert len(item.text.split()) == len(source.split()) - 3  # ceil(0.2 * 11)
        else:
            assert item.method == "random_mask"
            assert item.text.split().count("[MASK]") == 2  # ceil(0.15 * 11)
            assert item.params == {"rate": 0.15, "mode": "token", "token": "[MASK]", "seed": item.params["seed"]}
        assert item.text == item.text.lower() or "[MASK]" in item.text  # nlpaug's re-capitalisation undone
    json.dumps(stats)  # goes into the stage manifest


def test_seeded_and_leaves_global_random_state_alone():
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    first, _ = run()
    assert random.random() == expected_next
    second, _ = run()
    assert first == second
    other, _ = run(seed=8)
    assert other != first


def test_factor_one_makes_nothing():
    made, stats = run(factor=1.0)
    assert made == [] and stats["made"] == 0 and stats["wanted"] == 0


def test_larger_factor_cycles_sources_without_duplicates():
    made, stats = run(factor=3.0)
    assert stats["wanted"] == 42
    assert len({a.text for a in made}) == len(made) >= 35
    assert not {a.text for a in made} & set(SENTENCES)


def test_mask_drop_mode_and_own_token():
    made, _ = run(methods={"random_mask": 1}, random_mask={"rate": 0.2, "mode": "drop"})
    assert all(len(a.text.split()) == len(SENTENCES[a.source_id].split()) - 3 for a in made)
    made, _ = run(methods=["random_mask"], random_mask={"rate": 0.1, "token": "<mask>"})
    assert all(a.text.split().count("<mask>") == 2 for a in made)


def test_bad_input_is_counted_and_kept():
    bad = ["", "Der Film war sehr gut und die Handlung hat wirklich Spaß gemacht", "x" * 2000, "这部电影很好看"]
    sentences = SENTENCES[:10] + bad
    before = list(sentences)
    made, stats = run(sentences=sentences, factor=2.0)
    assert sentences == before  # the function never edits its input; the task writes every original
    assert stats["skipped_sources"] == {"empty": 1, "too_long": 1, "non_english": 2}
    assert stats["skipped_examples"] == {"empty": [10], "too_long": [12], "non_english": [11, 13]}
    assert {a.source_id for a in made} <= set(range(10))


def test_only_bad_input_makes_nothing_and_says_why():
    made, stats = run(sentences=["", "   "], factor=2.0)
    assert made == [] and stats["gave_up"] == 2 and stats["skipped_sources"]["empty"] == 2


# -- back-translation inside augmentation ---------------------------------------------------


def test_failed_translations_are_counted_and_left_out_not_replaced():
    sentences = ["the film was good", "the plot was fun", "great acting", "bad movie"]
    table = {"the film was good": "the film was fine", "great acting": "great acting",  # identical: dropped
             "bad movie": "the film was good"}  # duplicate of a sentence in the set: dropped
    stub = StubBackTranslator(table)
    made, stats = augment_sentences(sentences, config(factor=2.0, methods={"back_translation": 1}),
                                    back_translator=stub)
    assert len(stub.asked) == 1 and sorted(stub.asked[0]) == sorted(sentences)  # one batch, no second chances
    assert [(a.text, sentences[a.source_id]) for a in made] == [("the film was fine", "the film was good")]
    assert made[0].params == {"service": "stub", "source_lang": "en", "pivot_lang": "de"}
    assert stats["translation_failed"] == {"network": 1, "empty": 0, "rejected": 0}
    assert stats["translation_failed_examples"] == [{"source_id": 1, "reason": "network", "detail": "503"}]
    assert stats["dropped_same_as_source"] == 1 and stats["dropped_duplicate"] == 1
    assert stats["wanted"] == stats["made"] + stats["gave_up"] + sum(stats["translation_failed"].values())


def test_back_translation_needs_a_translator():
    with pytest.raises(ValueError, match="no back_translator"):
        augment_sentences(SENTENCES, config(methods={"back_translation": 1}))


def test_back_translation_end_to_end_over_http_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    round_trips = {"the film was good": "the film was fine", "the plot was fun": "the plot was funny",
                   "great acting": "excellent acting", "the movie was bad": "the film was poor"}
    sentences = list(round_trips)
    with FakeLibreTranslate() as server:
        cfg = config(factor=2.0, methods={"back_translation": 1},
                     back_translation={"service": "libre", "url": server.url, "requests_per_second": 1000})

        def run_stage():
            bt, cache = build_back_translator(cfg.back_translation, tmp_path / "translation-cache")
            with cache:
                return augment_sentences(sentences, cfg, back_translator=bt)

        server.empty_next(1)  # a translator that returns nothing, once
        made, stats = run_stage()
        first_calls = len(server.translate_calls)
        again, again_stats = run_stage()
        rerun_calls = len(server.translate_calls) - first_calls

    assert stats["translation_failed"] == {"network": 0, "empty": 1, "rejected": 0}
    failed_source = sentences[stats["translation_failed_examples"][0]["source_id"]]
    assert {a.text for a in made} == set(round_trips.values()) - {round_trips[failed_source]}
    assert all(round_trips[sentences[a.source_id]] == a.text for a in made)
    assert all(a.params["service"] == f"libre@{server.url}" for a in made)
    assert first_calls == 1 + 2 * 3  # the empty answer, then two legs for each of the three others
    assert rerun_calls == 2  # the rerun asks only for the sentence that had failed
    assert {a.text for a in again} == set(round_trips.values()) and again_stats["made"] == 4
    assert again_stats["translation"]["forward"]["cache_hits"] == 3


# -- WordNet methods --------------------------------------------------------------------------


@requires_wordnet
def test_synonym_and_insertion_use_offline_wordnet(wordnet, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download called: WordNet must be read offline")

    monkeypatch.setattr(nltk, "download", no_download)
    cfg = config(methods={"synonym": 1, "random_insert": 1}, synonym={"rate": 0.1}, random_insert={"rate": 0.1})
    made, stats = augment_sentences(SENTENCES, cfg, wordnet=wordnet)
    assert stats["made"] >= 8 and {a.method for a in made} == {"synonym", "random_insert"}
    for item in made:
        source = SENTENCES[item.source_id].split()
        words = item.text.split()
        if item.method == "random_insert":
            assert len(words) > len(source)
            remaining = list(words)
            for w in source:
                remaining.remove(w)  # the source's words are all still there, in addition to synonyms
        else:
            changed = [w for w in source if w not in words]
            assert changed and not set(changed) & STOPWORDS  # stop words are never replaced
    again, _ = augment_sentences(SENTENCES, cfg, wordnet=wordnet)
    assert again == made


@requires_wordnet
def test_default_mix_is_eda_and_masking(wordnet):
    cfg = AugmentConfig(seed=1)
    assert set(cfg.methods) == {"synonym", "random_insert", "random_swap", "random_delete", "random_mask"}
    made, stats = augment_sentences(SENTENCES, cfg, wordnet=wordnet)
    assert stats["wanted"] == 10 and {m: v["planned"] for m, v in stats["per_method"].items()} == {
        "synonym": 2, "random_insert": 2, "random_swap": 2, "random_delete": 2, "random_mask": 2}


# -- config -------------------------------------------------------------------------------------


DEMO_AUGMENT = """
enabled: true
factor: 1.5
seed: 0
methods: {synonym: 1, random_insert: 1, random_swap: 1, random_delete: 1, random_mask: 1, back_translation: 0}
synonym: {rate: 0.1}
random_insert: {rate: 0.1}
random_swap: {rate: 0.1}
random_delete: {rate: 0.1}
random_mask: {rate: 0.15, mode: token, token: "[MASK]"}
"""


def test_demo_shape_validates_and_old_list_form_still_works():
    cfg = AugmentConfig.model_validate(yaml.safe_load(DEMO_AUGMENT))
    assert cfg.methods["back_translation"] == 0 and cfg.random_mask.token == "[MASK]"
    assert AugmentConfig(methods=["random_swap", "random_delete"]).methods == {"random_swap": 1.0,
                                                                              "random_delete": 1.0}


@pytest.mark.parametrize("settings, message", [
    ({"methods": {"random_swap": -1}}, "negative"),
    ({"methods": {"random_swap": 0}}, "at least one method"),
    ({"methods": ["eda"]}, "synonym"),
    ({"word_rate": 0.1}, "Extra inputs"),
    ({"random_swap": {"rate": 0.9}}, "less than or equal"),
    ({"random_mask": {"mode": "blank"}}, "token"),
])
def test_bad_augment_settings_are_rejected(settings, message):
    with pytest.raises(ValidationError, match=message):
        AugmentConfig(**settings)
    AugmentConfig(enabled=False, methods={"random_swap": 0})  # nothing to mix when switched off
