"""The memory plan's tables (CSV, Markdown) and the writer of its files."""


from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ftflow.plan.decide import ModelPlan, gb
from ftflow.plan.plots import plot_plan

if TYPE_CHECKING:
    import pandas as pd


# ----------------------------------------------------------------------------- reporting

PLAN_COLUMNS = (
    "model", "parameters", "precision", "batch_size", "max_length", "weights_gb", "logits_gb",
    "activations_gb", "overhead_gb", "peak_gb", "budget_gb", "fits", "chosen", "eval_batch_size",
    "eval_peak_gb", "reason",
)


def plan_table(plans: Sequence[ModelPlan]) -> "pd.DataFrame":
    """One row per model and precision: predicted scoring peak and its parts, in GB.

    Each row is the prediction at the batch size the precision was decided at
    (``batch_size``); ``fits`` says whether it is within the budget; ``chosen``
    marks the planner's choice, whose row also gives the evaluation batch size
    and its predicted peak. A skipped model has no chosen row and its reason
    on every row.
    """
    import pandas as pd

    rows = []
    for plan in plans:
        for precision, prediction in plan.predictions.items():
            chosen = precision == plan.precision
            rows.append({
                "model": plan.name,
                "parameters": plan.parameters,
                "precision": precision,
                "batch_size": prediction.batch_size,
                "max_length": prediction.max_length,
                "weights_gb": gb(prediction.weights_bytes),
                "logits_gb": gb(prediction.logits_bytes),
                "activations_gb": gb(prediction.activations_bytes),
                "overhead_gb": gb(prediction.overhead_bytes),
                "peak_gb": gb(prediction.peak_bytes),
                "budget_gb": gb(plan.budget_bytes),
                "fits": prediction.peak_bytes <= plan.budget_bytes,
                "chosen": chosen,
                "eval_batch_size": plan.batch_size if chosen else None,
                "eval_peak_gb": gb(plan.peak_bytes) if chosen else None,
                "reason": plan.reason if (chosen or plan.precision is None) else "",
            })
    frame = pd.DataFrame(rows, columns=list(PLAN_COLUMNS))
    frame["eval_batch_size"] = frame["eval_batch_size"].astype("Int64")  # integers with gaps
    return frame


def plan_markdown(frame: "pd.DataFrame") -> str:
    """A GitHub Markdown table of :func:`plan_table`'s frame."""
    import pandas as pd

    def cell(value) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, bool):
            return "yes" if value else ""
        if isinstance(value, float):
            return f"{value:.2f}"
        if isinstance(value, int) and value >= 10_000:
            return f"{value:,}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for record in frame.to_dict("records"):
        lines.append("| " + " | ".join(cell(record[c]) for c in frame.columns) + " |")
    return "\n".join(lines)



PLAN_FILES = {"csv": "plan.csv", "markdown": "plan.md", "plot": "plan.png"}
"""The memory plan's tables, as :func:`write_plan` names them in its directory."""


def write_plan(plans: Sequence[ModelPlan], budget_bytes: int, out: Path) -> "pd.DataFrame":
    """Write the plan's table (``plan.csv``, ``plan.md``) and plot (``plan.png``) into ``out``; return the table.

    The one writer of these files: ``ftflow plan`` and the pipeline's ``plan_memory`` stage both call it.
    """
    frame = plan_table(plans)
    out = Path(out)
    frame.to_csv(out / PLAN_FILES["csv"], index=False)
    (out / PLAN_FILES["markdown"]).write_text(plan_markdown(frame) + "\n", encoding="utf-8")
    plot_plan(frame, budget_bytes, out / PLAN_FILES["plot"])
    return frame


