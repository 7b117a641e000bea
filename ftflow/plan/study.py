"""Every training run a config implies, each with its fit and its compute, before anything runs (``ftflow plan``).

Pure: the runs come from :mod:`ftflow.study.design` (the same functions the pipeline calls), each one's fit from
:func:`ftflow.plan.fit.choose_fit`, its FLOPs from parameters, trainable parameters and the data's token counts.
Kept apart from :mod:`ftflow.plan.fit` so that a training run's code key (which reaches ``fit``) does not depend on
the study's enumeration.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict

from ftflow.plan.fit import FitPlan, choose_fit, training_flops_per_token  # noqa: F401  (ftflow.plan.study's name too)
from ftflow.plan.predict import GB
from ftflow.models.architecture import model_config_for


ESTIMATED_TOKENS_PER_WORD = 1.5
"""Tokens per whitespace word assumed when a model's tokenizer is not available offline: BPE vocabularies of
30k-150k entries give 1.1-1.4 on lower-cased English sentences; 1.5 errs on the long side."""


@dataclass(frozen=True)
class TokenStats:
    """Token counts of one set of sentences under one model's tokenizer (start token included)."""

    sentences: int
    total: int
    longest: int
    exact: bool
    """Counted with the model's tokenizer; False: estimated at :data:`ESTIMATED_TOKENS_PER_WORD`."""

    def scaled(self, factor: float, longest_factor: float = 1.0) -> "TokenStats":
        """The statistics of a set ``factor`` times larger whose sentences are up to ``longest_factor`` longer."""
        return TokenStats(round(self.sentences * factor), round(self.total * factor * longest_factor),
                          math.ceil(self.longest * longest_factor), False)


def token_stats(tokenizer, sentences: Sequence[str], max_length: int) -> TokenStats:
    """Token counts of ``sentences`` as ftflow encodes them, or estimated from words when ``tokenizer`` is None."""
    if tokenizer is not None:
        from ftflow.tokens import sentence_ids

        lengths = [len(sentence_ids(tokenizer, s, max_length)[0]) for s in sentences]
        exact = True
    else:
        lengths = [min(max_length, 1 + math.ceil(ESTIMATED_TOKENS_PER_WORD * len(s.split()))) for s in sentences]
        exact = False
    return TokenStats(len(lengths), sum(lengths), max(lengths), exact)


GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    # name: (bf16 dense tensor-core peak, fp32 peak without TF32), TFLOP/s, from the vendors' data sheets.
    "a100-mig-3g.20gb": (312.0 * 42 / 108, 19.5 * 42 / 108),  # 42 of the A100's 108 SMs: the study's 20 GB slice
    "a100": (312.0, 19.5),
    "h100-sxm": (989.0, 67.0),
    "h100-pcie": (756.0, 51.0),
    "h200": (989.0, 67.0),
    "l40s": (362.0, 91.6),
    "l4": (121.0, 30.3),
    "a10": (125.0, 31.2),
}
"""Peaks the plan's time estimate divides by. fp32 matmuls run without TF32 (PyTorch's default), so fp32 models
train at the fp32 peak; bf16 weights, autocast and QLoRA's bf16 compute at the bf16 one."""
DEFAULT_GPU = "a100-mig-3g.20gb"
DEFAULT_UTILIZATION = 0.3
"""Share of the peak a fine-tuning run reaches (model FLOP utilisation): small batches of short sentences keep it
well under large-batch pretraining's 0.4-0.5."""


class PlannedRun(BaseModel):
    """One training run the config implies, with its fit and its compute (a row of ``ftflow plan``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    section: str
    title: str
    fit: FitPlan
    epochs: int
    train_tokens: int
    tokens_exact: bool
    compute_dtype: str
    train_flops: float
    eval_flops: float
    stratum: tuple = ()
    """A searched grid's run: its values on the grid's ``search.stratify`` axes (its stratum under halving)."""

    @property
    def flops(self) -> float:
        return self.train_flops + self.eval_flops

    def hours(self, gpu: str, utilization: float) -> float:
        """Wall-clock hours on ``gpu`` at ``utilization`` of its peak in the run's compute dtype."""
        bf16, fp32 = GPU_PEAK_TFLOPS[gpu]
        peak = (bf16 if self.compute_dtype == "bf16" else fp32) * 1e12
        return self.flops / (peak * utilization) / 3600


