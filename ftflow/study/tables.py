"""The study's tables, built from run results: one per section of ``seed/report.md``.

Every table reports test perplexity (``PPL``, as the study did) next to the
selection-split perplexity the choices were made on, so a reader can see
both. Inputs are the benchmark manifests (``baselines``) and the training
run manifests (``runs``, see :func:`ftflow.train.runner.run_job`); skipped runs
(over the memory budget) appear with their reason instead of numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd

from ftflow.study.design import lora_grid_runs
from ftflow.train.jobs import parse_job

METHOD_ORDER = ("lora", "qlora", "prefix", "full", "distill")
Compare = Callable[[str, str], Any]
"""Two models' names -> their paired comparison on the test sentences (:class:`ftflow.study.uncertainty.Comparison`),
or None without per-sentence scores."""
METHOD_LABEL = {"lora": "LoRA", "qlora": "QLoRA", "prefix": "prefix", "full": "full FT", "distill": "distill"}


def _ppl(result: dict | None) -> float | None:
    return result["corpus_ppl"] if result else None


def _best_epoch(run: dict) -> int | str | None:
    """The run's best epoch; ``none`` when no trained epoch beat the base model (epoch 0)."""
    if run.get("skipped"):
        return None
    return run["best_epoch"] if run.get("best_epoch") is not None else "none"


def _main_runs(runs: Sequence[dict]) -> list[dict]:
    """Runs on the main training set (ablation runs on other sets are reported on their own)."""
    return [r for r in runs if r["job"]["train_set"] == "main"]


def method_table(baselines: Sequence[dict], runs: Sequence[dict]) -> pd.DataFrame:
    """Study 3.1, widened: per model, baseline PPL and the best run of each method (chosen on selection)."""
    base = {b["name"]: b for b in baselines}
    best: dict[tuple[str, str], dict] = {}
    for run in _main_runs(runs):
        if run.get("skipped"):
            continue
        key = (run["base_model"]["name"], run["method"])
        if key not in best or run["best_validation_ppl"] < best[key]["best_validation_ppl"]:
            best[key] = run
    models = sorted({m for m, _ in best}, key=lambda m: (base.get(m, {}).get("family", ""), m))
    rows = []
    for model in models:
        row = {"model": model, "family": base[model]["family"] if model in base else None,
               "parameters": base[model]["parameters"] if model in base else None,
               "baseline_ppl": _ppl(base[model]["test"]) if model in base else None}
        for method in METHOD_ORDER:
            run = best.get((model, method))
            row[f"{method}_ppl"] = _ppl(run["test"]) if run else None
        rows.append(row)
    return pd.DataFrame(rows)


def lora_grid_table(runs: Sequence[dict], chosen: str | None) -> pd.DataFrame:
    """Study 3.1's grid (on the chosen run's model): PPL, rank, alpha, dropout, learning rate, best epoch."""
    rows = []
    for run in lora_grid_runs(runs, chosen):
        job = parse_job(run["job"])
        rows.append({
            "ppl": _ppl(run.get("test")), "selection_ppl": run.get("best_validation_ppl"),
            "rank": job.r, "alpha": job.alpha, "dropout": job.dropout,
            "learning_rate": job.learning_rate, "best_epoch": _best_epoch(run),
            "chosen": "✓" if run["name"] == chosen else "", "skipped": run.get("skipped"),
        })
    return pd.DataFrame(rows)


def prefix_table(baselines: Sequence[dict], runs: Sequence[dict]) -> pd.DataFrame:
    """Study 3.2: base model, prefix length, learning rate, baseline PPL, PPL."""
    base = {b["name"]: b for b in baselines}
    rows = []
    for run in _main_runs(runs):
        if run["method"] != "prefix":
            continue
        model = run["base_model"]["name"]
        job = parse_job(run["job"])
        rows.append({
            "base_model": model, "prefix_length": job.num_virtual_tokens, "learning_rate": job.learning_rate,
            "baseline_ppl": _ppl(base[model]["test"]) if model in base else None,
            "ppl": _ppl(run.get("test")), "selection_ppl": run.get("best_validation_ppl"),
            "best_epoch": _best_epoch(run), "skipped": run.get("skipped"),
        })
    return pd.DataFrame(rows)


