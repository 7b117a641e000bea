"""Stage: rank every baseline and trained run on test; the answer, the leaderboard, the study's tables, plots, the report.

Nothing is loaded or scored here: each benchmark and each training run scored
its own model on test when it finished and kept every test sentence's NLL,
tokens and bytes (``per_sentence.json``), from which the intervals and the
paired comparisons are computed (:mod:`ftflow.study.uncertainty`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from prefect import task

from ftflow.study import design
from ftflow.study.halving import halving_markdown
from ftflow.study.recommend import CONTROL, Evidence, answer_text, recommend, study_findings
from ftflow.study.report import (leaderboard_markdown, leaderboard_rows, markdown_table, plot_leaderboard,
                                 plot_training, render_report)
from ftflow.study.tables import (TABLE_COLUMNS, TABLE_TITLES, distillation_notes, no_gain_notes, plot_methods,
                                 study_tables)
from ftflow.study.uncertainty import SentenceScores
from ftflow.train.jobs import parse_job
from tasks._stage import STAGE_TASK_OPTIONS, ContentCache, run_logger, run_stage, stage_path

STAGE = "evaluate"
MODULES = (__name__,)  # the code key: every project module this one reaches (ftflow/stages/caching.py)


def _candidates(benchmarks: list[dict], failures: list[dict], runs: list[dict], ablation: dict[str, str]) -> list[dict]:
    """One leaderboard candidate per baseline, failed model and training run; ablation runs on another training
    set than the pipeline's are controls (``role``)."""
    parameters = {b["name"]: b["parameters"] for b in benchmarks}
    precisions = {b["name"]: b["precision"] for b in benchmarks}
    rows = [{"name": b["name"], "kind": "baseline", "family": b["family"], "base": b["name"],
             "parameters": b["parameters"], "precision": b["precision"], "test": b["test"],
             "selection": b["selection"], "peak_memory_bytes": b.get("peak_memory_bytes"), "role": "candidate",
             "base_path": b["model"]["path"], "hyperparameters": {}, "stage_dir": b["dir"]} for b in benchmarks]
    rows += [{"name": f["name"], "kind": "baseline", "family": f.get("family"), "precision": f.get("precision"),
              "error": f["error"], "role": "candidate"} for f in failures]
    for run in runs:
        base = run["base_model"]
        control = run["job"]["train_set"] != "main"
        row = {"name": run["name"], "kind": run["method"], "family": base["family"], "base": base["name"],
               "parameters": parameters.get(base["name"]), "precision": run.get("precision"),
               "base_precision": precisions.get(base["name"]), "role": CONTROL if control else "candidate",
               "train_set_label": ablation.get(run["name"], run["job"]["train_set"]) if control else None,
               "settings": run.get("settings_label"), "quantization": run.get("quantization"),
               "fit_plan": run.get("fit_plan"), "base_path": base["path"], "stage_dir": run["dir"]}
        if run.get("skipped"):
            row["error"] = f"not trained: {run['skipped']}"
        else:
            row.update(test=run["test"], selection=run["selection"], model_dir=str(stage_path(run, "model")),
                       hyperparameters={**parse_job(run["job"]).hyper, "learning_rate": run["job"]["learning_rate"],
                                        "epochs": run["job"]["epochs"], "batch_size": run["job"]["batch_size"]})
        rows.append(row)
    return rows


def _evidence(benchmarks: list[dict], runs: list[dict]) -> Evidence:
    """Every model's test-sentence scores, from the files its stage kept (none for a run cached before they were)."""
    scores = {}
    for manifest in [*benchmarks, *(r for r in runs if not r.get("skipped"))]:
        if "per_sentence" not in manifest.get("files", {}):
            continue
        record = json.loads(stage_path(manifest, "per_sentence").read_text(encoding="utf-8")).get("test")
        if record and record.get("nll"):
            scores[manifest["name"]] = SentenceScores.from_record(record)
    return Evidence(scores)


