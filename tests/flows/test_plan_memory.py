"""The memory plan stage in a flow: a candidate whose tokenizer cannot be read is not planned (so no minimum over
candidates counts it), and on CUDA the budget planned against is the measured one, recorded in the manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from prefect import flow

from flows.steps import data_candidates_and_plan
from ftflow.config import load_config
from ftflow.models.architecture import model_config_for
from ftflow.plan.predict import GB, RUNTIME_OVERHEAD_BYTES, predict_scoring
from ftflow.study import design
from tests.tiny import SENTENCES, saved_base


@flow(name="plan-only")
def plan_only(config_path: str, device: str) -> dict:
    cfg = load_config(config_path)
    return data_candidates_and_plan(cfg, device, str(cfg.artifacts_dir), progress=False)[2]


def write_config(directory: Path, budget_gb: float) -> Path:
    (directory / "train.txt").write_text("\n".join(SENTENCES * 4) + "\n")
    (directory / "test.txt").write_text("\n".join(SENTENCES) + "\n")
    raw = {"device": "cpu", "max_length": 2048, "memory_budget_gb": budget_gb,
           "artifacts_dir": str(directory / "artifacts"),
           "data": {"train_file": "train.txt", "test_file": "test.txt", "validation_fraction": 0.25},
           "augment": {"enabled": False}, "ablation": {"enabled": False},
           "models": [{"name": "readable", "path": str(directory / "readable"), "family": "tiny", "precision": "fp32"},
                      {"name": "unreadable", "path": str(directory / "unreadable"), "family": "tiny",
                       "precision": "fp32"}]}
    path = directory / f"plan-{budget_gb}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny model with its tokenizer, and a copy of its config alone (a checkpoint whose tokenizer is missing)."""
    directory = tmp_path_factory.mktemp("plan-memory")
    saved_base(directory / "readable")
    (directory / "unreadable").mkdir()
    shutil.copy(directory / "readable" / "config.json", directory / "unreadable" / "config.json")
    return directory


def test_an_unreadable_candidate_is_not_planned_and_never_lowers_the_evaluation_batch(models, prefect_server):
    config = model_config_for(str(models / "readable"))
    # A budget that fits the batch cap (256) at the data's longest sentence, but not at max_length: a candidate
    # planned at max_length (the worst case) would get a smaller batch and, as the minimum, impose it on every
    # later scoring pass.
    longest = 1 + max(len(s.split()) for s in SENTENCES)  # word-level tokenizer, BOS prepended

    def peak(batch: int, length: int) -> int:
        return predict_scoring(config, "fp32", batch, length, device="cpu").peak_bytes

    budget = max(peak(256, longest), peak(4, 2048)) + 1000
    assert peak(256, 2048) > budget  # planned at max_length, a candidate would get a batch of 4 to 255
    cfg = load_config(write_config(models, budget / GB))
    plan = plan_only(str(write_config(models, budget / GB)), "cpu")
    readable, unreadable = plan["decisions"]["readable"], plan["decisions"]["unreadable"]
    assert (readable["precision"], readable["batch_size"], readable["max_length"]) == ("fp32", 256, longest)
    assert unreadable["precision"] is None
    assert unreadable["reason"].startswith("cannot plan: its tokenizer cannot be read, so it cannot be benchmarked "
                                           "either (")
    assert design.evaluation_batch_size(cfg.model_copy(update={"benchmark": cfg.benchmark.model_copy(
        update={"batch_size": "auto"})}), plan["decisions"]) == 256
    assert plan["budget"]["budget_bytes"] == int(budget / GB * GB) and plan["budget"]["free_bytes"] is None


def test_on_cuda_the_plan_is_made_against_the_measured_free_memory(models, prefect_server, monkeypatch):
    config = model_config_for(str(models / "readable"))
    longest = 1 + max(len(s.split()) for s in SENTENCES)
    # A card with room for a batch of 100 at the data's longest sentence (20 GB would take the cap, 256).
    room = predict_scoring(config, "fp32", 100, longest).peak_bytes + 1
    free = room - RUNTIME_OVERHEAD_BYTES["cuda"] + GB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, int(20.9e9)))
    plan = plan_only(str(write_config(models, 20.0)), "cuda")
    expected = free + RUNTIME_OVERHEAD_BYTES["cuda"] - GB  # memory.cuda_margin_gb: 1 GB by default
    assert plan["budget"]["budget_bytes"] == expected and plan["budget"]["configured_bytes"] == 20 * GB
    assert plan["budget"]["line"].startswith(f"memory budget {expected / GB:.2f} GB, the measured one: configured "
                                             "20.00 GB; measured on CUDA")
    # The decisions were made against it: the batch that fits the measured budget, not the configured one.
    assert expected == room and plan["decisions"]["readable"]["batch_size"] == 100
