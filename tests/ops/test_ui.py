"""The local Prefect UI, in headless Chromium, shows the finished nightly run and its leaderboard artifact."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from tests.needs import needs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_text(url: str, screenshot: Path, profile: Path, expected: list[str]) -> str:
    """The rendered page's visible text (the UI is a JavaScript app); a screenshot of it is kept.

    The page is loaded again with more (virtual) time if some expected text is not there yet.
    """
    text = ""
    for budget_ms in (15_000, 30_000, 60_000):
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={profile}", "--window-size=1440,1000", f"--virtual-time-budget={budget_ms}",
             f"--screenshot={screenshot}", "--dump-dom", url],
            capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        dom = re.sub(r"<(script|style)\b.*?</\1>", " ", done.stdout, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
        if all(item in text for item in expected):
            break
    return text


@needs(CHROMIUM is not None, "Debian's chromium", "apt-get install -y chromium (scripts/install.sh does it as root)")
def test_ui_shows_the_finished_run_and_its_leaderboard(ops_server, deployed_runs, tmp_path):
    with ops_server.client() as client:
        flow_run = client.read_flow_run(deployed_runs.runs["ftflow-pipeline/nightly"])
        (leaderboard,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]), key=ArtifactFilterKey(any_=["leaderboard"])))
    rows = json.loads(leaderboard.data) if isinstance(leaderboard.data, str) else leaderboard.data
    models = [row["name"] for row in rows]

    # The run's page, on its Artifacts tab: the run, its final state, the leaderboard artifact.
    run_page = tmp_path / "flow-run.png"
    expected = [flow_run.name, "Completed", "leaderboard", leaderboard.description]
    text = page_text(f"{ops_server.url}/v2/runs/flow-run/{flow_run.id}?tab=Artifacts", run_page,
                     tmp_path / "profile", expected)
    missing = [item for item in expected if item not in text]
    assert not missing, f"not shown on the flow run page: {missing}\npage text: {text[:3000]}"

    # The artifact's page renders the table: every model of the leaderboard, and the run it belongs to.
    table_page = tmp_path / "leaderboard.png"
    expected = [*models, flow_run.name]
    text = page_text(f"{ops_server.url}/v2/artifacts/artifact/{leaderboard.id}", table_page, tmp_path / "profile",
                     expected)
    missing = [item for item in expected if item not in text]
    assert not missing, f"not shown on the leaderboard page: {missing}\npage text: {text[:3000]}"

    for png in (run_page, table_page):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png