@task(name="evaluate", cache_policy=ContentCache(stage=STAGE, modules=MODULES), **STAGE_TASK_OPTIONS)
def evaluate(data: dict, augmented: dict, benchmarks: list[dict], failures: list[dict], selection: dict,
             runs: list[dict], chosen_lora: str, ablation: dict[str, str], title: str, max_length: int,
             selection_split: str, memory_budget_gb: float, artifacts_dir: str, teacher: dict | None = None,
             checks: list[str] | None = None, decisions: Optional[dict] = None,
             recommend_controls: bool = False, halving: Optional[list[dict]] = None) -> dict:
    """Write the answer (recommended model, runner-up, the study's findings with intervals), the leaderboard, one
    table per study section (CSV + Markdown), plots and the report."""
    benchmarks = [dict(b, selection=b[selection_split]) for b in benchmarks]

    def build(out: Path) -> dict:
        evidence = _evidence(benchmarks, runs)
        candidates = _candidates(benchmarks, failures, runs, ablation)
        missing = [c["name"] for c in candidates if c.get("test") and not evidence.has(c["name"])]
        if missing:
            run_logger().warning("no per-sentence test scores kept for %d model(s) (cached before ftflow kept them: "
                                 "rerun them for intervals): %s", len(missing), ", ".join(missing))
        answer = recommend(candidates, evidence, budget_gb=memory_budget_gb, decisions=decisions or {},
                           include_controls=recommend_controls)
        findings = study_findings(benchmarks, runs, chosen_lora, ablation, teacher, evidence,
                                  lora_grid=design.lora_grid_runs)
        marks = {answer["name"]: "recommended"} if answer["name"] else {}
        if answer.get("runner_up"):
            marks[answer["runner_up"]["name"]] = "runner-up"
        frame = leaderboard_rows(candidates, intervals=evidence.interval,
                                 compare=lambda a, b: evidence.compare(a, b, "ppl"), answer=marks,
                                 controls_ranked=recommend_controls)
        frame.to_csv(out / "leaderboard.csv", index=False)
        (out / "leaderboard.md").write_text(leaderboard_markdown(frame) + "\n", encoding="utf-8")
        plot_leaderboard(frame, out / "leaderboard.png")
        answer_md = answer_text(answer, findings)
        (out / "answer.md").write_text(answer_md, encoding="utf-8")
        files = {"leaderboard_csv": "leaderboard.csv", "leaderboard_md": "leaderboard.md", "answer": "answer.md",
                 "report": "report.md", "plot": "leaderboard.png"}
        images = ["leaderboard.png"]
        tables = study_tables(benchmarks, runs, chosen_lora, ablation, teacher, compare=evidence.compare)
        sections = []
        for name, table in tables.items():
            table.to_csv(out / f"{name}.csv", index=False)
            text = markdown_table(table, TABLE_COLUMNS[name])
            (out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
            files[f"{name}_csv"], files[f"{name}_md"] = f"{name}.csv", f"{name}.md"
            sections.append((TABLE_TITLES[name], text))
        if "methods" in tables:
            winner = answer.get("winner")
            plot_methods(tables["methods"], out / "methods.png",
                         winner=(winner["base"], winner["kind"]) if winner and winner["role"] == "candidate" else None)
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
        for summary in halving or []:  # per grid searched by successive halving (docs/halving.md)
            sections.append((f"Successive halving: {summary['grid']}", halving_markdown(summary)))
        data_stats = dict(data["stats"], augmented=augmented.get("stats", {}).get("made", 0))
        notes = design.report_notes(failures, runs, benchmarks, memory_budget_gb,
                                    augmentation_table="augmentation" in tables,
                                    truncated=int(frame["test_truncated"].fillna(0).sum()), max_length=max_length,
                                    no_gain=no_gain_notes(runs),
                                    distillation=[*(checks or []),
                                                  *distillation_notes(tables.get("distillation"), teacher)])
        if missing:
            notes.append(f"no intervals for {len(missing)} model(s) whose per-sentence test scores were not kept "
                         f"(cached by an older ftflow; delete their train/benchmark directories to rescore): "
                         f"{', '.join(missing)}")
        notes += [f"not compared: {line}" for line in evidence.refused]
        report = render_report(title=title, frame=frame, data_stats=data_stats, selection=selection,
                               protocol_note=design.protocol_note(selection_split), images=images, notes=notes,
                               sections=sections, answer=answer_md)
        (out / "report.md").write_text(report, encoding="utf-8")
        return {
            "files": files,
            "leaderboard": frame.astype(object).where(frame.notna(), None).to_dict("records"),
            "tables": {name: t.astype(object).where(t.notna(), None).to_dict("records") for name, t in tables.items()},
            "recommendation": answer,
            "findings": findings,
            "halving": list(halving or []),
            # Where each scored model's stage directory is (its manifest): what `ftflow export` reads.
            "models": {c["name"]: {"kind": c["kind"], "role": c["role"], "stage_dir": c["stage_dir"]}
                       for c in candidates if c.get("test")},
        }

    return run_stage(STAGE, MODULES, build)
