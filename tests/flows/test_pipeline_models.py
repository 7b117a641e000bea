"""A config that names models (as a hub config does) instead of a zoo, with one that cannot load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from ftflow.config import ZooConfig
from ftflow.zoo import build_zoo
from tests.flows.micro import BIGGER, SIZE, run_pipeline, write_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models_config(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    write_data(directory)
    zoo = ZooConfig(vocab_size=300, corpus_sentences=200, pretrain_steps=3, batch_size=8, max_length=32,
                    families=[{"name": "granite", "architecture": "granite", "student": SIZE, "teacher": BIGGER}])
    built = build_zoo(zoo, [s for s in (directory / "train.txt").read_text().splitlines()] * 4,
                      directory / "checkpoints", progress=False, log=lambda *a: None)
    members = {m["role"]: m["path"] for m in built["families"][0]["members"]}
    config = {
        "name": "models micro",
        "device": "cpu",
        "max_length": 32,
        "data": {"train_file": "train.txt", "test_file": "test.txt", "validation_fraction": 0.2},
        "augment": {"enabled": False},
        "models": [
            {"name": "small", "path": str(members["student"]), "family": "granite"},
            {"name": "large", "path": str(members["teacher"]), "family": "granite"},
            {"name": "ghost", "path": str(directory / "no-such-model"), "family": "ghosts"},
        ],
        "teacher": {"epochs": 1, "batch_size": 16},
        "distill": {"epochs": 1, "batch_size": 16, "top_k": 3},
        "finetune": {"epochs": 1, "batch_size": 16},
    }
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_failed_model_is_recorded_and_the_others_go_on(models_config, prefect_server):
    flow_run_id, states = run_pipeline(models_config)
    assert "zoo" not in states  # models by path or hub id: nothing to build
    assert sorted(states["benchmark"]) == ["Completed", "Completed", "Failed"]
    assert states["evaluate"] == ["Completed"]

    (evaluate_dir,) = list((models_config.parent / "artifacts" / "evaluate").iterdir())
    report = (evaluate_dir / "report.md").read_text()
    assert "ghost failed and was left out" in report and "no-such-model" in report
    assert "teacher **large**, student **small**" in report
    board = (evaluate_dir / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 1 + 6  # header, 3 baselines (one failed), LoRA teacher, distilled, fine-tuned
    assert board[-1].split(",")[1] == "ghost"  # failures rank last
    assert (evaluate_dir / "leaderboard.png").stat().st_size > 0

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in artifacts}
    assert by_key["leaderboard"].type == "table"
    assert "ghost" in str(by_key["leaderboard"].data)
    assert by_key["report"].type == "markdown"