def _compute_dtype(fit: FitPlan) -> str:
    if fit.method == "qlora" or fit.train_precision in ("bf16", "fp16") or fit.master_weights == "fp32":
        return "bf16"  # bf16 weights, autocast over fp32 masters, QLoRA's compute dtype
    return "fp32"


def _section(method: str, train_set: str, in_grid: bool) -> str:
    if train_set != "main":
        return "3.4 augmentation"
    return {"lora": "3.1 LoRA grid" if in_grid else "3.1 per model", "qlora": "3.1 per model",
            "prefix": "3.2 prefix", "full": "3.3 full", "distill": "3.3 distillation"}[method]


def planned_family(cfg, models: Sequence[dict], parameters: dict[str, int],
                   family: Optional[str] = None) -> tuple[str, dict, dict]:
    """``(family, teacher, student)`` as if ``family`` (default: the largest model's) were selected: its largest
    model, and its largest other within ``select.student_max_params``, as :func:`ftflow.study.selection.select_family`
    picks them.

    Raises:
        ValueError: no model of that family, or no student within ``select.student_max_params``.
    """
    family = family or max(models, key=lambda m: parameters[m["name"]])["family"]
    members = [m for m in models if m["family"] == family]
    if not members:
        raise ValueError(f"plan_study_runs: no model of family {family!r}; families: "
                         f"{sorted({m['family'] for m in models})}")
    teacher = max(members, key=lambda m: parameters[m["name"]])
    students = [m for m in members if m is not teacher and parameters[m["name"]] <= cfg.select.student_max_params]
    if not students:
        raise ValueError(f"family {family!r} has no student within select.student_max_params")
    return family, teacher, max(students, key=lambda m: parameters[m["name"]])


def plan_study_runs(cfg, models: Sequence[dict], parameters: dict[str, int], stats: dict[str, dict[str, TokenStats]],
                    *, eval_batch_size: int, family: Optional[str] = None, device: str = "cuda",
                    bf16_supported: bool = True, config_dir=None) -> tuple[list[PlannedRun], list[str]]:
    """Every training run ``cfg`` implies, each with its :class:`FitPlan` and compute, before anything runs.

    The family (teacher, student) is chosen by benchmarking; here it is ``family`` (default: the family of the
    largest model), its teacher the largest model and its student the largest within ``select.student_max_params``,
    as :func:`ftflow.study.selection.select_family` picks them. The per-model runs and the ablation use the best LoRA
    combination, known only after the grid: they are planned with the grid's largest rank and dropout (the most
    memory). Augmented ablation sets: ``augment.factor`` times the sentences, each up to ``random_insert`` longer.

    Args:
        cfg: the :class:`ftflow.config.PipelineConfig`.
        models: the benchmarked models as the runs see them (``name``, ``path``, ``family``, ``precision``,
            ``trust_remote_code``).
        parameters: exact parameter counts by model name.
        stats: by model name, :class:`TokenStats` of ``train``, ``validation`` and ``test``.
        eval_batch_size: the validation pass's batch size.
        family, device, bf16_supported: see above and :func:`choose_fit`.
        config_dir: configs read from the hub (:func:`ftflow.models.architecture.model_config_for`).

    Returns:
        ``(runs, notes)``: the runs in the order the pipeline trains them (each once), and what was assumed.
    """
    from ftflow.study import design
    from ftflow.study.halving import stratum
    from ftflow.train.jobs import LoraJob

    family, teacher, student = planned_family(cfg, models, parameters, family)
    selection = design.Selection(teacher=teacher["name"], student=student["name"], teacher_model=teacher,
                                 student_model=student)
    benchmarks = [design.BenchmarkResult(name=m["name"], model=m, parameters=parameters[m["name"]]) for m in models]
    grid = design.lora_grid_jobs(cfg, selection)
    best = max(grid, key=lambda j: (j.r, j.dropout))
    jobs: list[tuple[Any, bool]] = [(j, True) for j in grid]
    jobs += [(j, False) for j in design.per_model_jobs(cfg, benchmarks, selection, best)]
    # The student's full fine-tune at the distillation's steps (the same run as the per-model one when equal).
    jobs += [(design.distillation_reference(cfg, selection), False)]
    jobs += [(j, False) for j in design.distillation_jobs(cfg, selection)]
    ablation = design.ablation_runs(cfg, selection, best)
    jobs += [(r.job, False) for r in ablation]
    sources = {r.job.train_set: r.train_set.source for r in ablation}
    insert = cfg.augment.random_insert.rate if cfg.augment.methods.get("random_insert", 0) > 0 else 0.0
    notes = [f"family {family} as if selected: teacher {teacher['name']}, student {student['name']} (the family is "
             "chosen by benchmarking; --family NAME plans another)",
             "per-model and ablation runs planned with the grid's largest LoRA rank and dropout "
             f"({best.settings_label})"]
    runs, seen = [], set()
    for job, in_grid in jobs:
        if job.title in seen:
            continue
        seen.add(job.title)
        name = job.model["name"]
        train = stats[name]["train"]
        source = sources.get(job.train_set, "main")
        if source == "augment" or (source == "main" and cfg.augment.enabled):
            train = train.scaled(cfg.augment.factor, 1.0 + insert)
        fit = choose_fit(model_config_for(job.model["path"], job.model["trust_remote_code"], config_dir), job.precision,
                         job.method, batch_size=job.batch_size, max_length=train.longest,
                         budget_bytes=int(cfg.training_budget_gb * GB), fit_order=cfg.training.fit_order,
                         eval_batch_size=eval_batch_size, eval_length=stats[name]["validation"].longest,
                         logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens, device=device,
                         bf16_supported=bf16_supported, trust_remote_code=job.model["trust_remote_code"], name=name,
                         **job.memory_options())
        n = parameters[name]
        trainable = fit.prediction["trainable_parameters"]
        per_token = training_flops_per_token(n, trainable, fit.gradient_checkpointing)
        scored = stats[name]["validation"].total * (job.epochs + 1) + stats[name]["test"].total
        section = _section(job.method, job.train_set, in_grid and isinstance(job, LoraJob))
        runs.append(PlannedRun(
            section=section, title=job.title,
            stratum=stratum(job, cfg.search.axes(job.method)) if section in SEARCHED_SECTIONS else (),
            fit=fit, epochs=job.epochs, train_tokens=train.total, tokens_exact=train.exact,
            compute_dtype=_compute_dtype(fit), train_flops=float(per_token) * train.total * job.epochs,
            # Scoring: the base model and every epoch on validation, the best epoch on test (forward only).
            eval_flops=2.0 * n * scored if fit.fits else 0.0))
    teacher_train = stats[teacher["name"]]["train"]
    if cfg.augment.enabled:
        teacher_train = teacher_train.scaled(cfg.augment.factor, 1.0 + insert)
    notes += teacher_pass_notes(cfg, [job for job, _ in jobs if job.model["name"] == teacher["name"]],
                                teacher_train.longest, device)
    return runs, notes


