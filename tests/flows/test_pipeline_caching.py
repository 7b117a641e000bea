"""The whole pipeline through the real Prefect engine, on micro settings: what reruns and what is Cached."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL

from flows.pipeline import pipeline
from tests.flows.micro import STAGES, micro_config, run_pipeline, run_pipeline_runs

ROOT = Path(__file__).resolve().parents[2]


def stage_states(config: Path, overrides: dict | None = None) -> dict[str, list[str]]:
    """Run the pipeline; return {stage: [state names of its task runs]} for every stage."""
    _, states = run_pipeline(config, overrides)
    assert set(states) == STAGES, f"missing stages: {STAGES - set(states)}"
    return states


def recomputed(states: dict[str, list[str]]) -> set[str]:
    """Stages with at least one run that was not Cached."""
    return {stage for stage, names in states.items() if any(name != "Cached" for name in names)}


@pytest.fixture(scope="module")
def micro(tmp_path_factory, prefect_server) -> Path:
    """A micro config whose first, cold run computed every stage."""
    config = micro_config(tmp_path_factory.mktemp("micro"))
    states = stage_states(config)
    assert recomputed(states) == STAGES
    # Two distillation variants (top-k 2 and 4), one teacher pass stored at k=4.
    assert states["teacher_logits"] == ["Completed"]
    return config


def test_rerun_with_nothing_changed_is_all_cached(micro):
    assert recomputed(stage_states(micro)) == set()


def test_distillation_parameter_reruns_only_distill_runs_and_evaluate(micro):
    _, runs = run_pipeline_runs(micro, {"distill": {"alpha": 0.25}})
    redone = {name for name, (stage, state) in runs.items() if stage in STAGES and state != "Cached"}
    assert redone and all(name.startswith("distill[") or name.startswith("evaluate") for name in redone), redone
    assert {name for name in redone if name.startswith("distill[")} == {
        "distill[qwen2-student|top2,T1,a0.25,lr5e-05]", "distill[qwen2-student|top4,T1,a0.25,lr5e-05]"}


def test_adding_one_grid_value_trains_only_the_new_combinations(micro):
    _, runs = run_pipeline_runs(micro, {"lora": {"r": [2, 4, 8]}})
    grid = {name: state for name, (_, state) in runs.items() if name.startswith("lora[qwen2-teacher|")}
    # Each combination is its own cached run: the old ones are reused, only the new one trains.
    assert grid == {"lora[qwen2-teacher|r2,a16,d0.05,lr0.001]": "Cached",
                    "lora[qwen2-teacher|r4,a16,d0.05,lr0.001]": "Cached",
                    "lora[qwen2-teacher|r8,a16,d0.05,lr0.001]": "Completed"}


def test_the_teacher_pass_records_its_own_batch_size_and_memory_plan(micro):
    (topk_dir,) = list((micro.parent / "artifacts" / "teacher_logits").iterdir())
    manifest = json.loads((topk_dir / "manifest.json").read_text(encoding="utf-8"))
    plan = manifest["memory_plan"]
    assert plan["case"] == "teacher-topk" and manifest["batch_size"] == plan["batch_size"] >= 1
    # The demo's budget is far above these micro models: the cap (memory.batch_size_cap) decides.
    assert manifest["memory_plan_reason"].startswith(f"batch size {manifest['batch_size']}, the largest that fits")


def test_deleted_output_directory_is_recomputed(micro):
    artifacts = micro.parent / "artifacts"
    (topk_dir,) = list((artifacts / "teacher_logits").iterdir())
    shutil.rmtree(topk_dir)
    # Only the deleted stage recomputes: its content key, and so what depends on it, is unchanged.
    assert recomputed(stage_states(micro)) == {"teacher_logits"}
    assert (topk_dir / "manifest.json").is_file()


def test_train_file_content_change_reruns_everything_downstream_of_data(micro):
    train = micro.parent / "train.txt"
    original = train.read_text(encoding="utf-8")
    try:
        train.write_text(original.replace("\n", " indeed\n", 1), encoding="utf-8")
        # The zoo too: it pretrains on the training split (zoo.task_text) and checks on validation.
        assert recomputed(stage_states(micro)) == STAGES
    finally:
        train.write_text(original, encoding="utf-8")
    # Back to the original content: everything is Cached again.
    assert recomputed(stage_states(micro)) == set()


def test_test_file_content_change_reruns_all_but_the_zoo(micro):
    test = micro.parent / "test.txt"
    original = test.read_text(encoding="utf-8")
    try:
        test.write_text(original.replace("\n", " indeed\n", 1), encoding="utf-8")
        # The zoo reads the training and validation splits by content, not the test split.
        assert recomputed(stage_states(micro)) == STAGES - {"zoo"}
    finally:
        test.write_text(original, encoding="utf-8")
    assert recomputed(stage_states(micro)) == set()


def fail_distillation(micro, changed: dict, monkeypatch):
    """Run with a fault in every distillation run; return the failed flow run's id."""
    monkeypatch.setenv("FTFLOW_FAIL_STAGE", "distill")
    state = pipeline(config_path=str(micro), overrides=changed, progress=False, return_state=True)
    monkeypatch.delenv("FTFLOW_FAIL_STAGE")
    assert state.is_failed()
    assert "2 of 2 training run(s) failed" in state.message and "FTFLOW_FAIL_STAGE=distill" in state.message
    return state.state_details.flow_run_id


