"""Runs of one config at once (two pipelines and a benchmark-only run, started together by one worker):
each stage computed once, by one of them; the lock a killed process left in their way did not block them."""

from __future__ import annotations

from pathlib import Path

from ftflow.artifacts import read_manifest
from tests.flows.micro import STAGES
from tests.ops.conftest import wait_for_task_runs


def outputs(artifacts: Path, stage: str) -> list[Path]:
    """The finished output directories of a stage (hidden names are work and temporary directories)."""
    return sorted(p for p in (artifacts / stage).iterdir() if not p.name.startswith("."))


def test_runs_at_once_compute_each_stage_once(ops_server, deployed_runs):
    states: dict[str, list[str]] = {}
    with ops_server.client() as client:
        for name, run_id in deployed_runs.runs.items():
            assert client.read_flow_run(run_id).state.is_completed(), name
            for run in wait_for_task_runs(client, run_id):
                stage = run.task_key.rsplit("-", 1)[0].split(".")[-1]
                if stage in STAGES:
                    states.setdefault(stage, []).append(run.state.name)
    assert set(states) == STAGES
    for stage, names in states.items():
        finished = outputs(deployed_runs.artifacts, stage)
        assert finished and all(read_manifest(d) is not None for d in finished), stage
        # Each output directory was computed by exactly one task run; the others with its key were Cached.
        assert names.count("Completed") == len(finished), (stage, sorted(names))
        assert sorted(set(names)) <= ["Cached", "Completed"], (stage, sorted(names))
        assert not [p for p in (deployed_runs.artifacts / stage).iterdir() if p.name.endswith(".partial")], stage
    # Both pipelines evaluated, into one directory: they reported the same evaluation, neither replaced it.
    assert len(outputs(deployed_runs.artifacts, "evaluate")) == 1 and len(states["evaluate"]) == 2


def test_a_killed_processs_stage_lock_did_not_block_the_runs(deployed_runs):
    # The runs waited while its holder lived (and renewed it), and went on once it was killed.
    assert deployed_runs.blocked_while_held
    assert not deployed_runs.lock_file.exists()
    assert not list((deployed_runs.artifacts / ".locks").rglob("*.lock")), "a lock outlived its run"