def teacher_pass_notes(cfg, teacher_jobs: Sequence[Any], max_length: int, device: str = "cuda") -> list[str]:
    """One line per teacher store (``distill.loss``): the teacher pass's batch size and predicted peak.

    The teacher is the best of the teacher model's runs, known only after they train: each line is planned for
    the run that leaves the pass the least memory (:func:`ftflow.plan.predict.predict_teacher_pass` on the run as it
    is loaded; the scoring budget ``memory_budget_gb``; the training set's longest sentence, ``max_length``).
    """
    from ftflow.study import design
    from ftflow.plan.decide import largest_teacher_batch_size, teacher_pass_options
    from ftflow.plan.predict import predict_teacher_pass

    if not teacher_jobs:
        return []
    budget = int(cfg.memory_budget_gb * GB)
    fixed = cfg.distill.teacher_batch_size != "auto"
    cap = int(cfg.distill.teacher_batch_size) if fixed else cfg.memory.batch_size_cap
    k = max(cfg.distill.top_k)
    lines = []
    for variant in design.distillation_variants(cfg):
        worst = None
        for job in teacher_jobs:
            options = teacher_pass_options({"method": job.method, "precision": job.precision,
                                            "job": job.model_dump(mode="json")})
            precision, trust = options.pop("precision"), job.model["trust_remote_code"]
            options.update(k=k, variant=variant, logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens,
                           device=device, trust_remote_code=trust)
            config = model_config_for(job.model["path"], trust)
            batch = largest_teacher_batch_size(config, precision, budget, max_length, cap, **options)
            peak = predict_teacher_pass(config, precision, max(batch, 1), max_length, **options).peak_bytes
            if worst is None or (batch, -peak) < (worst[0], -worst[1]):
                worst = (batch, peak, job.title)
        batch, peak, title = worst
        which = f"with {title} as the teacher (the least room of the teacher's {len(teacher_jobs)} runs)"
        if batch == 0:
            lines.append(f"teacher pass ({variant}, top {k}) does not fit {cfg.memory_budget_gb:g} GB even one "
                         f"sentence a pass {which}: {peak / GB:.2f} GB predicted; lower benchmark.logits_chunk_tokens")
        else:
            lines.append(f"teacher pass ({variant}, top {k}, {max_length} tokens): batch size {batch}"
                         f"{' (fixed in config)' if fixed else ''} {which}, predicted {peak / GB:.2f} GB (scoring "
                         f"budget {cfg.memory_budget_gb:g} GB)")
    return lines


