"""Successive halving's decisions: who goes on, what a grid costs, and the report's summary of a search."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from ftflow.study.halving import (grid_summary, halving_markdown, halving_work, keep_count, out_of_the_running,
                                  reaching, rung_fractions, rung_score, rung_survivors, stratum, stratum_sizes,
                                  survivors)


def test_keep_count_is_ceil_n_over_eta_and_at_least_one():
    assert [keep_count(n, 3) for n in (1, 2, 3, 4, 8, 24)] == [1, 1, 1, 2, 3, 8]
    assert [keep_count(n, 2) for n in (1, 2, 3, 5)] == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="eta >= 2"):
        keep_count(3, 1)


def test_survivors_are_the_best_by_selection_ppl_then_by_name_whatever_the_order():
    scores = {"c": 2.0, "a": 3.0, "b": 2.0, "d": None, "e": math.nan, "f": 1.5, "g": 9.0}
    expected = ["f", "b", "c"]  # ceil(7 / 3) = 3; b and c tie at 2.0: by name
    for order in itertools.islice(itertools.permutations(scores), 0, 5040, 97):  # finishing orders
        assert survivors({k: scores[k] for k in order}, 3) == expected
    assert survivors({"x": None, "y": None}, 3) == ["x"]  # nothing trained: still one, by name
    assert survivors({"only": 4.0}, 3) == ["only"]


def test_adding_a_combination_displaces_at_most_what_it_beats():
    rng = random.Random(0)
    scores = {f"c{i:02d}": rng.uniform(1, 2) for i in range(9)}
    before = survivors(scores, 3)
    better = survivors({**scores, "new": 0.5}, 3)  # 10 -> ceil(10/3) = 4 go on: the new one and the same 3
    assert better == ["new", *before]
    worse = survivors({**scores, "new": 9.0}, 3)
    assert worse[:3] == before and worse[3] not in ("new", *before)  # one more goes on, the next best


def test_halving_work_counts_whole_runs():
    assert rung_fractions((0.25, 0.5)) == (0.25, 0.5, 1.0)
    assert halving_work(24, 3, (0.25, 0.5)) == pytest.approx(24 / 4 + 8 / 4 + 3 / 2)  # 9.5 of 24 runs
    assert halving_work(3, 3, (0.25, 0.5)) == pytest.approx(0.75 + 0.25 + 0.5)
    assert halving_work(1, 3, (0.25, 0.5)) == pytest.approx(1.0)  # a grid of one: the run, once


def test_strata_keep_their_own_best_whatever_the_order():
    """demo-full's distillation variants at rung 1/4 (bench/README.md): the temperature-2, alpha-0.75 variants
    ranked 25th of 36 yet won at the end. Within strata each (temperature, alpha) keeps its own best."""
    scores = {"top20,T2,a0.75": 4.48, "top10,T2,a0.75": 4.50, "sample20,T2,a0.75": 5.02,
              "top20,T1,a0.75": 4.31, "top100,T1,a0.75": 4.31, "top10,T1,a0.75": 4.34,
              "top20,T1,a0.5": 4.37, "top10,T1,a0.5": 4.39, "sample20,T1,a0.5": 4.39}
    strata = {name: tuple(name.split(",")[1:]) for name in scores}
    assert survivors(scores, 3) == ["top100,T1,a0.75", "top20,T1,a0.75", "top10,T1,a0.75"]  # one stratum
    expected = ["top100,T1,a0.75", "top20,T1,a0.5", "top20,T2,a0.75"]  # each stratum's best, best first
    for order in itertools.islice(itertools.permutations(scores), 0, 362880, 4001):
        assert survivors({k: scores[k] for k in order}, 3, {k: strata[k] for k in order}) == expected
    # eta 3 in a stratum of 3 keeps 1, in a stratum of 4 keeps 2; strata of one always go on.
    four = {**scores, "sample10,T2,a0.75": 5.1}
    assert survivors(four, 3, {k: tuple(k.split(",")[1:]) for k in four})[:4] == [
        "top100,T1,a0.75", "top20,T1,a0.5", "top20,T2,a0.75", "top10,T2,a0.75"]
    assert survivors({"a": 9.0, "b": 1.0}, 3, {"a": 1, "b": 2}) == ["b", "a"]


@pytest.mark.parametrize("stratified", [False, True])
def test_a_run_out_of_the_running_never_survives_and_the_rest_never_exceed_the_survivors(stratified):
    """Whatever order a rung's runs finish in, a run declared out of the running (its state freed at once) is
    not a survivor at the end, and the finished runs still in the running are never more than go on."""
    rng = random.Random(1)
    for trial in range(200):
        n, eta = rng.randint(1, 12), rng.choice((2, 3, 4))
        scores = {f"c{i:02d}": rng.choice((rng.uniform(1, 2), rng.choice((1.5, None)))) for i in range(n)}
        strata = {name: rng.randint(0, 2) for name in scores} if stratified else None
        sizes = Counter(strata.values()) if stratified else {(): n}
        final = set(survivors(scores, eta, strata))
        order, finished, out = list(scores), {}, set()
        rng.shuffle(order)
        for name in order:
            finished[name] = scores[name]
            now = set(out_of_the_running(finished, eta, sizes, strata))
            assert out <= now and not now & final, (trial, name)  # once out, out for good; never a survivor
            out = now
            assert len(set(finished) - out) <= len(final)
        assert set(finished) - out == final


def test_rung_survivors_read_the_strata_from_the_manifests_jobs():
    runs = [{"name": n, "job": {"temperature": t, "alpha": 0.5}, "rung": {"fraction": 0.25, "selection":
            {"corpus_ppl": ppl}}} for n, t, ppl in (("a", 1.0, 3.0), ("b", 1.0, 2.0), ("c", 2.0, 4.0), ("d", 2.0, 5.0))]
    assert rung_survivors(runs, 3) == ["b", "a"]
    assert rung_survivors(runs, 3, ("temperature", "alpha")) == ["b", "c"]
    assert stratum(runs[2]["job"], ("temperature", "alpha")) == (2.0, 0.5) and stratum(runs[2]["job"], ()) == ()


def test_a_stratified_grid_costs_the_sum_of_its_strata():
    # demo-full's 36 distillation variants, 6 (temperature, alpha) strata of 6: 6 x (6/4 + 2/4 + 1/2) = 15 runs.
    assert halving_work([6] * 6, 3, (0.25, 0.5)) == pytest.approx(15.0)
    assert reaching([6] * 6, 3, (0.25, 0.5)) == [36, 12, 6]
    assert reaching(36, 3, (0.25, 0.5)) == [36, 12, 4] and halving_work([36], 3, (0.25, 0.5)) == halving_work(
        36, 3, (0.25, 0.5))
    jobs = [{"temperature": t, "alpha": a, "top_k": k} for k in (10, 20) for t in (1.0, 2.0) for a in (0.5, 0.75)]
    assert stratum_sizes(jobs, ("temperature", "alpha")) == [2, 2, 2, 2] and stratum_sizes(jobs, ()) == [8]


def _manifest(name: str, fraction: float, step: int, ppl, from_step: int, seconds: float = 1.0,
              max_steps: int = 8) -> dict:
    rung = {"fraction": fraction, "step": step, "max_steps": max_steps, "from_step": from_step}
    manifest = {"name": name, "job": {"epochs": 2}, "rung": rung, "train_seconds": seconds,
                "compute": {"epoch_tokens": 400, "flops_per_token": 10}}
    if ppl is None:
        return {**manifest, "skipped": f"{name}: does not fit", "train_seconds": None}
    if fraction < 1:
        rung["selection"] = {"corpus_ppl": ppl}
    else:
        manifest["best_validation_ppl"] = ppl
    return manifest


def test_grid_summary_reports_each_combinations_last_rung_the_survivors_the_winner_and_the_compute():
    first = [_manifest("a", 0.25, 2, 3.0, 0), _manifest("b", 0.25, 2, 2.0, 0), _manifest("c", 0.25, 2, 2.5, 0),
             _manifest("d", 0.25, 2, None, 0)]
    kept = survivors({m["name"]: rung_score(m) for m in first}, 3)
    assert kept == ["b", "c"]
    second = [_manifest("b", 0.5, 4, 1.9, 2), _manifest("c", 0.5, 4, 2.4, 2)]
    final = [_manifest("b", 1.0, 8, 1.7, 4, seconds=2.0)]
    summary = grid_summary("LoRA grid", [first, second, final], eta=3)
    assert summary["winner"] == "b" and summary["fractions"] == [0.25, 0.5, 1.0]
    assert summary["survivors"] == [["b", "c"], ["b"], ["b"]]
    assert [(r["name"], r["last_rung"], r["selection_ppl"], r["survived"]) for r in summary["rows"]] == [
        ("b", 1.0, 1.7, True), ("c", 0.5, 2.4, False), ("a", 0.25, 3.0, False), ("d", 0.25, None, False)]
    # 100 tokens a step (400 tokens x 2 epochs / 8 steps): 3 x 2 steps, 2 x 2, 1 x 4 = 14 steps of 3 x 8 = 24.
    assert summary["spent"]["tokens"] == 1400 and summary["full"]["tokens"] == 2400
    assert summary["spent"]["flops"] == 14000 and summary["ratio"]["tokens"] == pytest.approx(14 / 24)
    # 7 s over 14 timed steps: 0.5 s a step; the full grid's 24 steps extrapolated at that rate.
    assert summary["spent"]["seconds"] == 7.0 and summary["full"]["seconds"] == pytest.approx(12.0)
    text = halving_markdown(summary)
    assert "| c | 0.5 | 2.4000 | no |" in text and "| d | 0.25 | not trained | no |" in text
    assert "winner: b" in text and "Survivors by rung: 0.25: b, c; 0.5: b" in text
    assert "training tokens 1,400 of 2,400 (0.58)" in text