def no_gain_notes(runs: Sequence[dict]) -> list[str]:
    """A note for each method and model whose every trained run ended worse than the base model.

    Such runs have ``best_epoch`` None: no epoch beat epoch 0 (the base model)
    on the selection split. Their rows still show what training reached (the
    best trained epoch), so no table shows the method doing better than it did.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in _main_runs(runs):
        if not run.get("skipped"):
            groups.setdefault((run["method"], run["base_model"]["name"]), []).append(run)
    notes = []
    for (method, model), group in groups.items():
        if any(r.get("best_epoch") is not None for r in group):
            continue
        best = min(group, key=lambda r: r["best_validation_ppl"])
        label = "prefix tuning" if method == "prefix" else METHOD_LABEL[method]
        notes.append(
            f"{label} did not help {model}: in none of its {len(group)} run(s) did an epoch reach a lower selection "
            f"PPL than the base model ({best['baseline_validation']['corpus_ppl']:.4f}; best run {best['title']}: "
            f"{best['best_validation_ppl']:.4f}), so the base model stays the better one; the {label} rows show "
            "what training reached (best epoch: none)")
    return notes


def full_and_distill_table(baselines: Sequence[dict], runs: Sequence[dict]) -> pd.DataFrame:
    """Study 3.3: model / condition, original PPL, final PPL."""
    base = {b["name"]: b for b in baselines}
    rows = []
    for run in _main_runs(runs):
        if run["method"] not in ("full", "distill"):
            continue
        model = run["base_model"]["name"]
        condition = model if run["method"] == "full" else f"{model} distill {run['settings_label']}"
        rows.append({
            "condition": condition, "method": run["method"],
            "original_ppl": _ppl(base[model]["test"]) if model in base else None,
            "final_ppl": _ppl(run.get("test")), "selection_ppl": run.get("best_validation_ppl"),
            "skipped": run.get("skipped"),
        })
    return pd.DataFrame(rows)


def _steps(run: dict) -> int | None:
    """Optimizer steps the run took (its last epoch's step)."""
    history = run.get("history") or []
    return history[-1]["step"] if history else None


def _percent_ci(compare: Optional[Compare], a: Optional[str], b: Optional[str]) -> Optional[str]:
    """``[-2.10%, -0.31%] separable``: the paired interval of ``100 (a - b) / b`` (None without scores)."""
    comparison = compare(a, b) if compare is not None and a and b else None
    if comparison is None:
        return None
    return (f"[{comparison.percent_low:+.2f}%, {comparison.percent_high:+.2f}%] "
            + ("within noise" if comparison.within_noise else "separable"))


def distillation_table(runs: Sequence[dict], teacher: dict | None = None,
                       compare: Optional[Compare] = None) -> pd.DataFrame:
    """Every distillation variant against the student's full fine-tune at the same steps on the same set.

    ``teacher`` is the :class:`ftflow.study.design.TeacherChoice` (as a dict) the
    variants learnt from. The reference of a variant is the full fine-tune
    of the same model on the same training set with the same number of
    optimizer steps (:func:`ftflow.study.design.distillation_reference`); without
    one, its columns stay empty. ``compare`` (two models' names -> their
    paired comparison, :meth:`ftflow.study.recommend.Evidence.compare`) gives each
    difference its interval.
    """
    trained = [r for r in runs if not r.get("skipped")]
    full = [r for r in trained if r["method"] == "full"]
    rows = []
    for run in trained:
        if run["method"] != "distill":
            continue
        job = parse_job(run["job"])
        steps = _steps(run)
        reference = next((r for r in full if r["base_model"]["name"] == run["base_model"]["name"]
                          and r["job"]["train_set"] == run["job"]["train_set"] and _steps(r) == steps), None)
        ppl, ref_ppl = _ppl(run["test"]), _ppl(reference["test"]) if reference else None
        rows.append({
            "variant": job.loss, "top_k": job.top_k, "temperature": job.temperature, "alpha": job.alpha,
            "teacher": (f"{teacher['teacher_name']} ({teacher['teacher_ppl']:.4f})"
                        if teacher and teacher.get("teacher_name") else None),
            "train_set": run["job"]["train_set"], "steps": steps, "selection_ppl": run["best_validation_ppl"],
            "ppl": ppl, "full_ft": reference["title"] if reference else None,
            "full_ft_selection_ppl": reference["best_validation_ppl"] if reference else None,
            "full_ft_ppl": ref_ppl,
            "delta_percent": 100.0 * (ppl - ref_ppl) / ref_ppl if ref_ppl else None,
            "delta_percent_ci": _percent_ci(compare, run["name"], reference["name"] if reference else None),
        })
    return pd.DataFrame(rows)


def distillation_notes(table: pd.DataFrame | None, teacher: dict | None) -> list[str]:
    """How the teacher compared with the student (or why distillation was skipped); the outcome against full
    fine-tuning at equal steps, with its interval, is a finding of the answer (:func:`ftflow.study.recommend.study_findings`)."""
    return [teacher["reason"]] if teacher else []


def ablation_table(runs: Sequence[dict], ablation: dict[str, str], compare: Optional[Compare] = None) -> pd.DataFrame:
    """Study 3.4, measured: the same run on each training set, and its difference to the original set.

    ``ablation`` maps the names of the runs that form the ablation (same
    method, model and hyperparameters; only the training set differs) to a
    label of their training set. The run labelled ``original`` is the
    reference; a run labelled ``original, same steps ...`` (the original set
    trained for as many optimizer steps as the augmented sets get) is the
    second reference, which separates the effect of the new sentences from
    that of the extra steps. ``compare`` gives each difference its paired interval.
    """
    chosen = [r for r in runs if r["name"] in ablation and not r.get("skipped")]
    reference = next((r for r in chosen if ablation[r["name"]] == "original"), None)
    same_steps = next((r for r in chosen if ablation[r["name"]].startswith("original, same steps")), None)
    rows = []
    for run in chosen:
        ppl = _ppl(run["test"])
        row = {"train_set": ablation[run["name"]], "sentences": run["train_sentences"], "run": run["title"],
               "epochs": run["job"]["epochs"], "selection_ppl": run["best_validation_ppl"], "ppl": ppl,
               "delta_ppl": None, "delta_percent": None, "delta_percent_ci": None,
               "delta_percent_same_steps": None, "delta_percent_same_steps_ci": None}
        if reference is not None:
            ref = _ppl(reference["test"])
            row["delta_ppl"] = ppl - ref
            row["delta_percent"] = 100.0 * (ppl - ref) / ref
            if run is not reference:
                row["delta_percent_ci"] = _percent_ci(compare, run["name"], reference["name"])
        if same_steps is not None and not row["train_set"].startswith("original"):
            ref = _ppl(same_steps["test"])
            row["delta_percent_same_steps"] = 100.0 * (ppl - ref) / ref
            row["delta_percent_same_steps_ci"] = _percent_ci(compare, run["name"], same_steps["name"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        def rank(label: str) -> tuple:
            if label == "original":
                return (0, label)
            return (1 if label.startswith("original") else 2 if label.startswith("all methods") else 3, label)

        frame = frame.sort_values("train_set", key=lambda column: column.map(rank))
    return frame.reset_index(drop=True)


TABLE_COLUMNS = {
    "methods": {"model": "model", "family": "family", "parameters": "params", "baseline_ppl": "baseline PPL",
                "lora_ppl": "LoRA PPL", "qlora_ppl": "QLoRA PPL", "prefix_ppl": "prefix PPL",
                "full_ppl": "full FT PPL", "distill_ppl": "distill PPL"},
    "lora_grid": {"ppl": "PPL", "selection_ppl": "selection PPL", "rank": "rank", "alpha": "LoRA alpha",
                  "dropout": "dropout", "learning_rate": "learning rate", "best_epoch": "best epoch",
                  "chosen": "chosen", "skipped": "skipped"},
    "prefix": {"base_model": "base model", "prefix_length": "prefix length", "learning_rate": "learning rate",
               "baseline_ppl": "baseline PPL", "ppl": "PPL", "selection_ppl": "selection PPL",
               "best_epoch": "best epoch", "skipped": "skipped"},
    "full_distill": {"condition": "model / condition", "original_ppl": "original PPL", "final_ppl": "final PPL",
                     "selection_ppl": "selection PPL", "skipped": "skipped"},
    "distillation": {"variant": "loss", "top_k": "ids/position", "temperature": "T", "alpha": "alpha",
                     "teacher": "teacher (selection PPL)", "train_set": "training set", "steps": "steps",
                     "selection_ppl": "selection PPL", "ppl": "PPL", "full_ft_selection_ppl": "full FT selection PPL",
                     "full_ft_ppl": "full FT PPL, same steps", "delta_percent": "Δ % vs full FT",
                     "delta_percent_ci": "Δ % 95% CI (paired)"},
    "augmentation": {"train_set": "training set", "sentences": "sentences", "epochs": "epochs", "run": "run",
                     "selection_ppl": "selection PPL", "ppl": "PPL", "delta_ppl": "Δ PPL vs original",
                     "delta_percent": "Δ % vs original", "delta_percent_ci": "Δ % 95% CI (paired)",
                     "delta_percent_same_steps": "Δ % vs original, same steps",
                     "delta_percent_same_steps_ci": "Δ % same steps, 95% CI (paired)"},
}
TABLE_TITLES = {
    "methods": "Baseline vs fine-tuning methods per model (best run of each method, chosen on selection)",
    "lora_grid": "LoRA grid search",
    "prefix": "Prefix tuning",
    "full_distill": "Full fine-tuning and distillation",
    "distillation": "Distillation against full fine-tuning of the student, same optimizer steps and training set",
    "augmentation": "Data augmentation: the same run on each training set",
}


def study_tables(baselines: Sequence[dict], runs: Sequence[dict], chosen_lora: str | None,
                 ablation: dict[str, str] | None = None, teacher: dict | None = None,
                 compare: Optional[Compare] = None) -> dict[str, pd.DataFrame]:
    """Every study table that has rows, keyed as in ``TABLE_COLUMNS`` (``teacher``: the distillation's;
    ``compare``: paired comparisons by name, for the differences' intervals)."""
    tables = {
        "methods": method_table(baselines, runs),
        "lora_grid": lora_grid_table(runs, chosen_lora),
        "prefix": prefix_table(baselines, runs),
        "full_distill": full_and_distill_table(baselines, runs),
        "distillation": distillation_table(runs, teacher, compare),
        "augmentation": ablation_table(runs, ablation or {}, compare),
    }
    return {name: frame for name, frame in tables.items() if not frame.empty}


def plot_methods(frame: pd.DataFrame, path: Path, winner: Optional[tuple[str, str]] = None) -> None:
    """Test PPL of the baseline and of each method, one panel per model, each axis starting near its own data
    (models' perplexities can differ by several times, methods' by a percent); ``winner`` (model, method column
    prefix such as ``lora`` or ``baseline``) is starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftflow.study.report import near_data_limits

    series = [("baseline_ppl", "baseline", "#9e9e9e")] + [
        (f"{m}_ppl", METHOD_LABEL[m], c)
        for m, c in zip(METHOD_ORDER, ("#1f77b4", "#17becf", "#9467bd", "#2ca02c", "#ff7f0e"))
        if f"{m}_ppl" in frame and frame[f"{m}_ppl"].notna().any()
    ]
    fig, axes = plt.subplots(1, len(frame), figsize=(2.4 * len(frame) + 2.2, 4.0), squeeze=False)
    for ax, (_, row) in zip(axes[0], frame.iterrows()):
        shown = [(label, float(row[column]), colour, column) for column, label, colour in series
                 if not pd.isna(row[column])]
        start, end = near_data_limits(min(v for _, v, _, _ in shown), max(v for _, v, _, _ in shown))
        xs = range(len(shown))
        ax.bar(xs, [v - start for _, v, _, _ in shown], 0.8, bottom=start, color=[c for _, _, c, _ in shown])
        for x, (_, value, _, column) in zip(xs, shown):
            if winner is not None and (row["model"], column) == (winner[0], f"{winner[1]}_ppl"):
                ax.annotate("★", (x, value), ha="center", va="bottom", fontsize=14)
        ax.set_ylim(start, end + 0.08 * (end - start))
        ax.set_xticks([])
        ax.set_title(row["model"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    axes[0][0].set_ylabel("test PPL, lower is better\n(each axis starts near its data)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for _, _, colour in series]
    fig.legend(handles, [label for _, label, _ in series], fontsize=8, loc="center right", frameon=False)
    fig.suptitle("Perplexity by method per model" + (" (★ recommended)" if winner else ""))
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_size_inches()[0], 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
