"""What ``ftflow plan`` computes before it prints: each candidate's memory plan (hub check offline), then the study."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftflow.config import load_config
from ftflow.models.architecture import fetched_configs_dir
from ftflow.plan.candidates import plan_candidates, plan_training, planned_bf16
from ftflow.plan.predict import GB
from ftflow.plan.study import plan_study

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def seed(tmp_path, monkeypatch):
    """configs/seed-20gb.yaml with its outputs in tmp_path, an empty Hugging Face cache, no answers remembered."""
    from huggingface_hub import constants

    from ftflow.models import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "_MEMO", {})
    return load_config(ROOT / "configs" / "seed-20gb.yaml", {"artifacts_dir": str(tmp_path / "artifacts")})


def test_each_candidate_is_planned_offline_for_the_device_budget_and_length_asked(seed):
    planned = plan_candidates(seed, max_length=128)
    # The config's device (auto) is planned as the GPU it is for, its budget and its models in its order.
    assert (planned.device, planned.budget_bytes, planned.max_length) == ("cuda", 20 * GB, 128)
    assert [p.name for p in planned.plans] == [spec.name for spec in seed.models]
    chosen = {p.name: p.precision for p in planned.plans}
    assert chosen["granite-3.3-8b-base"] == "bf16" and chosen["Qwen2.5-7B"] == "bf16"
    assert chosen["granite-3.3-2b-base"] == "fp32" and chosen["TinyLlama-1.1B-Chat-v1.0"] == "fp32"
    # Offline, none of them in the cache: nothing is refused (planning needs no download).
    assert planned.problems == [] and planned.refused == {}
    assert planned.config_dir == fetched_configs_dir(seed.artifacts_dir)
    # What the command line gives replaces the config's: a CPU, a smaller budget, a fixed batch size.
    cpu = plan_candidates(seed, device="cpu", budget_gb=8, max_length=64, batch_size=2)
    assert (cpu.device, cpu.budget_bytes, cpu.max_length) == ("cpu", 8 * GB, 64)
    assert all(p.batch_size == 2 and p.budget_bytes == 8 * GB and p.peak_bytes <= 8 * GB for p in cpu.plans)
    cpu_chosen = {p.name: p.precision for p in cpu.plans}
    assert cpu_chosen["granite-3.3-8b-base"] == "nf4" and cpu_chosen["TinyLlama-1.1B-Chat-v1.0"] == "fp32"


def test_a_model_ftflow_cannot_find_is_one_problem_line_and_the_others_are_planned(seed):
    from ftflow.config import ModelSpec

    unknown = ModelSpec(name="mystery", path="org/mystery-7b", family="granite")
    cfg = seed.model_copy(update={"models": [seed.models[0], unknown]})
    planned = plan_candidates(cfg, max_length=128)
    assert [p.name for p in planned.plans] == [seed.models[0].name]
    assert len(planned.problems) == 1 and planned.problems[0].startswith("mystery: ")


def test_the_training_plan_is_the_studys_without_the_models_the_hub_refuses(seed):
    planned = plan_candidates(seed, max_length=128)
    assert planned_bf16("cuda") and planned_bf16("cpu")  # a GPU plan is for a card that computes in bf16
    planned.refused = {"Qwen2.5-7B": "Qwen/Qwen2.5-7B is gated and no Hugging Face token is set"}
    study = plan_training(seed, planned)
    assert "Qwen2.5-7B" not in {m["name"] for m in study.models}
    assert ("Qwen2.5-7B is left out (so not trained): Qwen/Qwen2.5-7B is gated and no Hugging Face token is set"
            in study.notes)
    expected = plan_study(seed, device="cuda", bf16_supported=True, left_out=planned.refused,
                          config_dir=planned.config_dir)
    assert [r.title for r in study.runs] == [r.title for r in expected.runs] and study.runs
    assert [r.fit for r in study.runs] == [r.fit for r in expected.runs]
