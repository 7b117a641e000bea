"""Leaderboard, Markdown report and plots from the stages' results."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import pandas as pd

KIND_ORDER = ("baseline", "lora", "qlora", "prefix", "full", "distill")
CONTROL = "ablation control"
COLUMNS = {
    "rank": "rank",
    "answer": "answer",
    "name": "model",
    "kind": "kind",
    "family": "family",
    "base": "base model",
    "parameters": "params",
    "precision": "precision",
    "test_ppl": "test PPL",
    "test_ppl_ci": "test PPL 95% CI",
    "test_mean_sentence_ppl": "test PPL (sentence mean)",
    "test_bits_per_byte": "test bits/byte",
    "selection_ppl": "selection PPL",
    "delta_ppl_vs_base": "Δ test PPL vs base",
    "delta_vs_base_ci": "Δ vs base 95% CI (paired)",
    "test_truncated": "truncated",
    "peak_gb": "peak GB (CUDA)",
    "error": "error",
}
CONTROL_COLUMNS = {
    "name": "model", "kind": "kind", "train_set": "training set", "test_ppl": "test PPL",
    "test_ppl_ci": "test PPL 95% CI", "test_bits_per_byte": "test bits/byte", "selection_ppl": "selection PPL",
    "delta_ppl_vs_base": "Δ test PPL vs base", "delta_vs_base_ci": "Δ vs base 95% CI (paired)",
}


def interval_text(low, high, digits: int = 4, noise: bool = False) -> Optional[str]:
    """``[4.0912, 4.1570]`` (``noise``: an interval of a difference, marked when it contains 0); None without one."""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return None
    text = f"[{low:+.{digits}f}, {high:+.{digits}f}]" if noise else f"[{low:.{digits}f}, {high:.{digits}f}]"
    if noise:
        text += " within noise" if low <= 0 <= high else " separable"
    return text


def leaderboard_rows(candidates: Sequence[dict], intervals: Optional[Callable[[str], Any]] = None,
                     compare: Optional[Callable[[str, str], Any]] = None, answer: Optional[dict] = None,
                     controls_ranked: bool = False) -> pd.DataFrame:
    """One row per candidate, best (lowest test bits per byte) first; failed ones, then ablation controls, last.

    Each candidate dict has ``name``, ``kind``, ``family``, ``base``, ``parameters``,
    ``precision``, and either ``test`` / ``selection`` score dicts (see
    :class:`ftflow.perplexity.PerplexityResult`) or an ``error``; ``role`` is
    ``ablation control`` for a run of the augmentation ablation on another
    training set than the pipeline's (``train_set`` names it): such a row is
    kept below the candidates, unranked, unless ``controls_ranked``. Rows are
    ranked by bits per byte because token perplexities of different
    tokenizers are not comparable; within one family both orders agree.

    Args:
        candidates: see above.
        intervals: (name, ``ppl`` or ``bits_per_byte``) -> the test figure's bootstrap interval (``.low``,
            ``.high``), or None.
        compare: (name, base name) -> the paired comparison of the two (``.low``, ``.high``), or None.
        answer: ``{name: "recommended" | "runner-up"}``.
        controls_ranked: rank ablation controls among the candidates (``ablation.recommend_controls``).
    """
    base_test = {c["name"]: c["test"]["corpus_ppl"] for c in candidates if c.get("test") and c["kind"] == "baseline"}
    answer = answer or {}
    rows = []
    for c in candidates:
        test, selection = c.get("test"), c.get("selection")
        control = c.get("role") == CONTROL
        ci = intervals(c["name"], "ppl") if intervals and test else None
        bpb_ci = intervals(c["name"], "bits_per_byte") if intervals and test else None
        versus = (compare(c["name"], c["base"]) if compare and test and c.get("base") in base_test
                  and c["kind"] != "baseline" else None)
        rows.append({
            "name": c["name"],
            "answer": answer.get(c["name"]),
            "kind": f"{c['kind']} ({CONTROL})" if control else c["kind"],
            "role": CONTROL if control else "candidate",
            "train_set": c.get("train_set_label"),
            "family": c.get("family"),
            "base": c.get("base") or c["name"],
            "parameters": c.get("parameters"),
            "precision": c.get("precision"),
            "test_ppl": test["corpus_ppl"] if test else None,
            "test_ppl_low": ci.low if ci else None,
            "test_ppl_high": ci.high if ci else None,
            "test_mean_sentence_ppl": test["mean_sentence_ppl"] if test else None,
            "test_bits_per_byte": test["bits_per_byte"] if test else None,
            "test_bpb_low": bpb_ci.low if bpb_ci else None,
            "test_bpb_high": bpb_ci.high if bpb_ci else None,
            "selection_ppl": selection["corpus_ppl"] if selection else None,
            "delta_ppl_vs_base": (
                test["corpus_ppl"] - base_test[c["base"]] if test and c.get("base") in base_test and c["kind"] != "baseline" else None
            ),
            "delta_low": versus.low if versus is not None and versus.metric == "ppl" else None,
            "delta_high": versus.high if versus is not None and versus.metric == "ppl" else None,
            "test_truncated": test["n_truncated"] if test else None,
            "peak_gb": c["peak_memory_bytes"] / 1e9 if c.get("peak_memory_bytes") else None,
            "error": c.get("error"),
        })
    frame = pd.DataFrame(rows)
    frame["test_ppl_ci"] = [interval_text(lo, hi) for lo, hi in zip(frame["test_ppl_low"], frame["test_ppl_high"])]
    frame["delta_vs_base_ci"] = [interval_text(lo, hi, noise=True) for lo, hi in zip(frame["delta_low"],
                                                                                      frame["delta_high"])]
    # Candidates first (ranked), then candidates without a result, then the controls (below, unranked).
    frame["_group"] = [2 if role == CONTROL and not controls_ranked else int(pd.isna(bpb))
                       for role, bpb in zip(frame["role"], frame["test_bits_per_byte"])]
    frame = frame.sort_values(["_group", "test_bits_per_byte", "name"], kind="stable")
    ranked = (frame["_group"] < 2).tolist()
    frame = frame.drop(columns="_group").reset_index(drop=True)
    frame.insert(0, "rank", pd.array([i + 1 if r else None for i, r in enumerate(ranked)], dtype="Int64"))
    return frame


def split_leaderboard(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the ranked rows: candidates and failures; the unranked ablation controls)."""
    controls = frame["rank"].isna()
    return frame[~controls].reset_index(drop=True), frame[controls].reset_index(drop=True)


