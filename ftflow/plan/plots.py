"""The memory plan's chart."""


from __future__ import annotations

from typing import TYPE_CHECKING

from ftflow.plan.decide import gb

if TYPE_CHECKING:
    import pandas as pd


def plot_plan(frame: "pd.DataFrame", budget_bytes: int, path) -> None:
    """Grouped bars of predicted scoring peak per model and precision, with the budget as a line.

    Bars are the peaks the precision was decided on (the table's ``peak_gb``);
    chosen precisions are solid, the others hatched and faded; a model's label
    carries its evaluation batch size (``skipped`` when nothing fits).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(frame["model"]))
    precisions = list(dict.fromkeys(frame["precision"]))
    colours = {"fp32": "#1f77b4", "bf16": "#ff7f0e", "fp16": "#d62728", "nf4": "#2ca02c"}
    width = 0.8 / max(1, len(precisions))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(models) + 2), 4.8))
    for k, precision in enumerate(precisions):
        part = frame[frame["precision"] == precision].set_index("model")
        xs = [i + (k - (len(precisions) - 1) / 2) * width for i in range(len(models))]
        heights = [float(part.loc[m, "peak_gb"]) if m in part.index else 0.0 for m in models]
        chosen = [bool(part.loc[m, "chosen"]) if m in part.index else False for m in models]
        bars = ax.bar(xs, heights, width, label=precision, color=colours.get(precision, "#777"))
        for bar, is_chosen in zip(bars, chosen):
            if not is_chosen:
                bar.set_alpha(0.45)
                bar.set_hatch("//")
    ax.axhline(gb(budget_bytes), color="black", linestyle="--", linewidth=1.2,
               label=f"budget {gb(budget_bytes):.0f} GB")
    labels = []
    for model in models:
        picked = frame[(frame["model"] == model) & frame["chosen"]]
        labels.append(f"{model}\n(eval batch {int(picked['eval_batch_size'].iloc[0])})" if len(picked)
                      else f"{model}\n(skipped)")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("predicted scoring peak (GB)")
    decided = ", ".join(map(str, sorted(set(frame["batch_size"]))))
    lengths = ", ".join(map(str, sorted(set(frame["max_length"]))))
    ax.set_title(f"Memory plan: scoring peak at batch size {decided}, {lengths} tokens (solid = chosen)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


