"""Which training runs the pipeline plans per compared model (no Prefect run needed)."""

from __future__ import annotations

from ftflow.config import parse_config
from ftflow.study.design import per_model_jobs
from ftflow.train.runner import lora_grid

MODELS = [{"name": n, "path": f"/m/{n}", "family": "f", "precision": "fp32", "trust_remote_code": False}
          for n in ("big", "small", "other")]
BENCHMARKS = [{"name": m["name"], "model": m, "parameters": p} for m, p in zip(MODELS, (8_000, 2_000, 1_000))]
SELECTION = {"teacher": "big", "student": "small", "teacher_model": MODELS[0], "student_model": MODELS[1]}


def plan(tmp_path, **sections) -> list[str]:
    cfg = parse_config({"data": {"synthetic": {}}, "models": [{"name": "x", "path": "/x", "family": "f"}],
                        **sections}, tmp_path)
    best = lora_grid(cfg.lora, MODELS[0])[0]
    return [job.title for job in per_model_jobs(cfg, BENCHMARKS, SELECTION, best)]


def test_family_models_get_lora_qlora_and_full_fine_tuning_up_to_the_size_limit(tmp_path):
    titles = plan(tmp_path, finetune={"max_params": 5_000}, prefix={"num_virtual_tokens": [2, 4]})
    assert titles == [
        "qlora[big|r8,a16,d0.05,nf4,lr0.0002]",  # the teacher's LoRA run is the grid's best, not repeated
        "lora[small|r8,a16,d0.05,lr0.0002]", "qlora[small|r8,a16,d0.05,nf4,lr0.0002]", "full[small|lr5e-05]",
        "prefix[big|p2,lr0.0001]", "prefix[big|p4,lr0.0001]",
    ]  # big (8,000 parameters) is over finetune.max_params: not fine-tuned in full


def test_compare_all_and_methods_switched_off(tmp_path):
    titles = plan(tmp_path, compare={"models": "all"}, qlora={"enabled": False}, prefix={"enabled": False})
    assert titles == ["full[big|lr5e-05]", "lora[small|r8,a16,d0.05,lr0.0002]", "full[small|lr5e-05]",
                      "lora[other|r8,a16,d0.05,lr0.0002]", "full[other|lr5e-05]"]
