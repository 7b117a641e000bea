"""prefect.yaml on a real server: every deployment created on the process pool; the nightly and benchmark-only
deployments run on a micro config by a process worker; final states, task runs and artifacts read back through
the Prefect client."""

from __future__ import annotations

import json
from pathlib import Path

from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from ftflow.artifacts import read_json
from tests.flows.micro import STAGES
from tests.ops.conftest import POOL, tail, wait_for_task_runs

DEPLOYMENTS = {"ftflow-pipeline/demo", "ftflow-pipeline/nightly", "ftflow-benchmark/benchmark-only",
               "ftflow-pipeline/grid-search"}


def stage_of(task_run) -> str:
    return task_run.task_key.rsplit("-", 1)[0].split(".")[-1]


def read_run(ops_server, flow_run_id):
    """A finished flow run, its deployment, its task runs (final states) and its artifacts by key."""
    with ops_server.client() as client:
        flow_run = client.read_flow_run(flow_run_id)
        deployment = client.read_deployment(flow_run.deployment_id)
        task_runs = wait_for_task_runs(client, flow_run.id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    return flow_run, deployment, task_runs, {artifact.key: artifact for artifact in artifacts}


def table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_prefect_yaml_deploys_every_deployment_on_the_process_pool(ops_server, deployed_runs):
    with ops_server.client() as client:
        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        pool = client.read_work_pool(POOL)
    assert pool.type == "process"
    assert DEPLOYMENTS <= set(deployments), deployed_runs.deploy_output[-3000:]
    for name in DEPLOYMENTS:
        assert deployments[name].work_pool_name == POOL, name
        assert "config_path" in deployments[name].parameters, name
        assert deployments[name].job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "ftflow", name
    assert deployments["ftflow-pipeline/grid-search"].parameters["config_path"] == "configs/demo-full.yaml"
    (nightly,) = deployments["ftflow-pipeline/nightly"].schedules
    assert nightly.schedule.cron == "0 2 * * *" and nightly.active


def test_nightly_run_of_a_micro_config_completes_with_every_stage_and_its_artifacts(ops_server, deployed_runs):
    flow_run, deployment, task_runs, artifacts = read_run(ops_server, deployed_runs.runs["ftflow-pipeline/nightly"])
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{tail(deployed_runs.worker_log)}"
    assert deployment.name == "nightly"
    assert flow_run.parameters["config_path"] == str(deployed_runs.config)

    # Every stage ran in this flow run (computed, or Cached where a run beside it computed it first);
    # mapped runs are named after what they do.
    states: dict[str, list[str]] = {}
    for run in task_runs:
        states.setdefault(stage_of(run), []).append(run.state.name)
    assert STAGES | {"publish"} <= set(states), sorted(states)
    assert {name for names in states.values() for name in names} <= {"Completed", "Cached"}, states
    benchmark_names = sorted(run.name for run in task_runs if stage_of(run) == "benchmark")
    assert benchmark_names and all(name.startswith("benchmark[") and "|" in name for name in benchmark_names)

    # The leaderboard artifact is the evaluation's leaderboard, as written on disk; so is the report.
    assert {"leaderboard", "memory-plan", "benchmark", "report"} <= set(artifacts), sorted(artifacts)
    assert artifacts["leaderboard"].type == "table" and artifacts["report"].type == "markdown"
    (evaluation_dir,) = [p for p in (deployed_runs.artifacts / "evaluate").iterdir() if not p.name.startswith(".")]
    evaluation = read_json(evaluation_dir / "manifest.json")
    assert [row["name"] for row in table(artifacts["leaderboard"])] == [row["name"] for row in evaluation["leaderboard"]]
    assert Path(evaluation_dir / evaluation["files"]["report"]).read_text(encoding="utf-8") == artifacts["report"].data


def test_benchmark_only_run_publishes_every_candidate(ops_server, deployed_runs):
    flow_run, deployment, task_runs, artifacts = read_run(ops_server,
                                                          deployed_runs.runs["ftflow-benchmark/benchmark-only"])
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{tail(deployed_runs.worker_log)}"
    assert deployment.name == "benchmark-only"
    assert {stage_of(run) for run in task_runs} == {"prepare_data", "zoo", "plan_memory", "benchmark",
                                                   "publish_benchmark"}
    assert {"benchmark", "memory-plan"} <= set(artifacts) and artifacts["benchmark"].type == "table"
    rows = table(artifacts["benchmark"])
    candidates = {run.name.split("[", 1)[1].split("|")[0] for run in task_runs if run.name.startswith("benchmark[")}
    assert {row["model"] for row in rows} == candidates and all(row["error"] is None for row in rows)
    assert [row["validation_bits_per_byte"] for row in rows] == sorted(row["validation_bits_per_byte"] for row in rows)
