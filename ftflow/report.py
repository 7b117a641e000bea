"""Leaderboard, Markdown report and plots from the stages' results."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

KIND_ORDER = ("baseline", "lora", "qlora", "prefix", "full", "distill")
COLUMNS = {
    "rank": "rank",
    "name": "model",
    "kind": "kind",
    "family": "family",
    "base": "base model",
    "parameters": "params",
    "precision": "precision",
    "test_ppl": "test PPL",
    "test_mean_sentence_ppl": "test PPL (sentence mean)",
    "test_bits_per_byte": "test bits/byte",
    "selection_ppl": "selection PPL",
    "delta_ppl_vs_base": "Δ test PPL vs base",
    "test_truncated": "truncated",
    "peak_gb": "peak GB (CUDA)",
    "error": "error",
}


def leaderboard_rows(candidates: Sequence[dict]) -> pd.DataFrame:
    """One row per candidate, best (lowest test bits per byte) first; failed ones last.

    Each candidate dict has ``name``, ``kind``, ``family``, ``base``, ``parameters``,
    ``precision``, and either ``test`` / ``selection`` score dicts (see
    :class:`ftflow.perplexity.PerplexityResult`) or an ``error``. Rows are ranked
    by bits per byte because token perplexities of different tokenizers are not
    comparable; within one family both orders agree.
    """
    base_test = {c["name"]: c["test"]["corpus_ppl"] for c in candidates if c.get("test") and c["kind"] == "baseline"}
    rows = []
    for c in candidates:
        test, selection = c.get("test"), c.get("selection")
        rows.append({
            "name": c["name"],
            "kind": c["kind"],
            "family": c.get("family"),
            "base": c.get("base") or c["name"],
            "parameters": c.get("parameters"),
            "precision": c.get("precision"),
            "test_ppl": test["corpus_ppl"] if test else None,
            "test_mean_sentence_ppl": test["mean_sentence_ppl"] if test else None,
            "test_bits_per_byte": test["bits_per_byte"] if test else None,
            "selection_ppl": selection["corpus_ppl"] if selection else None,
            "delta_ppl_vs_base": (
                test["corpus_ppl"] - base_test[c["base"]] if test and c.get("base") in base_test and c["kind"] != "baseline" else None
            ),
            "test_truncated": test["n_truncated"] if test else None,
            "peak_gb": c["peak_memory_bytes"] / 1e9 if c.get("peak_memory_bytes") else None,
            "error": c.get("error"),
        })
    frame = pd.DataFrame(rows)
    frame["_failed"] = frame["test_bits_per_byte"].isna()
    frame = frame.sort_values(["_failed", "test_bits_per_byte", "name"], kind="stable").drop(columns="_failed")
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame.reset_index(drop=True)


# Settings, not measurements: shown as written (0.05, 2e-05), not to four decimals.
PLAIN_COLUMNS = frozenset({"alpha", "dropout", "learning_rate", "rank", "prefix_length", "best_epoch", "epochs"})
PERCENT_COLUMNS = frozenset({"delta_percent", "delta_percent_same_steps"})


def _cell(value, plain: bool = False) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
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
    optional = ("error", "peak_gb", "skipped")  # shown only when some row has a value
    keep = [c for c in columns if c in frame.columns and (c not in optional or frame[c].notna().any())]
    lines = ["| " + " | ".join(columns[c] for c in keep) + " |", "|" + "---|" * len(keep)]
    for record in frame[keep].to_dict("records"):
        cells = [_percent(record[c]) if c in PERCENT_COLUMNS else _cell(record[c], c in PLAIN_COLUMNS) for c in keep]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_leaderboard(frame: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of test bits per byte per candidate, coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame.dropna(subset=["test_bits_per_byte"]).iloc[::-1]
    colours = dict(zip(KIND_ORDER, ("#9e9e9e", "#1f77b4", "#17becf", "#9467bd", "#2ca02c", "#ff7f0e")))
    fig, ax = plt.subplots(figsize=(9.5, 0.45 * len(ok) + 1.5))
    bars = ax.barh(ok["name"], ok["test_bits_per_byte"], color=[colours.get(k, "#555") for k in ok["kind"]])
    for bar, ppl in zip(bars, ok["test_ppl"]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  PPL {ppl:.2f}", va="center", fontsize=8)
    ax.set_xlabel("test bits per byte (lower is better)")
    ax.set_title("ftflow leaderboard")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in KIND_ORDER if k in set(ok["kind"])]
    ax.legend(handles, [k for k in KIND_ORDER if k in set(ok["kind"])], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlim(0, ok["test_bits_per_byte"].max() * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(histories: dict[str, dict], path: Path, title: str = "Perplexity by epoch") -> None:
    """Selection-split perplexity after every epoch of each trained model (epoch 0 = the base model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, run in histories.items():
        epochs = [0] + [e["epoch"] for e in run["history"]]
        ppl = [run["baseline_validation"]["corpus_ppl"]] + [e["validation"]["corpus_ppl"] for e in run["history"]]
        # best_epoch is None when no epoch beat the base model (epoch 0): then nothing trained helped.
        best = run["best_epoch"] if run["best_epoch"] is not None else "none, base model better"
        ax.plot(epochs, ppl, marker="o", label=f"{name} (best epoch {best})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("selection-split PPL")
    ax.set_title(title)
    ax.legend(fontsize=7)
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
    best: str | None = None,
) -> str:
    """The Markdown report: what was run on what, the leaderboard, the plots."""
    sizes = data_stats["sentences"]
    overlap = data_stats["train_test_overlap"]["count"]
    lines = [
        f"# {title}",
        "",
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
        *([f"- best trained model on the selection split: **{best}**"] if best else []),
        "",
        "## Leaderboard (test split)",
        "",
        markdown_table(frame),
        "",
        "Ranked by test bits per byte, which does not depend on the tokenizer; token perplexities are only "
        "comparable within one family (one tokenizer).",
        "",
    ]
    for heading, body in sections:
        lines += [f"## {heading}", "", body, ""]
    for image in images:
        lines += [f"![{Path(image).stem}]({image})", ""]
    if notes:
        lines += ["## Notes", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)
