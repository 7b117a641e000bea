"""Tests of ftflow.data.synthetic: the seeded sentence grammar of the offline demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftflow.data import synthetic

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_same_arguments_give_identical_sentences():
    assert synthetic.generate_sentences(300, 5, "reviews") == synthetic.generate_sentences(300, 5, "reviews")


def test_first_sentences_are_pinned():
    # Exact values: a change here changes every zoo and every demo number, so it must be deliberate.
    assert synthetic.generate_sentences(2, 0, "general") == [
        "an empty crow smiled at the office",
        "this summer the city council said that the house will be delayed soon",
    ]
    assert synthetic.generate_sentences(2, 0, "reviews") == [
        "a wonderful love story with warm jokes and a touching ending and my aunt loved it too",
        "the twist is flat but the lead actor is rather gripping",
    ]


def test_a_prefix_does_not_depend_on_n():
    assert synthetic.generate_sentences(50, 3, "general")[:20] == synthetic.generate_sentences(20, 3, "general")


def test_different_seeds_and_domains_differ():
    base = synthetic.generate_sentences(50, 0, "general")
    assert synthetic.generate_sentences(50, 1, "general") != base
    assert synthetic.generate_sentences(50, 0, "reviews") != base
    # Not merely reordered: different seeds give mostly different sentences.
    assert len(set(base) & set(synthetic.generate_sentences(50, 1, "general"))) < 5


def test_identical_in_a_fresh_process_with_another_hash_seed():
    code = "import json; from ftflow.data import synthetic; print(json.dumps(synthetic.generate_sentences(30, 7, 'reviews')))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(result.stdout) == synthetic.generate_sentences(30, 7, "reviews")


@pytest.mark.parametrize("domain", ["general", "reviews"])
def test_sentences_are_lower_case_words_of_allowed_length(domain):
    sentences = synthetic.generate_sentences(2000, 0, domain)
    assert len(sentences) == 2000
    for sentence in sentences:
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", sentence), sentence
        assert synthetic.MIN_WORDS <= len(sentence.split()) <= synthetic.MAX_WORDS, sentence
        assert not re.search(r"\ba [aeio]", sentence), sentence  # "a empty" became "an empty"
    # Varied: few exact repeats even in a large sample.
    assert len(set(sentences)) > 0.85 * len(sentences)


def test_vocabulary_is_a_few_hundred_words_and_reviews_use_general_words():
    general = synthetic.vocabulary("general")
    reviews = synthetic.vocabulary("reviews")
    assert 300 <= len(general | reviews) <= 1000
    assert len(reviews) >= 250
    # Pretraining on general text sees every word of the task.
    assert reviews <= general
    used = {word for s in synthetic.generate_sentences(3000, 0, "reviews") for word in s.split()}
    assert used <= reviews


def test_domains_differ_in_distribution():
    def film_share(domain: str) -> float:
        sentences = synthetic.generate_sentences(1000, 0, domain)
        return sum(bool(re.search(r"\b(film|movie)\b", s)) for s in sentences) / len(sentences)

    assert film_share("reviews") > 0.25
    assert film_share("general") < 0.1


def test_bad_arguments_are_refused():
    assert synthetic.generate_sentences(0, 0, "general") == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        synthetic.generate_sentences(-1, 0, "general")
    with pytest.raises(ValueError, match="domain must be one of"):
        synthetic.generate_sentences(3, 0, "news")  # type: ignore[arg-type]
