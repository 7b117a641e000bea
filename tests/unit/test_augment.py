import random

from ftflow.augment import augment_sentences

SENTENCES = [f"the film number {i} was good and the plot was fun" for i in range(20)] + ["short"]


def run(**overrides):
    kwargs = dict(factor=1.5, methods=("random_swap", "random_delete"), word_rate=0.2, seed=7)
    kwargs.update(overrides)
    return augment_sentences(SENTENCES, **kwargs)


def test_expansion_factor_provenance_and_no_copies():
    made, stats = run()
    assert stats["wanted"] == round(len(SENTENCES) * 0.5) == 10
    assert len(made) + stats["gave_up"] == 10
    assert len({a.text for a in made}) == len(made)
    for item in made:
        source = SENTENCES[item.source_id]
        assert item.text != source and item.text not in SENTENCES
        assert item.method in ("random_swap", "random_delete")
        if item.method == "random_swap":
            assert sorted(item.text.split()) == sorted(source.split())
        else:
            assert len(item.text.split()) < len(source.split())
        assert item.text == item.text.lower()  # nlpaug's re-capitalisation undone


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
    assert made == [] and stats["made"] == 0