def leaderboard_markdown(frame: pd.DataFrame) -> str:
    """The leaderboard's Markdown: the candidates' table, then the ablation controls' own table (if any)."""
    ranked, controls = split_leaderboard(frame)
    text = markdown_table(ranked)
    if not controls.empty:
        text += ("\n\nAblation controls (runs of the augmentation ablation on another training set: they measure "
                 "augmentation and are not candidates; `ablation.recommend_controls: true` ranks them):\n\n"
                 + markdown_table(controls, CONTROL_COLUMNS))
    return text


# Settings, not measurements: shown as written (0.05, 2e-05), not to four decimals.
PLAIN_COLUMNS = frozenset({"alpha", "dropout", "learning_rate", "rank", "prefix_length", "best_epoch", "epochs"})
PERCENT_COLUMNS = frozenset({"delta_percent", "delta_percent_same_steps"})


def _cell(value, plain: bool = False) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:g}" if plain else f"{value:.4f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _percent(value) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value:+.2f}%"


def markdown_table(frame: pd.DataFrame, columns: dict[str, str] = COLUMNS) -> str:
    """A GitHub Markdown table of the given columns (header from ``columns`` values)."""
    optional = ("error", "peak_gb", "skipped", "answer", "test_ppl_ci", "delta_vs_base_ci", "delta_percent_ci",
                "delta_percent_same_steps_ci")  # shown only when some row has a value
    keep = [c for c in columns if c in frame.columns and (c not in optional or frame[c].notna().any())]
    lines = ["| " + " | ".join(columns[c] for c in keep) + " |", "|" + "---|" * len(keep)]
    for record in frame[keep].to_dict("records"):
        cells = [_percent(record[c]) if c in PERCENT_COLUMNS else _cell(record[c], c in PLAIN_COLUMNS) for c in keep]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def near_data_limits(low: float, high: float, share: float = 0.08) -> tuple[float, float]:
    """Axis limits around ``[low, high]``, padded by ``share`` of their span: bars start near the data, not at 0."""
    span = high - low if high > low else max(abs(high), 1e-9) * 0.05
    return low - share * span, high + share * span


