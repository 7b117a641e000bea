"""Successive halving across a grid: who goes on after each rung, and what the search spent (docs/halving.md).

Pure: manifests and numbers in, decisions and tables out. The rungs themselves
are ``train`` stage runs (tasks/train.py, :mod:`ftflow.train.rungs`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Hashable, Mapping, Optional, Sequence, Union


def rung_fractions(rungs: Sequence[float]) -> tuple[float, ...]:
    """Every rung of a search, the whole run last: ``search.rungs`` + ``(1.0,)``."""
    return (*rungs, 1.0)


def rung_label(title: str, fraction: float) -> str:
    """A rung's run name from its run's title: ``lora[granite-teacher|r16,a32,d0.05,lr0.0002] @ rung 0.25`` (what
    ``ftflow status`` lists and the disk planner looks up among the cached runs)."""
    return f"{title} @ rung {fraction:g}"


def keep_count(n: int, eta: int) -> int:
    """How many of ``n`` combinations go on to the next rung: ``ceil(n / eta)``, at least 1."""
    if n < 1 or eta < 2:
        raise ValueError(f"keep_count: n must be >= 1 and eta >= 2, got n={n}, eta={eta}")
    return max(1, math.ceil(n / eta))


def stratum(job: Union[Mapping[str, Any], Any], axes: Sequence[str]) -> tuple:
    """The stratum a combination competes in at an intermediate rung: its values on ``axes`` (``search.stratify``
    for its grid), from a job or a manifest's ``job``; ``()`` (one stratum, the whole grid) without axes."""
    return tuple(job[axis] if isinstance(job, Mapping) else getattr(job, axis) for axis in axes)


def survivors(scores: Mapping[str, Optional[float]], eta: int,
              strata: Optional[Mapping[str, Hashable]] = None) -> list[str]:
    """The combinations that go on to the next rung, best first.

    Sorted by selection PPL at the rung (None or NaN, a run that was not trained, last), ties by name, so the
    choice does not depend on the order the runs finished in or on the runner. Without ``strata`` the first
    :func:`keep_count` of the grid are kept; with them, the first :func:`keep_count` of each stratum (combinations
    of different strata follow different learning curves and only meet at the end, docs/halving.md).

    Args:
        scores: selection PPL at the rung, by combination name (a run's ``name``, unique within a grid).
        eta: 1/eta of the combinations (of each stratum) go on.
        strata: each combination's stratum (:func:`stratum`); None: the whole grid is one.
    """
    ranked = _ranked(scores)
    groups = _grouped(ranked, strata)
    kept = {name for members in groups.values() for name in members[:keep_count(len(members), eta)]}
    return [name for name in ranked if name in kept]


def out_of_the_running(scores: Mapping[str, Optional[float]], eta: int, sizes: Mapping[Hashable, int],
                       strata: Optional[Mapping[str, Hashable]] = None) -> list[str]:
    """Of a rung's runs finished so far, those that cannot be among its :func:`survivors` whatever the others
    score: in their stratum, as many finished runs as go on already rank ahead of them (in the survivors' order).
    The flow frees their state at once (``flows/steps.py::searcher``), so that a rung keeps at most its survivors'
    states and the one just finished, not every combination's.

    Args:
        scores: selection PPL of the runs finished so far, by name.
        eta: the search's eta.
        sizes: how many combinations each stratum has at this rung, finished or not (key ``()`` without strata).
        strata: each finished run's stratum (:func:`stratum`); None: the grid is one stratum, ``()``.
    """
    return [name for key, members in _grouped(_ranked(scores), strata).items()
            for name in members[keep_count(sizes[key], eta):]]


def _ranked(scores: Mapping[str, Optional[float]]) -> list[str]:
    """Names by selection PPL (None or NaN last), then by name: the order survivors are chosen in."""
    def order(name: str) -> tuple[float, str]:
        value = scores[name]
        return (math.inf if value is None or math.isnan(value) else float(value), name)

    return sorted(scores, key=order)


def _grouped(ranked: Sequence[str], strata: Optional[Mapping[str, Hashable]]) -> dict[Hashable, list[str]]:
    groups: dict[Hashable, list[str]] = {}
    for name in ranked:
        groups.setdefault(() if strata is None else strata[name], []).append(name)
    return groups


