"""Stage: rank every baseline and trained run on test; the leaderboard, the study's tables, plots, the report.

Nothing is loaded or scored here: each benchmark and each training run scored
its own model on test when it finished (its model card carries the number).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from ftflow import design
from ftflow.report import leaderboard_rows, markdown_table, plot_leaderboard, plot_training, render_report
from ftflow.study import TABLE_COLUMNS, TABLE_TITLES, distillation_notes, no_gain_notes, plot_methods, study_tables
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_stage

STAGE = "evaluate"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/caching.py)


def _candidates(benchmarks: list[dict], failures: list[dict], runs: list[dict]) -> list[dict]:
    """One leaderboard candidate per baseline, failed model and training run."""
    parameters = {b["name"]: b["parameters"] for b in benchmarks}
    rows = [{"name": b["name"], "kind": "baseline", "family": b["family"], "base": b["name"],
             "parameters": b["parameters"], "precision": b["precision"], "test": b["test"],
             "selection": b["selection"], "peak_memory_bytes": b.get("peak_memory_bytes")} for b in benchmarks]
    rows += [{"name": f["name"], "kind": "baseline", "family": f.get("family"), "precision": f.get("precision"),
              "error": f["error"]} for f in failures]
    for run in runs:
        base = run["base_model"]
        row = {"name": run["name"], "kind": run["method"], "family": base["family"], "base": base["name"],
               "parameters": parameters.get(base["name"]), "precision": run.get("precision")}
        if run.get("skipped"):
            row["error"] = f"not trained: {run['skipped']}"
        else:
            row.update(test=run["test"], selection=run["selection"])
        rows.append(row)
    return rows


@task(name="evaluate", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def evaluate(data: dict, augmented: dict, benchmarks: list[dict], failures: list[dict], selection: dict,
             runs: list[dict], chosen_lora: str, ablation: dict[str, str], title: str, max_length: int,
             selection_split: str, memory_budget_gb: float, artifacts_dir: str, teacher: dict | None = None,
             checks: list[str] | None = None) -> dict:
    """Write the leaderboard, one table per study section (CSV + Markdown), plots and the report."""
    benchmarks = [dict(b, selection=b[selection_split]) for b in benchmarks]

    def build(out: Path) -> dict:
        frame = leaderboard_rows(_candidates(benchmarks, failures, runs))
        frame.to_csv(out / "leaderboard.csv", index=False)
        (out / "leaderboard.md").write_text(markdown_table(frame) + "\n", encoding="utf-8")
        plot_leaderboard(frame, out / "leaderboard.png")
        files = {"leaderboard_csv": "leaderboard.csv", "leaderboard_md": "leaderboard.md",
                 "report": "report.md", "plot": "leaderboard.png"}
        images = ["leaderboard.png"]
        tables = study_tables(benchmarks, runs, chosen_lora, ablation, teacher)
        sections = []
        for name, table in tables.items():
            table.to_csv(out / f"{name}.csv", index=False)
            text = markdown_table(table, TABLE_COLUMNS[name])
            (out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
            files[f"{name}_csv"], files[f"{name}_md"] = f"{name}.csv", f"{name}.md"
            sections.append((TABLE_TITLES[name], text))
        if "methods" in tables:
            plot_methods(tables["methods"], out / "methods.png")
            files["methods_plot"] = "methods.png"
            images.append("methods.png")
        trained = {r["name"]: r for r in runs if not r.get("skipped")}
        grid = {r["name"]: r for r in design.lora_grid_runs(list(trained.values()), chosen_lora)}
        if grid:
            plot_training(grid, out / "lora_grid.png", title="LoRA grid: selection-split PPL by epoch")
            files["grid_plot"] = "lora_grid.png"
            images.append("lora_grid.png")
        others = {n: r for n, r in trained.items() if n not in grid and r["job"]["train_set"] == "main"}
        if others:
            plot_training(others, out / "training.png", title="Other runs: selection-split PPL by epoch")
            files["training_plot"] = "training.png"
            images.append("training.png")
        # Bits per byte: fair across tokenizers when compare.models is all.
        best = min(trained.values(), key=lambda r: r["selection"]["bits_per_byte"], default=None)
        data_stats = dict(data["stats"], augmented=augmented.get("stats", {}).get("made", 0))
        notes = design.report_notes(failures, runs, benchmarks, memory_budget_gb,
                                    augmentation_table="augmentation" in tables,
                                    truncated=int(frame["test_truncated"].fillna(0).sum()), max_length=max_length,
                                    no_gain=no_gain_notes(runs),
                                    distillation=[*(checks or []),
                                                  *distillation_notes(tables.get("distillation"), teacher)])
        best_text = None
        if best is not None:
            best_text = (f"{best['name']} (selection PPL {best['best_validation_ppl']:.4f}, bits/byte "
                         f"{best['selection']['bits_per_byte']:.4f}; test PPL {best['test']['corpus_ppl']:.4f})")
        report = render_report(title=title, frame=frame, data_stats=data_stats, selection=selection,
                               protocol_note=design.protocol_note(selection_split), images=images, notes=notes,
                               sections=sections, best=best_text)
        (out / "report.md").write_text(report, encoding="utf-8")
        return {
            "files": files,
            "leaderboard": frame.astype(object).where(frame.notna(), None).to_dict("records"),
            "tables": {name: t.astype(object).where(t.notna(), None).to_dict("records") for name, t in tables.items()},
            "best": best["name"] if best else None,
        }

    return run_stage(STAGE, MODULES, build)
