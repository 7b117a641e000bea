"""Show the results in the Prefect UI (every run, cached or not)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks._stage import stage_path


@task(name="publish", cache_policy=None, persist_result=False)
def publish(evaluation: dict, plan: dict) -> None:
    """Attach the memory plan, the leaderboard table and the Markdown report to this flow run."""
    create_table_artifact(
        table=[{"model": name, **decision} for name, decision in plan["decisions"].items()], key="memory-plan",
        description=f"Memory plan: precision and batch size per model against {plan['budget_gb']:g} GB ({plan['device']})",
    )
    create_table_artifact(table=evaluation["leaderboard"], key="leaderboard",
                          description="Test-split leaderboard (ranked by bits per byte)")
    report = Path(stage_path(evaluation, "report")).read_text(encoding="utf-8")
    create_markdown_artifact(markdown=report, key="report",
                             description=f"ftflow report; files in {evaluation['dir']}")
