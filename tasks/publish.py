"""Show the results in the Prefect UI (every run, cached or not)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ftflow.study.tables import TABLE_TITLES
from tasks._stage import stage_path


@task(name="publish", cache_policy=None, persist_result=False)
def publish(evaluation: dict, plan: dict, benchmarks: list[dict]) -> None:
    """Attach the memory plan, benchmark, leaderboard and study tables, the answer and the Markdown report to this
    flow run."""
    create_table_artifact(
        table=[{"model": name, **decision} for name, decision in plan["decisions"].items()], key="memory-plan",
        description=f"Memory plan: precision and batch size per model against {plan['budget_gb']:g} GB ({plan['device']})",
    )
    create_table_artifact(
        table=[{"model": b["name"], "family": b["family"], "precision": b["precision"], "parameters": b["parameters"],
                "validation_ppl": b["validation"]["corpus_ppl"], "test_ppl": b["test"]["corpus_ppl"],
                "validation_bits_per_byte": b["validation"]["bits_per_byte"]} for b in benchmarks],
        key="benchmark", description="Baselines: every candidate scored before any training")
    create_table_artifact(table=evaluation["leaderboard"], key="leaderboard",
                          description="Test-split leaderboard (ranked by bits per byte)")
    for name, rows in evaluation.get("tables", {}).items():
        create_table_artifact(table=rows, key=f"study-{name.replace('_', '-')}",
                              description=f"Study table: {TABLE_TITLES[name]}")
    if "answer" in evaluation["files"]:  # the recommended model, the runner-up, the study's findings
        create_markdown_artifact(markdown=Path(stage_path(evaluation, "answer")).read_text(encoding="utf-8"),
                                 key="answer", description="ftflow's answer: the recommended model and the findings")
    report = Path(stage_path(evaluation, "report")).read_text(encoding="utf-8")
    create_markdown_artifact(markdown=report, key="report",
                             description=f"ftflow report; files in {evaluation['dir']}")
