"""Damaged outputs are not trusted: a rerun recomputes exactly the damaged stage runs, says why, and cleans up."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from flows.pipeline import pipeline
from ftflow.artifacts import check_outputs, read_json, resolved_paths
from tests.flows.micro import STAGES, micro_config, run_pipeline_runs

# The micro pipeline with one run per method kept (LoRA, full fine-tuning, distillation): a short cold run.
FEWER_RUNS = {"lora": {"r": [2]}, "qlora": {"enabled": False}, "prefix": {"enabled": False}, "distill": {"top_k": [2]}}


@pytest.fixture(scope="module")
def cold(tmp_path_factory, prefect_server) -> Path:
    """A micro config with fewer runs whose first run computed every stage."""
    path = micro_config(tmp_path_factory.mktemp("integrity"))
    config = yaml.safe_load(path.read_text())
    for section, values in FEWER_RUNS.items():
        config[section].update(values)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    _, runs = run_pipeline_runs(path)
    assert all(state == "Completed" for stage, state in runs.values() if stage in STAGES), runs
    return path


def manifests(artifacts: Path, stage: str) -> list[dict]:
    """Each finished manifest of ``stage``, its paths (stored relative) resolved as a run reads them."""
    return [resolved_paths(read_json(d / "manifest.json"), artifacts.resolve())
            for d in sorted((artifacts / stage).iterdir()) if not d.name.startswith(".")]


def logs(flow_run_id, pattern: str, expected: int) -> list[str]:
    """The flow run's log messages matching ``pattern``, once ``expected`` of them reached the server."""
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            found = [log.message for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
                if re.search(pattern, log.message)]
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_damaged_outputs_are_recomputed_alone_and_dead_temporaries_removed(cold):
    artifacts = cold.parent / "artifacts"
    runs = {m["method"]: m for m in manifests(artifacts, "train")}
    assert set(runs) == {"lora", "full", "distill"}, set(runs)
    # 1. A truncated manifest (the distillation run's).
    distilled = Path(runs["distill"]["dir"])
    (distilled / "manifest.json").write_bytes((distilled / "manifest.json").read_bytes()[:200])
    # 2. A truncated weights file (the LoRA adapter's).
    lora = Path(runs["lora"]["dir"])
    (weights,) = (lora / "model").glob("*.safetensors")
    written = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: written // 2])
    # 3. A listed file gone (one model's per-sentence scores).
    scored = manifests(artifacts, "benchmark")[0]
    (Path(scored["dir"]) / scored["files"]["per_sentence"]).unlink()
    # What killed runs leave: a temporary directory of a key being computed again, and of a key no run has now.
    dead = [artifacts / "train" / f".{lora.name}.{uuid.uuid4().hex}.partial",
            artifacts / "train" / f".{'0' * 20}.{uuid.uuid4().hex}.partial"]
    for path in dead:
        path.mkdir()
        (path / "half.bin").write_bytes(b"x")

    flow_run_id, rerun = run_pipeline_runs(cold)
    redone = {name: state for name, (stage, state) in rerun.items() if stage in STAGES and state != "Cached"}
    # Exactly the damaged runs: each is computed again under the same key, so nothing downstream changes.
    assert redone == {runs["distill"]["title"]: "Completed", runs["lora"]["title"]: "Completed",
                      f"benchmark[{scored['name']}|{scored['precision']}]": "Completed"}
    warnings = logs(flow_run_id, "failed verification", 3)
    assert sorted(warnings) == sorted([
        f"benchmark: the outputs for key {scored['key']} failed verification: "
        f"{Path(scored['dir']) / 'per_sentence.json'} (listed as 'per_sentence') is missing; they were moved to "
        f"{only_kept(artifacts / 'benchmark', scored['key'])} (kept, delete them once inspected) and the stage is "
        "computed again",
        f"train: the outputs for key {lora.name} failed verification: {weights} has {written // 2} bytes, "
        f"{written} were written; they were "
        f"moved to {only_kept(artifacts / 'train', lora.name)} (kept, delete them once inspected) and the stage is "
        "computed again",
        f"train: the outputs for key {distilled.name} failed verification: {distilled / 'manifest.json'} is not "
        f"valid JSON (200 bytes: {json_error(only_kept(artifacts / 'train', distilled.name))}); they were moved to "
        f"{only_kept(artifacts / 'train', distilled.name)} (kept, delete them once inspected) and the stage is "
        "computed again",
    ])
    # The new outputs are whole; the damaged ones are kept beside them; the dead temporaries are gone.
    for directory in (distilled, lora, Path(scored["dir"])):
        assert check_outputs(directory)[1] is None
    assert not any(path.exists() for path in dead)
    # A second rerun trusts the repaired outputs.
    _, again = run_pipeline_runs(cold)
    assert {state for stage, state in again.values() if stage in STAGES} == {"Cached"}


def only_kept(stage_dir: Path, key: str) -> Path:
    (kept,) = stage_dir.glob(f".{key}.corrupt-*")
    return kept


def json_error(kept: Path) -> str:
    import json

    try:
        json.loads((kept / "manifest.json").read_bytes())
    except json.JSONDecodeError as exc:
        return str(exc)
    raise AssertionError("the kept manifest parses")


def test_a_failed_stage_leaves_no_exception_record_in_the_artifacts_root(cold, monkeypatch):
    artifacts = cold.parent / "artifacts"
    monkeypatch.setenv("FTFLOW_FAIL_STAGE", "distill")
    state = pipeline(config_path=str(cold), overrides={"distill": {"temperature": 2.0}}, progress=False,
                     return_state=True)
    assert state.is_failed() and "1 of 1 training run(s) failed" in state.message
    # Prefect would persist the exception as a uuid-named file here; the failed state and the log carry it.
    assert [p.name for p in artifacts.iterdir() if re.fullmatch(r"[0-9a-f]{32}", p.name)] == []
    # Nothing else: no exception record, and no copy of WordNet (read where it is installed).
    assert sorted(p.name for p in artifacts.iterdir()) == sorted(STAGES | {".locks"})
