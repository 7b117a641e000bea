"""Micro pipeline configs for flow tests (seconds per stage on a 2-core CPU), and running them."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.pipeline import pipeline
from ftflow.data.synthetic import generate_sentences

# Widths as real models have them (multiples of 64): 4-bit kernels on some CPUs need it.
SIZE = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}
BIGGER = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 256}


def write_data(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Train/test sentence files (plain text) for the micro pipeline."""
    sentences = generate_sentences(90, seed, "reviews")
    train, test = directory / "train.txt", directory / "test.txt"
    train.write_text("\n".join(sentences[:60]) + "\n", encoding="utf-8")
    test.write_text("\n".join(sentences[60:]) + "\n", encoding="utf-8")
    return train, test


def micro_config(directory: Path) -> Path:
    """Write data files and a micro config into ``directory``; return the config path."""
    write_data(directory)
    config = {
        "name": "micro",
        "artifacts_dir": "artifacts",
        "device": "cpu",
        "max_length": 32,
        "data": {"train_file": "train.txt", "test_file": "test.txt", "validation_fraction": 0.2},
        "augment": {"factor": 1.2},
        "zoo": {
            "vocab_size": 300,
            "corpus_sentences": 200,
            "pretrain_steps": 5,
            "batch_size": 8,
            "max_length": 32,
            "families": [
                {"name": "granite", "architecture": "granite", "student": SIZE, "teacher": BIGGER},
                {"name": "qwen2", "architecture": "qwen2", "student": SIZE, "teacher": BIGGER},
            ],
        },
        "benchmark": {"batch_size": 16},
        "lora": {"r": [2, 4], "epochs": 1, "batch_size": 16, "learning_rate": 0.001},
        "qlora": {"enabled": True, "compute_dtype": "fp32"},
        "prefix": {"num_virtual_tokens": 2, "epochs": 1, "batch_size": 16, "learning_rate": 0.01},
        # Tiny models: whether the teacher beats the student is chance; the flow tests need distillation to run.
        "distill": {"epochs": 1, "batch_size": 16, "top_k": [2, 4], "require_better_teacher": False},
        "finetune": {"epochs": 1, "batch_size": 16},
    }
    path = directory / "micro.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


STAGES = {"prepare_data", "augment", "zoo", "plan_memory", "benchmark", "select_family", "train", "teacher_logits",
          "evaluate"}


def run_pipeline(config: Path, overrides: dict | None = None):
    """Run the pipeline to completion; return (flow run id, {stage: [task run state names]})."""
    flow_run_id, runs = run_pipeline_runs(config, overrides)
    states: dict[str, list[str]] = {}
    for name, (stage, state) in runs.items():
        if stage in STAGES:
            states.setdefault(stage, []).append(state)
    return flow_run_id, states


def run_pipeline_runs(config: Path, overrides: dict | None = None):
    """Run the pipeline to completion; return (flow run id, {task run name: (stage, state name)})."""
    state = pipeline(config_path=str(config), overrides=overrides, progress=False, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    # Task run states reach the server as events, a moment after the flow returns:
    # wait until the last task (publish) and every other run show a final state.
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        stages = {run.task_key.rsplit("-", 1)[0].split(".")[-1] for run in runs}
        settled = "publish" in stages and all(run.state is not None and run.state.is_final() for run in runs)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return flow_run_id, {run.name: (run.task_key.rsplit("-", 1)[0].split(".")[-1], run.state.name) for run in runs}