PLAN_RUN_COLUMNS = ("section", "run", "fits", "micro x accumulation", "checkpointing", "optimizer", "weights",
                    "peak_gb", "budget_gb", "epochs", "train tokens/epoch", "PFLOP", "hours")


def study_plan_table(runs: Sequence[PlannedRun], gpu: str, utilization: float) -> "Any":
    """One row per run: its fit, predicted peak, compute and hours (a pandas frame with :data:`PLAN_RUN_COLUMNS`)."""
    import pandas as pd

    rows = []
    for run in runs:
        fit = run.fit
        rows.append({
            "section": run.section, "run": run.title, "fits": fit.fits,
            "micro x accumulation": f"{fit.micro_batch_size} x {fit.accumulation_steps}",
            "checkpointing": fit.gradient_checkpointing, "optimizer": fit.optimizer,
            "weights": ("fp32 master" if fit.master_weights == "fp32" else fit.train_precision)
            + (f" ({fit.update})" if fit.update not in ("adamw", "adamw-8bit") else ""),
            "peak_gb": round(fit.peak_bytes / GB, 2), "budget_gb": fit.budget_bytes / GB, "epochs": run.epochs,
            "train tokens/epoch": run.train_tokens, "PFLOP": round(run.flops / 1e15, 1),
            "hours": round(run.hours(gpu, utilization), 2) if fit.fits else None,
        })
    return pd.DataFrame(rows, columns=list(PLAN_RUN_COLUMNS))




