"""A config that names models (as a hub config does) instead of a zoo, with one that cannot load."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from ftflow.config import ZooConfig
from ftflow.models.zoo import build_zoo
from tests.fake_hub import put_in_cache
from tests.flows.micro import BIGGER, SIZE, run_pipeline, write_data


@pytest.fixture(scope="module")
def models_config(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    write_data(directory)
    zoo = ZooConfig(vocab_size=300, corpus_sentences=200, pretrain_steps=3, batch_size=8, max_length=32,
                    families=[{"name": "granite", "architecture": "granite", "student": SIZE, "teacher": BIGGER}])
    built = build_zoo(zoo, [s for s in (directory / "train.txt").read_text().splitlines()] * 4,
                      directory / "checkpoints", progress=False, log=lambda *a: None)
    members = {m["role"]: m["path"] for m in built["families"][0]["members"]}
    # A checkpoint whose config and tokenizer can be read (so it is planned) but whose weights are missing (so
    # loading fails); and one whose tokenizer is missing too (so it is not even planned).
    ghost = directory / "ghost-model"
    ghost.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(members["student"]) / name, ghost / name)
    shell = directory / "shell-model"
    shell.mkdir()
    shutil.copy(Path(members["student"]) / "config.json", shell / "config.json")
    # A hub model in the Hugging Face cache (offline, as every test is): the known 8B's id, the student's
    # tokenizer, placeholder weights. Planned from ftflow's table, it is predicted over the budget in fp32.
    put_in_cache(directory / "hf-cache", "ibm-granite/granite-3.3-8b-base", {
        **{name: (Path(members["student"]) / name).read_bytes()
           for name in ("config.json", "tokenizer.json", "tokenizer_config.json")},
        "model.safetensors": b"not loaded"})
    config = {
        "name": "models micro",
        "device": "cpu",
        "max_length": 32,
        "data": {"train_file": "train.txt", "test_file": "test.txt", "validation_fraction": 0.2},
        "augment": {"enabled": False},
        "memory_budget_gb": 20,
        "models": [
            {"name": "small", "path": str(members["student"]), "family": "granite"},
            {"name": "large", "path": str(members["teacher"]), "family": "granite"},
            {"name": "ghost", "path": str(ghost), "family": "ghosts"},
            {"name": "shell", "path": str(shell), "family": "ghosts"},
            {"name": "unknown", "path": "no-such-org/no-such-model", "family": "ghosts"},
            {"name": "huge", "path": "ibm-granite/granite-3.3-8b-base", "family": "ghosts", "precision": "fp32"},
        ],
        "lora": {"epochs": 1, "batch_size": 16},
        "qlora": {"enabled": False},
        "prefix": {"enabled": False},
        "distill": {"epochs": 1, "batch_size": 16, "top_k": 3, "require_better_teacher": False},
        "finetune": {"epochs": 1, "batch_size": 16},
    }
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_failed_model_is_recorded_and_the_others_go_on(models_config, prefect_server, monkeypatch):
    from huggingface_hub import constants

    from ftflow.models import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(models_config.parent / "hf-cache"))
    monkeypatch.setattr(hub, "_MEMO", {})
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    flow_run_id, states = run_pipeline(models_config)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # the flow asks for it at start
    assert "zoo" not in states  # models by path or hub id: nothing to build
    # unknown is not in the cache (offline), shell's tokenizer cannot be read, huge is predicted over the budget:
    # none of them is loaded.
    assert states["plan_memory"] == ["Completed"]
    assert sorted(states["benchmark"]) == ["Completed", "Completed", "Failed"]
    assert states["evaluate"] == ["Completed"]

    (evaluate_dir,) = list((models_config.parent / "artifacts" / "evaluate").iterdir())
    report = (evaluate_dir / "report.md").read_text()
    assert "ghost failed and was left out" in report and "ghost-model" in report
    assert "shell failed and was left out: cannot plan: its tokenizer cannot be read" in report
    assert ("unknown failed and was left out: no-such-org/no-such-model is not in the Hugging Face cache "
            f"({models_config.parent / 'hf-cache' / 'models--no-such-org--no-such-model'}: no config.json)") in report
    assert "huge failed and was left out: skipped: fp32 (fixed in config) needs 33." in report
    assert "teacher **large**, student **small**" in report
    with open(evaluate_dir / "leaderboard.csv", newline="") as handle:
        board = list(csv.DictReader(handle))
    # 6 baselines (four failed or skipped); LoRA on both models, both fine-tuned in full, one distilled.
    assert len(board) == 11
    assert {row["name"] for row in board[-4:]} == {"ghost", "shell", "unknown", "huge"}  # failures rank last
    assert all(row["error"] for row in board[-4:]) and not any(row["error"] for row in board[:-4])
    assert (evaluate_dir / "leaderboard.png").stat().st_size > 0

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    # Each training run kept a progress artifact up to date; it ends at 100% with the best validation PPL.
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == 5 and all(a.data == 100.0 for a in progress)
    assert all("best validation PPL" in a.description for a in progress)
    assert by_key["leaderboard"].type == "table" and by_key["benchmark"].type == "table"
    assert {"study-methods", "study-lora-grid", "study-full-distill"} <= set(by_key)
    assert "ghost" in str(by_key["leaderboard"].data)
    assert by_key["report"].type == "markdown" and by_key["answer"].type == "markdown"
    assert by_key["memory-plan"].type == "table" and "huge" in str(by_key["memory-plan"].data)
