import pytest

from ftflow.study.selection import SelectionError, select_family


def result(name, family, params, bpb, ppl=None):
    scores = {"bits_per_byte": bpb, "corpus_ppl": ppl if ppl is not None else 2 ** (bpb * 4)}
    return {"name": name, "family": family, "parameters": params, "validation": scores,
            "test": {"bits_per_byte": 0.1, "corpus_ppl": 1.1}}


RESULTS = [
    result("granite-2b", "granite", 2_500_000_000, 0.90),
    result("granite-8b", "granite", 8_000_000_000, 0.80),
    result("granite-8b-instruct", "granite", 8_000_000_000, 0.85),
    result("qwen-0.5b", "qwen", 500_000_000, 0.95),
    result("qwen-7b", "qwen", 7_000_000_000, 0.82),
    result("solo", "solo", 1_000_000, 0.10),
]


def test_best_family_then_largest_teacher_and_two_billion_student():
    choice = select_family(RESULTS)
    assert (choice["family"], choice["teacher"], choice["student"]) == ("granite", "granite-8b", "granite-2b")
    assert choice["family_scores"] == {"granite": 0.80, "qwen": 0.82, "solo": 0.10}


def test_selection_looks_only_at_the_requested_split():
    test_first = [dict(r, test={"bits_per_byte": 1 - r["validation"]["bits_per_byte"], "corpus_ppl": 1})
                  for r in RESULTS]
    assert select_family(test_first, split="test")["family"] == "qwen"


def test_student_limit_and_single_model_families():
    with pytest.raises(SelectionError, match="no student"):
        select_family(RESULTS[:3], student_max_params=1_000_000_000)
    with pytest.raises(SelectionError, match="single working model"):
        select_family([RESULTS[-1]])
    with pytest.raises(SelectionError, match="no model was benchmarked"):
        select_family([])