def resumed_at_distillation(runs: dict) -> bool:
    redone = {name for name, (stage, state) in runs.items() if stage in STAGES and state != "Cached"}
    return {name.split("[")[0].split("-")[0] for name in redone} == {"distill", "evaluate"}


def test_failed_stage_fails_the_run_clearly_and_a_rerun_resumes_there(micro, monkeypatch):
    changed = {"distill": {"temperature": 2.0}}  # new distillation runs, everything upstream unchanged
    fail_distillation(micro, changed, monkeypatch)
    _, runs = run_pipeline_runs(micro, changed)
    assert resumed_at_distillation(runs), runs


def test_prefect_flow_run_retry_resumes_a_failed_run(micro, monkeypatch):
    failed = fail_distillation(micro, {"distill": {"temperature": 3.0}}, monkeypatch)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", str(failed),
                    "--entrypoint", "flows/pipeline.py:pipeline"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(failed).state.is_completed()
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[failed])))
    # The retry's task runs join the same flow run: the distillation runs completed, upstream Cached.
    latest: dict[str, tuple[str, str]] = {}
    for run in sorted(runs, key=lambda r: r.expected_start_time or r.created):
        latest[run.name] = (run.task_key.rsplit("-", 1)[0].split(".")[-1], run.state.name)
    assert all(state in ("Completed", "Cached") for _, state in latest.values())
    assert any(name.startswith("distill[") and state == "Completed" for name, (_, state) in latest.items())
    assert all(state == "Cached" for stage, state in latest.values() if stage in ("zoo", "benchmark"))


def test_augmentation_ablation_adds_only_its_own_runs_and_measures_each_set(micro):
    _, runs = run_pipeline_runs(micro, {"ablation": {"enabled": True}})
    redone = {name for name, (stage, state) in runs.items() if stage in STAGES and state != "Cached"}
    # New: one augmented set per method, one run per new training set, the report. The run on the
    # configured mix is the main run, already there.
    assert all(n.startswith("augment[") or ",data=" in n or n.startswith("evaluate") for n in redone), redone
    assert sum(",data=" in n for n in redone) == 6  # original + 5 methods alone
    (evaluation,) = [d for d in (micro.parent / "artifacts" / "evaluate").iterdir()
                     if (d / "augmentation.csv").is_file()]
    with open(evaluation / "augmentation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["train_set"] for r in rows][:2] == ["original", "all methods (configured mix)"]
    assert len(rows) == 7 and float(rows[0]["delta_ppl"]) == 0.0
    assert all(float(r["ppl"]) - float(rows[0]["ppl"]) == pytest.approx(float(r["delta_ppl"])) for r in rows)
    assert "Data augmentation: the same run on each training set" in (evaluation / "report.md").read_text()


def test_choices_use_validation_unless_the_study_protocol_is_asked_for(micro):
    def leaderboard(overrides=None):
        state = pipeline(config_path=str(micro), overrides=overrides, progress=False, return_state=True)
        evaluation = state.result()
        return evaluation, [r for r in evaluation["leaderboard"] if r["kind"] != "baseline"]

    evaluation, trained = leaderboard()
    # Best epochs are chosen on validation: the selection PPL is a different split's number than test.
    assert all(r["selection_ppl"] != r["test_ppl"] for r in trained)
    report = (Path(evaluation["dir"]) / "report.md").read_text()
    assert "STUDY PROTOCOL" not in report
    # The zoo checked each family's teacher against its student on the selection split; the report says so.
    assert all(f"- zoo check, family {family}: teacher validation PPL " in report for family in ("granite", "qwen2"))

    evaluation, trained = leaderboard({"selection_split": "test"})
    assert all(r["selection_ppl"] == pytest.approx(r["test_ppl"], rel=1e-9) for r in trained)
    report = (Path(evaluation["dir"]) / "report.md").read_text()
    assert "STUDY PROTOCOL: the family, best epochs and best combinations were chosen on the TEST split" in report
    assert all(f"- zoo check, family {family}: teacher test PPL " in report for family in ("granite", "qwen2"))


def test_one_augmentation_rate_reruns_augmentation_and_what_trains_on_it_only(micro):
    states = stage_states(micro, {"augment": {"random_swap": {"rate": 0.3}}})
    assert recomputed(states) == {"augment", "train", "teacher_logits", "evaluate"}