def rung_survivors(results: Sequence[Mapping], eta: int, axes: Sequence[str] = ()) -> list[str]:
    """:func:`survivors` of one rung's runs (their manifests: ``name``, ``job``, the rung's score), each
    competing within its stratum on ``axes``."""
    return survivors({r["name"]: rung_score(r) for r in results}, eta,
                     {r["name"]: stratum(r["job"], axes) for r in results} if axes else None)


def rung_score(manifest: Mapping) -> Optional[float]:
    """A rung's selection PPL: at its step for an intermediate rung, the best epoch's for a whole run; None when
    the run was not trained (it did not fit its budget)."""
    if manifest.get("skipped"):
        return None
    rung = manifest.get("rung") or {}
    if rung.get("fraction", 1.0) < 1:
        return rung["selection"]["corpus_ppl"]
    return manifest["best_validation_ppl"]


def halving_work(n: Union[int, Sequence[int]], eta: int, rungs: Sequence[float]) -> float:
    """Whole runs' worth of training a grid of ``n`` costs under halving: ``sum over rungs k of m_k x (f_k -
    f_{k-1})``, with ``m_1 = n`` combinations at the first rung and ``m_{k+1} = keep_count(m_k, eta)``
    (``n`` under grid search). 24 combinations, eta 3, rungs 1/4 and 1/2: 24/4 + 8/4 + 3/2 = 9.5 runs.
    ``n`` a list of stratum sizes (``search.stratify``): each stratum is halved on its own, so the sum of theirs."""
    if not isinstance(n, int):
        return sum(halving_work(size, eta, rungs) for size in n)
    return sum(count * (fraction - done) for count, fraction, done in
               zip(reaching(n, eta, rungs), rung_fractions(rungs), (0.0, *rungs)))


def reaching(n: Union[int, Sequence[int]], eta: int, rungs: Sequence[float]) -> list[int]:
    """How many of a grid's combinations train at each rung, the last included: ``m_1 = n``, ``m_{k+1} =
    keep_count(m_k, eta)``; with stratum sizes, the sum over the strata."""
    if not isinstance(n, int):
        return [sum(column) for column in zip(*(reaching(size, eta, rungs) for size in n))]
    counts = [n]
    for _ in rungs:
        counts.append(keep_count(counts[-1], eta))
    return counts


def stratum_sizes(jobs: Sequence[Any], axes: Sequence[str]) -> list[int]:
    """The sizes of the strata ``jobs`` (jobs or manifests' ``job``) fall into on ``axes``, in order of first
    appearance: what :func:`halving_work` and :func:`reaching` take for a stratified grid."""
    return list(Counter(stratum(job, axes) for job in jobs).values())


def _trained(manifest: Mapping) -> tuple[float, float, float]:
    """(tokens, FLOPs, seconds) one rung trained: its steps since the previous rung's, at the run's tokens per
    step (its training set's tokens x epochs / steps)."""
    if manifest.get("skipped") or "compute" not in manifest:
        return 0.0, 0.0, 0.0
    rung = manifest["rung"]
    tokens_per_step = manifest["compute"]["epoch_tokens"] * manifest["job"]["epochs"] / rung["max_steps"]
    steps = rung["step"] - rung.get("from_step", 0)
    tokens = tokens_per_step * steps
    return tokens, tokens * manifest["compute"]["flops_per_token"], float(manifest.get("train_seconds") or 0.0)