def offline_tokenizer(path: str, trust_remote_code: bool):
    """The model's tokenizer from a local directory or the Hugging Face cache, or None (never the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception:  # not on this machine: the plan estimates token counts instead, and says so
        return None


@dataclass
class StudyPlan:
    """What ``ftflow plan`` (and ``ftflow run``'s disk check) know of a study before anything runs.

    Attributes:
        models: the models planned for benchmarking, as the runs see them (``name``, ``path``, ``family``,
            ``precision``, ``trust_remote_code``).
        parameters: exact parameter counts by model name (every model whose config was found).
        stats: by model name, :class:`TokenStats` of ``train``, ``validation`` and ``test``.
        decisions: the memory plan's decision per model (:func:`ftflow.plan.decide.plan_candidate`).
        runs: every training run (:func:`plan_study_runs`); empty when none can be planned.
        teacher, student: the family's teacher and student the runs are planned for (None without runs).
        notes: what was assumed and which models are not benchmarked.
        problems: models that cannot be planned, or why no training run can be.
    """

    models: list[dict]
    parameters: dict[str, int]
    stats: dict[str, dict[str, TokenStats]]
    decisions: dict[str, dict]
    runs: list[PlannedRun]
    teacher: Optional[dict]
    student: Optional[dict]
    notes: list[str]
    problems: list[str]


def plan_study(cfg, *, device: str, bf16_supported: bool, family: Optional[str] = None, left_out=None,
               config_dir=None, tokenizer_for=offline_tokenizer) -> StudyPlan:
    """Every model's memory plan and every training run ``cfg`` implies, from the data files and the models'
    configs and tokenizers on this machine (estimated when absent, and said so); nothing is loaded.

    Args:
        cfg: the :class:`ftflow.config.PipelineConfig` (with a ``models`` list).
        device, bf16_supported, family: see :func:`plan_study_runs`.
        left_out: ``{model name: why}`` of models the run will not use (the hub refuses them): not planned.
        config_dir: configs read from the hub (:func:`ftflow.models.architecture.model_config_for`).
        tokenizer_for: ``(path, trust_remote_code) -> tokenizer or None``.
    """
    from pathlib import Path

    from ftflow.study import design
    from ftflow.data.splits import hold_out_validation, read_sentences
    from ftflow.models.architecture import UnknownModelError, count_config_parameters
    from ftflow.plan.decide import plan_candidate

    left_out = dict(left_out or {})
    notes, problems = [], []
    splits: dict[str, list[str]] = {}
    missing = [str(p) for p in (cfg.data.train_file, cfg.data.test_file) if p is None or not Path(p).is_file()]
    if missing:
        notes.append(f"data file(s) absent: {', '.join(missing)}; every run is planned at max_length "
                     f"({cfg.max_length} tokens, the worst case) and the compute uses that length for every sentence "
                     "(2000 sentences assumed): put the data there for the real figures")
    else:
        train = read_sentences(cfg.data.train_file, cfg.data.text_column).sentences
        splits["train"], splits["validation"] = map(list, hold_out_validation(
            train, cfg.data.validation_fraction, cfg.data.seed))
        splits["test"] = list(read_sentences(cfg.data.test_file, cfg.data.text_column).sentences)
    budget = int(cfg.memory_budget_gb * GB)
    models, parameters, stats, decisions, estimated = [], {}, {}, {}, []
    for spec in cfg.models:
        if spec.name in left_out:
            notes.append(f"{spec.name} is left out (so not trained): {left_out[spec.name]}")
            continue
        try:
            config = model_config_for(spec.path, spec.trust_remote_code, config_dir)
        except UnknownModelError as exc:
            problems.append(f"{spec.name}: {exc}")
            continue
        parameters[spec.name] = count_config_parameters(config, spec.trust_remote_code)
        if splits:
            tokenizer = tokenizer_for(spec.path, spec.trust_remote_code)
            if tokenizer is None:
                estimated.append(spec.name)
            stats[spec.name] = {k: token_stats(tokenizer, v, cfg.max_length) for k, v in splits.items()}
        else:
            worst = TokenStats(2000, 2000 * cfg.max_length, cfg.max_length, False)
            stats[spec.name] = {"train": worst, "validation": worst.scaled(0.1), "test": worst}
        decision = plan_candidate(
            spec.name, spec.path, budget, precision=spec.precision, batch_size=cfg.benchmark.batch_size,
            max_length=max(s.longest for s in stats[spec.name].values()), batch_size_cap=cfg.memory.batch_size_cap,
            allow_nf4=cfg.memory.allow_nf4, device=device, logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens,
            trust_remote_code=spec.trust_remote_code, config_dir=config_dir)
        decisions[spec.name] = decision
        if decision["precision"] is None:
            notes.append(f"{spec.name} is not benchmarked (so not trained): {decision['reason']}")
            continue
        models.append({"name": spec.name, "path": spec.path, "family": spec.family,
                       "precision": decision["precision"], "trust_remote_code": spec.trust_remote_code})
    if estimated:
        notes.append(f"tokenizers not available offline for {', '.join(estimated)}: token counts estimated at "
                     f"{ESTIMATED_TOKENS_PER_WORD:g} per word (the run counts them with the real tokenizer)")
    runs, teacher, student = [], None, None
    if not models:
        problems.append("no model can be trained: none is planned for benchmarking")
    else:
        try:
            _, teacher, student = planned_family(cfg, models, parameters, family)
            runs, assumed = plan_study_runs(
                cfg, models, parameters, stats, eval_batch_size=design.evaluation_batch_size(cfg, decisions),
                family=family, device=device, bf16_supported=bf16_supported, config_dir=config_dir)
            notes = assumed + notes
        except ValueError as exc:
            problems.append(f"training runs: {exc}")
    return StudyPlan(models, parameters, stats, decisions, runs, teacher, student, notes, problems)


TRAINING_PLAN_FILES = {"csv": "training_plan.csv", "markdown": "training_plan.md"}
SEARCHED_SECTIONS = ("3.1 LoRA grid", "3.2 prefix", "3.3 distillation")
"""The grids successive halving searches (docs/halving.md); every other run trains once either way."""


def stratum_sizes(members: Sequence[PlannedRun]) -> list[int]:
    """A searched grid's stratum sizes (:attr:`PlannedRun.stratum`), as
    :func:`ftflow.study.halving.halving_work` and :func:`ftflow.study.halving.reaching` take them."""
    return list(Counter(r.stratum for r in members).values())


def search_compute(cfg, runs: Sequence[PlannedRun], gpu: str = DEFAULT_GPU,
                   utilization: float = DEFAULT_UTILIZATION) -> dict[str, dict[str, float]]:
    """The study's compute (``flops``, ``hours``) under grid search and under successive halving.

    Under halving a grid of ``n`` runs costs :func:`ftflow.study.halving.halving_work` whole runs of its own
    (its runs share epochs, batch size and training set, so each costs about its mean; each stratum of
    ``search.stratify`` halved on its own), with ``search.eta``, ``search.rungs`` and ``search.stratify`` as
    configured (the defaults when the config searches by grid).
    """
    from ftflow.study.halving import halving_work

    totals = {"grid": {"flops": 0.0, "hours": 0.0}, "halving": {"flops": 0.0, "hours": 0.0}}
    groups: dict[str, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(run.section if run.section in SEARCHED_SECTIONS else run.title, []).append(run)
    for section, members in groups.items():
        flops, hours = sum(r.flops for r in members), sum(r.hours(gpu, utilization) for r in members)
        share = (halving_work(stratum_sizes(members), cfg.search.eta, cfg.search.rungs) / len(members)
                 if section in SEARCHED_SECTIONS else 1.0)
        totals["grid"]["flops"] += flops
        totals["grid"]["hours"] += hours
        totals["halving"]["flops"] += flops * share
        totals["halving"]["hours"] += hours * share
    return totals


def search_compute_line(cfg, runs: Sequence[PlannedRun], gpu: str, utilization: float) -> str:
    """``ftflow plan``'s line on the study's compute under grid and under successive halving."""
    totals = search_compute(cfg, runs, gpu, utilization)
    grid, halving = totals["grid"], totals["halving"]
    ratio = halving["flops"] / grid["flops"] if grid["flops"] else 1.0
    chosen = "this config's strategy" if cfg.search.strategy == "halving" else "search.strategy: halving"
    return (f"search: grid {grid['flops'] / 1e18:.3f} EFLOP, {grid['hours']:.1f} hours; successive halving ({chosen}, "
            f"eta {cfg.search.eta}, rungs {', '.join(f'{f:g}' for f in cfg.search.rungs)}) "
            f"{halving['flops'] / 1e18:.3f} EFLOP, {halving['hours']:.1f} hours: {ratio:.2f} of grid (the LoRA and "
            "prefix grids and the distillation variants halved, every other run once)")


def write_training_plan(cfg, study: StudyPlan, out: Path, gpu: str = DEFAULT_GPU,
                        utilization: float = DEFAULT_UTILIZATION) -> str:
    """Write the study's training runs (:data:`TRAINING_PLAN_FILES` in ``out``) and return what ``ftflow plan``
    prints of them: the budget, the table, the notes, the techniques each group of runs needs, and the totals
    (runs that fit, FLOPs, hours at ``utilization`` of ``gpu``'s peak).
    """
    from ftflow.plan.tables import plan_markdown

    runs = study.runs
    frame = study_plan_table(runs, gpu, utilization)
    frame.to_csv(out / TRAINING_PLAN_FILES["csv"], index=False)
    table = plan_markdown(frame)
    (out / TRAINING_PLAN_FILES["markdown"]).write_text(table + "\n", encoding="utf-8")
    fitting = [r for r in runs if r.fit.fits]
    hours = sum(r.hours(gpu, utilization) for r in fitting)
    lines = [f"\ntraining runs: budget {cfg.training_budget_gb:g} GB (scoring: {cfg.memory_budget_gb:g} GB), "
             f"fit_order {list(cfg.training.fit_order)}\n", table]
    lines += [f"- {line}" for line in study.notes]
    needed: dict[str, list[str]] = {}
    for run in runs:
        if run.fit.techniques or not run.fit.fits:
            needed.setdefault(run.fit.summary, []).append(run.title)
    lines += [f"- {summary}" + (f" ({len(titles)} runs)" if len(titles) > 1 else "")
              for summary, titles in needed.items()]
    lines.append(f"\n{len(fitting)} of {len(runs)} training runs fit {cfg.training_budget_gb:g} GB; "
                 f"{sum(r.flops for r in fitting) / 1e18:.2f} EFLOP in all: about {hours:.1f} hours on one {gpu} "
                 f"(bf16 {GPU_PEAK_TFLOPS[gpu][0]:.0f} / fp32 {GPU_PEAK_TFLOPS[gpu][1]:.1f} TFLOP/s peak) "
                 f"at {utilization:.0%} utilisation. FLOPs per training token: (4 N + 2 N_trainable), "
                 "+ 2 N with checkpointing; scoring 2 N per token")
    if len(fitting) < len(runs):
        lines.append(f"{len(runs) - len(fitting)} run(s) would be skipped (listed above with the figure)")
    lines.append(search_compute_line(cfg, fitting, gpu, utilization))
    lines.append(f"written: {out}/{TRAINING_PLAN_FILES['csv']}, {TRAINING_PLAN_FILES['markdown']}")
    return "\n".join(lines)
