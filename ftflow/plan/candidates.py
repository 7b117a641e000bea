"""What ``ftflow plan`` computes of a config before anything runs: each candidate model's memory plan, then the study.

The hub is asked once (:func:`ftflow.models.hub.check_candidates`): a model it refuses is left out as a run would
leave it out, and the configs of hub ids ftflow does not know are read from it; offline nothing is left out, as
planning needs no download. Each remaining model gets :func:`ftflow.plan.decide.plan_model`; the study's training
runs come from :func:`ftflow.plan.study.plan_study`. The results are plain data; the CLI prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftflow.models import architecture, hub
from ftflow.plan import decide
from ftflow.plan.predict import GB
from ftflow.plan.study import StudyPlan, plan_study


def planned_bf16(device: str) -> bool:
    """Whether runs planned for ``device`` may compute in bf16.

    A CPU plan asks this machine; a CUDA plan is for the GPU it names (often not this machine's, which may have
    none), taken as one that computes in bf16 (Ampere or later).
    """
    return decide.bf16_available(device) if device == "cpu" else True


@dataclass
class CandidatesPlan:
    """The memory plan of a config's candidate models (``ftflow plan``'s first table).

    Attributes:
        device: what is planned for (``cuda`` or ``cpu``).
        budget_bytes: the scoring budget.
        max_length: tokens per sequence planned for (the worst case unless asked otherwise).
        plans: each planned model's :class:`ftflow.plan.decide.ModelPlan`, in the config's order.
        problems: one line per model not planned (the hub refuses it, or its config cannot be found).
        report: the hub check (what each download needs: :func:`ftflow.plan.disk.study_disk`).
        refused: ``{model name: why}`` of the models the hub refuses (not trained either).
        config_dir: where configs read from the hub are (:func:`ftflow.models.architecture.fetched_configs_dir`).
    """

    device: str
    budget_bytes: int
    max_length: int
    plans: list
    problems: list[str]
    report: hub.HubReport
    refused: dict[str, str]
    config_dir: Path


def plan_candidates(cfg, *, device: Optional[str] = None, budget_gb: Optional[float] = None,
                    max_length: Optional[int] = None, batch_size: Optional[int] = None) -> CandidatesPlan:
    """Plan each of ``cfg``'s models: precision and evaluation batch size within the budget, loading nothing.

    Args:
        cfg: a :class:`ftflow.config.PipelineConfig` with a ``models`` list.
        device: ``cuda`` or ``cpu``; None: ``cuda`` when the config's device is ``auto`` or ``cuda``.
        budget_gb: the scoring budget; None: the config's ``memory_budget_gb``.
        max_length: tokens per sequence; None: the config's ``max_length``.
        batch_size: a fixed evaluation batch size; None: the largest that fits.
    """
    device = device or ("cuda" if cfg.device in ("auto", "cuda") else "cpu")
    budget = int((budget_gb or cfg.memory_budget_gb) * GB)
    max_length = max_length or cfg.max_length
    report, problems = hub.check_candidates(cfg.models)
    refused = {spec.name: problems[spec.name] for spec in cfg.models
               if spec.name in problems and report.checks[spec.path].refused}
    config_dir = architecture.fetched_configs_dir(cfg.artifacts_dir)
    fetch_problems = hub.fetch_configs(report, config_dir)
    plans, lines = [], [f"{name}: {problem}" for name, problem in refused.items()]
    for spec in cfg.models:
        if spec.name in refused:
            continue
        try:
            plans.append(decide.plan_model(
                spec.name, spec.path, budget, max_length=max_length, batch_size=batch_size, device=device,
                bf16_supported=planned_bf16(device), logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens,
                trust_remote_code=spec.trust_remote_code, config_dir=config_dir,
            ))
        except architecture.UnknownModelError as exc:
            lines.append(f"{spec.name}: {exc}" + (f" ({fetch_problems[spec.path]})"
                                                  if spec.path in fetch_problems else ""))
    return CandidatesPlan(device, budget, max_length, plans, lines, report, refused, config_dir)


def plan_training(cfg, candidates: CandidatesPlan, family: Optional[str] = None) -> StudyPlan:
    """Every training run ``cfg`` implies (:func:`ftflow.plan.study.plan_study`) on the device the candidates were
    planned for, without the models the hub refuses; ``family``: plan that family as if selected."""
    return plan_study(cfg, device=candidates.device, family=family, left_out=candidates.refused,
                      bf16_supported=planned_bf16(candidates.device), config_dir=candidates.config_dir)
