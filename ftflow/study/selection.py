"""Choosing the family to adapt, its teacher and its student, from benchmark results."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence


class SelectionError(ValueError):
    """No usable choice could be made; the message says what is missing."""


def metric_value(result: dict, split: str, metric: str) -> float:
    """``bits_per_byte`` or ``perplexity`` (corpus) of a benchmark result on a split."""
    scores = result[split]
    return scores["bits_per_byte"] if metric == "bits_per_byte" else scores["corpus_ppl"]


def select_family(
    results: Sequence[dict],
    *,
    split: str = "validation",
    metric: str = "bits_per_byte",
    student_max_params: int = 2_500_000_000,
) -> dict:
    """Pick the best family, then its teacher and its student.

    Args:
        results: benchmark results, each with ``name``, ``family``, ``parameters``
            and per-split scores (``validation``/``test`` dicts); failed models
            must already be left out.
        split: the split selection looks at (``validation`` unless reproducing
            the study's protocol).
        metric: ``bits_per_byte`` (fair across tokenizers) or ``perplexity``.
        student_max_params: the largest parameter count a student may have.

    Returns:
        ``{"family", "teacher", "student", "family_scores"}``: the teacher is the
        family's largest model (best score among equals), the student its largest
        other model within ``student_max_params`` (best score among equals).
    """
    if not results:
        raise SelectionError("no model was benchmarked successfully, so no family can be chosen")
    by_family: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        by_family[result["family"]].append(result)
    family_scores = {
        family: min(metric_value(r, split, metric) for r in members) for family, members in by_family.items()
    }
    eligible = {f: s for f, s in family_scores.items() if len(by_family[f]) >= 2}
    if not eligible:
        raise SelectionError(
            "every family has a single working model, but a family needs a teacher and a smaller student; "
            f"families seen: {sorted(by_family)}. Add a second size to one family."
        )
    family = min(eligible, key=lambda f: (eligible[f], f))
    members = by_family[family]

    def rank(r: dict) -> tuple:
        return (-r["parameters"], metric_value(r, split, metric), r["name"])

    teacher = min(members, key=rank)
    students = [r for r in members if r is not teacher and r["parameters"] <= student_max_params]
    students = [r for r in students if r["parameters"] < teacher["parameters"]] or students
    if not students:
        raise SelectionError(
            f"family {family!r} has no student: no model other than the teacher {teacher['name']!r} has at most "
            f"{student_max_params:,} parameters; raise select.student_max_params or add a smaller model"
        )
    student = min(students, key=rank)
    return {
        "family": family,
        "teacher": teacher["name"],
        "student": student["name"],
        "split": split,
        "metric": metric,
        "family_scores": family_scores,
    }