def grid_summary(grid: str, rungs: Sequence[Sequence[Mapping]], eta: int, axes: Sequence[str] = ()) -> dict:
    """One grid's halving, for the report: each combination's last rung and its selection PPL there, the
    survivors of each rung, the winner, and the compute spent against the full grid.

    Args:
        grid: the grid's name (``LoRA grid``, ``prefix grid``, ``distillation``).
        rungs: the manifests of each rung, in rung order (each a rung's runs, any order); every manifest has
            ``rung`` (``fraction``, ``step``, ``max_steps``; ``from_step``: the previous rung's step).
        eta: the search's eta.
        axes: the grid's ``search.stratify`` axes: at an intermediate rung a combination competes within its
            stratum only.

    Returns:
        ``{"grid", "eta", "fractions", "stratify", "rows": [{"name", "last_rung", "selection_ppl", "survived"}...],
        "survivors": [[names]...], "winner", "spent": {tokens, flops, seconds}, "full": {...}, "ratio": {...}}``.
        ``full`` is the grid trained to the end: each combination's tokens and FLOPs for all its steps, and
        seconds at the seconds per step measured here (an extrapolation: said so in the report).
    """
    fractions = [rung[0]["rung"]["fraction"] for rung in rungs]
    last: dict[str, Mapping] = {}
    reached: dict[str, float] = {}
    kept: list[list[str]] = []
    spent = [0.0, 0.0, 0.0]
    steps_timed = 0.0
    full = [0.0, 0.0, 0.0]
    for manifests in rungs:
        for m in manifests:
            last[m["name"]], reached[m["name"]] = m, m["rung"]["fraction"]
            tokens, flops, seconds = _trained(m)
            spent = [spent[0] + tokens, spent[1] + flops, spent[2] + seconds]
            if seconds:
                steps_timed += m["rung"]["step"] - m["rung"].get("from_step", 0)
        scores = {m["name"]: rung_score(m) for m in manifests}
        kept.append(rung_survivors(manifests, eta, axes) if manifests[0]["rung"]["fraction"] < 1 else
                    [n for n in sorted(scores, key=lambda n: (math.inf if scores[n] is None else scores[n], n))])
    seconds_per_step = spent[2] / steps_timed if steps_timed else None
    for m in last.values():
        if m.get("skipped") or "compute" not in m:
            continue
        rung = m["rung"]
        tokens = m["compute"]["epoch_tokens"] * m["job"]["epochs"]
        full = [full[0] + tokens, full[1] + tokens * m["compute"]["flops_per_token"],
                full[2] + (rung["max_steps"] * seconds_per_step if seconds_per_step is not None else 0.0)]
    final = kept[-1] if fractions[-1] == 1.0 else []
    rows = [{"name": name, "last_rung": reached[name], "selection_ppl": rung_score(m),
             "survived": reached[name] == fractions[-1]}
            for name, m in sorted(last.items(), key=lambda kv: (-reached[kv[0]], _order(rung_score(kv[1])), kv[0]))]
    return {"grid": grid, "eta": eta, "fractions": fractions, "stratify": list(axes), "rows": rows, "survivors": kept,
            "winner": final[0] if final and rung_score(last[final[0]]) is not None else None,
            "spent": dict(zip(("tokens", "flops", "seconds"), spent)),
            "full": dict(zip(("tokens", "flops", "seconds"), full)),
            "ratio": {k: (s / f if f else None) for k, s, f in zip(("tokens", "flops", "seconds"), spent, full)}}


def _order(value: Optional[float]) -> float:
    return math.inf if value is None else value


def halving_markdown(summary: Mapping) -> str:
    """One grid's halving table and its compute line (the report's section)."""
    fractions = ", ".join(f"{f:g}" for f in summary["fractions"])
    axes = summary.get("stratify") or []
    strata = (f" (at each rung but the last, survivors chosen within each {', '.join(axes)}; they meet at the end)"
              if axes else "")
    lines = [f"**{summary['grid']}**: successive halving, eta {summary['eta']}, rungs at {fractions} of each run's "
             f"steps{strata}; winner: {summary['winner'] or 'none (no run trained)'}", "",
             "| combination | last rung | selection PPL there | went to the end |", "|---|---|---|---|"]
    for row in summary["rows"]:
        ppl = "not trained" if row["selection_ppl"] is None else f"{row['selection_ppl']:.4f}"
        lines.append(f"| {row['name']} | {row['last_rung']:g} | {ppl} | {'yes' if row['survived'] else 'no'} |")
    spent, full, ratio = summary["spent"], summary["full"], summary["ratio"]

    def share(key: str) -> str:
        return f"{ratio[key]:.2f}" if ratio[key] is not None else "n/a"

    lines += ["", "Survivors by rung: " + "; ".join(
        f"{f:g}: {', '.join(names)}" for f, names in zip(summary["fractions"][:-1], summary["survivors"][:-1])),
        "", f"Compute against the full grid: training tokens {spent['tokens']:,.0f} of {full['tokens']:,.0f} "
        f"({share('tokens')}); planner FLOPs {spent['flops']:.3g} of {full['flops']:.3g} ({share('flops')}); "
        f"measured training seconds {spent['seconds']:.1f} of {full['seconds']:.1f} ({share('seconds')}; the "
        "grid's seconds extrapolated from the seconds per step measured here)"]
    return "\n".join(lines)