def plot_leaderboard(frame: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of test bits per byte per candidate (with its 95% interval), the recommended one marked.

    The axis starts near the best value, not at 0, so differences of a few
    percent are visible; ablation controls are left out (they are not candidates).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked, _ = split_leaderboard(frame)
    ok = ranked.dropna(subset=["test_bits_per_byte"]).iloc[::-1]
    colours = dict(zip(KIND_ORDER, ("#9e9e9e", "#1f77b4", "#17becf", "#9467bd", "#2ca02c", "#ff7f0e")))
    fig, ax = plt.subplots(figsize=(10.5, 0.42 * len(ok) + 1.8))
    values = ok["test_bits_per_byte"].astype(float)
    low = ok["test_bpb_low"].astype(float).fillna(values) if "test_bpb_low" in ok else values
    high = ok["test_bpb_high"].astype(float).fillna(values) if "test_bpb_high" in ok else values
    start, end = near_data_limits(float(low.min()), float(high.max()))
    labels = [f"★ {name}" if answer == "recommended" else name for name, answer in zip(ok["name"], ok.get(
        "answer", [None] * len(ok)))]
    ax.barh(labels, values - start, left=start, color=[colours.get(k, "#555") for k in ok["kind"]],
                   edgecolor=["black" if a == "recommended" else "none" for a in ok.get("answer", [None] * len(ok))],
                   linewidth=1.5)
    # Centred on the interval, not the point: a percentile bootstrap interval need not contain the corpus estimate.
    ax.errorbar((low + high) / 2, range(len(ok)), xerr=(high - low) / 2, fmt="none", ecolor="black",
                elinewidth=0.8, capsize=2)
    for y, (top, ppl) in enumerate(zip(high, ok["test_ppl"])):
        ax.text(top, y, f"  PPL {ppl:.2f}", va="center", fontsize=8)
    for label in ax.get_yticklabels():
        if label.get_text().startswith("★"):
            label.set_fontweight("bold")
    ax.set_xlim(start, end + 0.12 * (end - start))
    ax.set_xlabel("test bits per byte, lower is better (axis starts near the data, not at 0)\nwhiskers: each model's "
                  "95% interval; whether two models differ: the report's paired intervals")
    ax.set_title("ftflow leaderboard (★ recommended)")
    kinds = [k for k in KIND_ORDER if k in set(ok["kind"])]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds]
    ax.legend(handles, kinds, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(histories: dict[str, dict], path: Path, title: str = "Perplexity by epoch") -> None:
    """Selection-split perplexity after every epoch of each trained model, as a change from its base model (epoch 0).

    In percent of the base model's PPL, so runs on models whose perplexities differ several times over share
    one readable axis; the legend sits below the axes, off the lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 4.5 + 0.16 * ((len(histories) + 1) // 2)))
    for name, run in histories.items():
        epochs = [0] + [e["epoch"] for e in run["history"]]
        base = run["baseline_validation"]["corpus_ppl"]
        change = [0.0] + [100.0 * (e["validation"]["corpus_ppl"] / base - 1.0) for e in run["history"]]
        # best_epoch is None when no epoch beat the base model (epoch 0): then nothing trained helped.
        best = run["best_epoch"] if run["best_epoch"] is not None else "none, base model better"
        ax.plot(epochs, change, marker="o", label=f"{name} (base {base:.2f}; best epoch {best})")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("epoch (0: the base model)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("selection-split PPL, % change\nfrom the base model (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_report(
    *,
    title: str,
    frame: pd.DataFrame,
    data_stats: dict,
    selection: dict,
    protocol_note: str,
    images: Sequence[str],
    notes: Sequence[str] = (),
    sections: Sequence[tuple[str, str]] = (),
    answer: str = "",
) -> str:
    """The Markdown report: the answer (:func:`ftflow.study.recommend.answer_text`) first, then what was run on what,
    the leaderboard (ablation controls in their own table), the study's tables, the plots and the notes."""
    sizes = data_stats["sentences"]
    overlap = data_stats["train_test_overlap"]["count"]
    lines = [f"# {title}", ""]
    if answer:
        lines += [answer.rstrip("\n"), ""]
    lines += [
        "## Data",
        f"- train {sizes['train']} sentences + {data_stats.get('augmented', 0)} augmented, "
        f"validation {sizes['validation']}, test {sizes['test']}",
        f"- blank lines dropped: train {data_stats['blank_dropped']['train']}, test {data_stats['blank_dropped']['test']}",
        f"- sentences in both train and test: {overlap}",
        "",
        "## Selection",
        f"- {protocol_note}",
        f"- family **{selection['family']}** (by {selection['split']} {selection['metric']}); "
        f"teacher **{selection['teacher']}**, student **{selection['student']}**",
        "- family scores: " + ", ".join(f"{f} {s:.4f}" for f, s in sorted(selection["family_scores"].items(), key=lambda x: x[1])),
        "",
        "## Leaderboard (test split)",
        "",
        leaderboard_markdown(frame),
        "",
        "Ranked by test bits per byte, which does not depend on the tokenizer; token perplexities are only "
        "comparable within one family (one tokenizer). Intervals: 95% bootstrap over the test sentences (1,000 "
        "resamples, corpus PPL recomputed from each resample's summed NLL and tokens); a difference whose paired "
        "interval contains 0 is within noise.",
        "",
    ]
    for heading, body in sections:
        lines += [f"## {heading}", "", body, ""]
    for image in images:
        lines += [f"![{Path(image).stem}]({image})", ""]
    if notes:
        lines += ["## Notes", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def failure_summary(evaluation: Mapping) -> list[str]:
    """One line per model or run of the leaderboard that has no result, with its cause (on that line)."""
    return [f"{row['name']} ({row['kind']}): {' '.join(str(row['error']).split())}"
            for row in evaluation.get("leaderboard", []) if row.get("error")]
