"""The study's design: every run it makes, decided from the config and the stages' results (pure, no I/O).

The flow (``flows/pipeline.py``) only wires stages; each decision it needs is
one function here, reading the config and typed stage results
(:class:`Decision` of the memory plan, :class:`BenchmarkResult`,
:class:`Selection`, :class:`TrainedRun`) and returning typed jobs
(:data:`ftflow.train.jobs.Job`):

* which candidates are benchmarked, at which precision and batch size: :func:`benchmark_plan`;
* the batch size of every later scoring pass: :func:`evaluation_batch_size`;
* the LoRA grid (on the teacher) and its best combination: :func:`lora_grid_jobs`, :func:`best_lora`;
* which models get LoRA, QLoRA and full fine-tuning, and the prefix grid: :func:`per_model_jobs`;
* the distillation teacher (the teacher's best run of any method, whenever the tokenizers allow it), student,
  variants and equal-budget reference: :func:`distillation_teacher`, :func:`distillation_student`,
  :func:`distillation_jobs`, :func:`distillation_reference`;
* the augmentation ablation's training sets and runs (the same-steps rule): :func:`ablation_runs`;
* each run once in the report: :func:`unique_runs`; the report's notes: :func:`report_notes`.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict

from ftflow.config import AugmentConfig, ModelSpec, PipelineConfig
from ftflow.train.jobs import (DistillJob, FullJob, Job, LoraJob, best_run, distill_grid, full_job, lora_grid,
                               lora_like, prefix_grid, qlora_like)


class _Result(BaseModel):
    """A stage's manifest as the design reads it (the fields it needs; the rest stays in the manifest)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Decision(_Result):
    """The memory plan's decision for one candidate: its precision and batch size, or None and why not."""

    precision: Optional[str]
    batch_size: Optional[int] = None
    reason: str = ""


class BenchmarkResult(_Result):
    """One benchmarked candidate: the model as trained from here on, and its exact parameter count."""

    name: str
    model: dict[str, Any]
    parameters: int


class Selection(_Result):
    """The chosen family's teacher and student (names and models)."""

    teacher: str
    student: str
    teacher_model: dict[str, Any]
    student_model: dict[str, Any]


class TrainedRun(_Result):
    """One training run's result: its job, and its selection-split perplexity or why it was not trained."""

    key: str
    name: str
    job: Job
    skipped: Optional[str] = None
    best_validation_ppl: Optional[float] = None


R = TypeVar("R", bound=_Result)


def _typed(cls: type[R], value: R | Mapping) -> R:
    return value if isinstance(value, cls) else cls.model_validate(value)


# ----------------------------------------------------------------------------- benchmarks


def benchmark_plan(candidates: Sequence[ModelSpec], decisions: Mapping[str, Decision | Mapping]
                   ) -> tuple[list[tuple[ModelSpec, int]], list[dict]]:
    """``([(candidate at its planned precision, batch size)], [failure])``: what the memory plan lets through.

    A candidate the plan predicts will not fit is not loaded: it becomes a
    failure (``name``, ``family``, ``precision``, ``error``: the plan's reason).
    """
    planned, failures = [], []
    for spec in candidates:
        decision = _typed(Decision, decisions[spec.name])
        if decision.precision is None:
            failures.append({"name": spec.name, "family": spec.family, "precision": spec.precision,
                             "error": decision.reason})
        else:
            planned.append((spec.model_copy(update={"precision": decision.precision}), decision.batch_size))
    return planned, failures


def with_unavailable(plan: Mapping, candidates: Sequence[ModelSpec], problems: Mapping[str, str]) -> dict:
    """The memory plan with a decision for every candidate: the planned ones', and for each candidate left out
    before planning (``problems``: name -> why, e.g. the hub check's line) no precision and that reason."""
    decisions = {spec.name: plan["decisions"].get(spec.name) or {"precision": None, "batch_size": 0,
                                                                 "parameters": None, "peak_bytes": None,
                                                                 "reason": problems[spec.name]}
                 for spec in candidates if spec.name in plan["decisions"] or spec.name in problems}
    return {**plan, "decisions": decisions}


def evaluation_batch_size(cfg: PipelineConfig, decisions: Mapping[str, Decision | Mapping],
                          benchmarked: Optional[Sequence[str]] = None) -> int:
    """Batch size of every scoring pass after the benchmark (validation per epoch, test); the teacher pass plans
    its own (:func:`ftflow.plan.decide.plan_teacher_pass`).

    The configured ``benchmark.batch_size``, or with ``auto`` the most cautious
    planned one: the smallest over the candidates the plan lets through and, once
    known, that were benchmarked (``benchmarked``: their names); 1 if none. A
    candidate that failed (unreadable, refused by the hub, its benchmark failed)
    is never scored again, so it never lowers the batch of the others.
    """
    if cfg.benchmark.batch_size != "auto":
        return cfg.benchmark.batch_size
    typed = {name: _typed(Decision, d) for name, d in decisions.items()}
    return min([d.batch_size for name, d in typed.items()
                if d.precision and (benchmarked is None or name in benchmarked)], default=1)


# ----------------------------------------------------------------------------- training runs


def lora_grid_jobs(cfg: PipelineConfig, selection: Selection | Mapping) -> list[LoraJob]:
    """The LoRA grid (every combination of ``lora``'s axes), on the teacher."""
    return lora_grid(cfg.lora, _typed(Selection, selection).teacher_model)


def best_lora(grid: Sequence[Mapping]) -> tuple[Mapping, LoraJob]:
    """The grid's best run on the selection split (ties: the earlier one) and its job."""
    best = best_run(grid)
    job = _typed(TrainedRun, best).job
    assert isinstance(job, LoraJob), job
    return best, job


def compared_models(cfg: PipelineConfig, benchmarks: Sequence[BenchmarkResult | Mapping],
                    selection: Selection | Mapping) -> list[dict]:
    """The models the per-model methods run on: teacher and student (``compare.models: family``) or every one."""
    benchmarks = [_typed(BenchmarkResult, b) for b in benchmarks]
    selection = _typed(Selection, selection)
    if cfg.compare.models == "all":
        return [b.model for b in benchmarks]
    by_name = {b.name: b for b in benchmarks}
    return [by_name[selection.teacher].model, by_name[selection.student].model]


def _parameters(benchmarks: Sequence[BenchmarkResult | Mapping]) -> dict[str, int]:
    return {b.name: b.parameters for b in (_typed(BenchmarkResult, b) for b in benchmarks)}


def per_model_jobs(cfg: PipelineConfig, benchmarks: Sequence[BenchmarkResult | Mapping],
                   selection: Selection | Mapping, best: LoraJob, include_prefix: bool = True) -> list[Job]:
    """Per compared model: LoRA with the best combination, QLoRA, full fine-tuning; then the prefix grid.

    * LoRA: every compared model but the teacher, whose LoRA run is the grid's best.
    * QLoRA (``qlora.enabled``): every compared model, the best combination on the 4-bit base.
    * Full fine-tuning: every compared model of at most ``finetune.max_params`` parameters
      (:func:`left_out_of_full_fine_tuning` says which are not).
    * The prefix-tuning grid (``prefix.enabled``): on the teacher (``include_prefix``; the pipeline trains it as
      a grid of its own, :func:`prefix_grid_jobs`).
    """
    parameters = _parameters(benchmarks)
    teacher = _typed(Selection, selection).teacher_model
    jobs: list[Job] = []
    for model in compared_models(cfg, benchmarks, selection):
        if model["name"] != teacher["name"]:
            jobs.append(lora_like(best, model))
        if cfg.qlora.enabled:
            jobs.append(qlora_like(best, model, cfg.qlora))
        if parameters[model["name"]] <= cfg.finetune.max_params:
            jobs.append(full_job(cfg.finetune, model))
    if include_prefix:
        jobs += prefix_grid_jobs(cfg, selection)
    return jobs


def prefix_grid_jobs(cfg: PipelineConfig, selection: Selection | Mapping) -> list[Job]:
    """The prefix-tuning grid on the teacher (``prefix.enabled``; none otherwise)."""
    return prefix_grid(cfg.prefix, _typed(Selection, selection).teacher_model) if cfg.prefix.enabled else []


def left_out_of_full_fine_tuning(cfg: PipelineConfig, benchmarks: Sequence[BenchmarkResult | Mapping],
                                 selection: Selection | Mapping) -> list[str]:
    """One line per compared model over ``finetune.max_params`` (not fine-tuned in full), saying so."""
    parameters = _parameters(benchmarks)
    return [f"{m['name']} is not fine-tuned in full: {parameters[m['name']]:,} parameters > finetune.max_params "
            f"{cfg.finetune.max_params:,}"
            for m in compared_models(cfg, benchmarks, selection) if parameters[m["name"]] > cfg.finetune.max_params]


class TeacherChoice(BaseModel):
    """Which run the student learns from, or why distillation is skipped, with the figures compared.

    ``teacher``: the teacher model's best run on the selection split (any
    method, on the main training set); ``student_best``: the student's own
    best there, its baseline or any of its (non-distillation) runs.
    ``distil`` is False when no teacher run finished, when the tokenizers do
    not allow distillation (``tokenizer_problem``), or when the teacher does
    not beat the student and ``distill.require_better_teacher`` is on.
    ``teacher_beats`` says how the teacher compared (None without figures).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    distil: bool
    teacher: Optional[dict[str, Any]] = None
    teacher_name: Optional[str] = None
    teacher_ppl: Optional[float] = None
    student_best: Optional[str] = None
    student_ppl: Optional[float] = None
    teacher_beats: Optional[bool] = None
    reason: str


def distillation_teacher(cfg: PipelineConfig, selection: Selection | Mapping, runs: Sequence[Mapping],
                         benchmarks: Sequence[Mapping], tokenizer_problem: Optional[str] = None) -> TeacherChoice:
    """The run the student learns from: the teacher's best run on the selection split.

    By default the student is distilled whenever the tokenizers allow it, whether or not the teacher beats the
    student's own best on the selection split (the report's equal-steps comparison with full fine-tuning says
    whether it helped, and the reason line how the teacher compared); ``distill.require_better_teacher`` skips
    distillation from a teacher that does not beat the student.

    Args:
        cfg: the config (``distill.require_better_teacher``, ``selection_split``).
        selection: the chosen family's teacher and student.
        runs: every finished training run so far (the LoRA grid, the per-model methods).
        benchmarks: the benchmark manifests (the student's baseline on the selection split).
        tokenizer_problem: why the teacher's and the student's tokenizers do not allow distillation
            (:func:`ftflow.distill.vocabulary.distillation_problem`), or None when they do.

    Returns:
        The :class:`TeacherChoice`; its ``reason`` is one line for the log and the report.
    """
    selection = _typed(Selection, selection)
    main = [r for r in runs if not r.get("skipped") and r["job"]["train_set"] == "main" and r["method"] != "distill"]
    teacher_runs = [r for r in main if r["base_model"]["name"] == selection.teacher]
    student = [(r["name"], r["best_validation_ppl"]) for r in main if r["base_model"]["name"] == selection.student]
    student += [(f"{b['name']} (baseline)", b[cfg.selection_split]["corpus_ppl"]) for b in benchmarks
                if b["name"] == selection.student]
    student_best = min(student, key=lambda pair: pair[1], default=(None, None))
    split = cfg.selection_split
    if not teacher_runs:
        return TeacherChoice(distil=False, student_best=student_best[0], student_ppl=student_best[1],
                             reason=f"distillation was skipped: no run of teacher {selection.teacher} finished")
    teacher = best_run(teacher_runs)
    ppl = teacher["best_validation_ppl"]
    figures = (f"teacher {teacher['name']} ({split} PPL {ppl:.4f}) vs the student's own best "
               + (f"{student_best[0]} ({student_best[1]:.4f})" if student_best[0] else "(none)"))
    beats = student_best[1] is None or ppl < student_best[1]
    known = dict(teacher_name=teacher["name"], teacher_ppl=ppl, student_best=student_best[0],
                 student_ppl=student_best[1], teacher_beats=beats)
    if tokenizer_problem:
        return TeacherChoice(distil=False, **known, reason=f"distillation was skipped: {tokenizer_problem} "
                                                           f"({figures})")
    if beats:
        return TeacherChoice(distil=True, teacher=dict(teacher), **known,
                             reason=f"distilling from the best teacher run, which beats the student: {figures}")
    if not cfg.distill.require_better_teacher:
        return TeacherChoice(distil=True, teacher=dict(teacher), **known,
                             reason=f"distilling from the best teacher run although it does not beat the student's "
                                    f"own best on the {split} split (the equal-steps comparison with full "
                                    f"fine-tuning measures whether it helps; distill.require_better_teacher: true "
                                    f"would skip it): {figures}")
    return TeacherChoice(distil=False, **known,
                         reason=f"distillation was skipped (distill.require_better_teacher): the best teacher run "
                                f"does not beat the student on the {split} split ({figures})")


def zoo_teacher_checks(zoo_manifest: Optional[Mapping]) -> list[str]:
    """The zoo stage's line per family: its teacher against its student on the selection split, and the
    pretraining it took (recorded by :func:`ftflow.models.zoo.build_zoo`); none without a zoo."""
    if zoo_manifest is None:
        return []
    return [family["teacher_check"]["line"] for family in zoo_manifest["families"] if family.get("teacher_check")]


def teacher_check_notes(zoo_checks: Sequence[str], benchmark_checks: Sequence[tuple[bool, str]]) -> list[str]:
    """The report's lines on each family's teacher against its student: the zoo's when it checked them (they
    also say how long each teacher pretrained), else the benchmark's (:func:`family_teacher_check`)."""
    return list(zoo_checks) or [line for _, line in benchmark_checks]


def family_teacher_check(benchmarks: Sequence[Mapping], split: str = "validation") -> list[tuple[bool, str]]:
    """Per family of two or more benchmarked models: does its largest beat its smallest on ``split``, at baseline?

    A teacher that does not beat its student before fine-tuning rarely has
    anything to teach it after. Returns ``(beats, line)`` per family, in
    family order; the line gives both figures (and, when it fails, what to change).
    """
    families: dict[str, list[Mapping]] = {}
    for b in benchmarks:
        families.setdefault(b.get("family") or "", []).append(b)
    checks = []
    for family, members in sorted(families.items()):
        if len(members) < 2:
            continue
        student = min(members, key=lambda b: b["parameters"])
        teacher = max(members, key=lambda b: b["parameters"])
        teacher_ppl, student_ppl = teacher[split]["corpus_ppl"], student[split]["corpus_ppl"]
        beats = teacher_ppl < student_ppl
        line = (f"family {family}: teacher {teacher['name']} ({teacher['parameters']:,} parameters) {split} PPL "
                f"{teacher_ppl:.4f} vs student {student['name']} ({student['parameters']:,}) {student_ppl:.4f} "
                "before fine-tuning: ")
        if beats:
            line += "the teacher beats its student"
        else:
            line += ("the teacher does NOT beat its student, so it can hardly teach it (zoo: pretrain the teacher "
                     "longer, zoo.teacher_pretrain_steps or zoo.teacher_extra_rounds, or on text closer to the task, "
                     "zoo.corpus_file and zoo.task_text)")
        checks.append((beats, line))
    return checks


def distillation_student(selection: Selection | Mapping) -> dict:
    """The model distilled into: the selected family's student."""
    return _typed(Selection, selection).student_model


def distillation_variants(cfg: PipelineConfig) -> tuple[str, ...]:
    """The teacher stores to make: one per ``distill.loss`` (each at the largest ``top_k``)."""
    return cfg.distill.loss


def distillation_jobs(cfg: PipelineConfig, selection: Selection | Mapping, loss: Optional[str] = None
                      ) -> list[DistillJob]:
    """The distillation variants (loss x top-k x temperature x alpha), into the student; ``loss``: one loss only."""
    return distill_grid(cfg.distill, distillation_student(selection), loss)


def distillation_reference(cfg: PipelineConfig, selection: Selection | Mapping) -> FullJob:
    """The student fine-tuned in full with the distillation's epochs, batch size and learning rate.

    Same optimizer steps on the same training set: the equal-budget
    reference every distillation variant is compared with. When it is the
    configured full fine-tune already, it is that run (same job, same cache).
    """
    return FullJob(model=distillation_student(selection), learning_rate=cfg.distill.learning_rate,
                   epochs=cfg.distill.epochs, batch_size=cfg.distill.batch_size,
                   weight_decay=cfg.finetune.weight_decay)


class TrainSet(BaseModel):
    """A training set of the ablation: which sentences, made how, and its label in the report.

    ``source``: ``main`` (the pipeline's training set), ``original`` (the
    train split) or ``augment`` (made from the train split with ``augment``,
    as task run ``run_name``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: Literal["main", "original", "augment"]
    label: str
    augment: Optional[AugmentConfig] = None
    run_name: Optional[str] = None


class AblationRun(BaseModel):
    """One run of the augmentation ablation: the same job, on one training set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: Job
    train_set: TrainSet


MIX_LABEL = "all methods (configured mix)"


def ablation_train_sets(cfg: PipelineConfig) -> list[TrainSet]:
    """The original split, the configured mix and (``ablation.per_method``) each augmentation method alone."""
    augment = cfg.augment
    if augment.enabled:
        sets = [TrainSet(name="main", source="main", label=MIX_LABEL),
                TrainSet(name="original", source="original", label="original")]
    else:  # the pipeline trains on the original split; the mix is made for the comparison only
        sets = [TrainSet(name="main", source="original", label="original"),
                TrainSet(name="augmented", source="augment", label=MIX_LABEL, run_name="augment[mix]",
                         augment=augment.model_copy(update={"enabled": True}))]
    if cfg.ablation.per_method:
        for method in sorted(m for m, w in augment.methods.items() if w > 0):
            sets.append(TrainSet(name=method, source="augment", label=f"{method} only", run_name=f"augment[{method}]",
                                 augment=augment.model_copy(update={"enabled": True, "methods": {method: 1.0}})))
    return sets


def ablation_runs(cfg: PipelineConfig, selection: Selection | Mapping, best: LoraJob) -> list[AblationRun]:
    """The augmentation ablation (``ablation.enabled``): one run repeated on each training set.

    The run is the teacher with the best LoRA combination (``ablation.method:
    lora``) or the student fine-tuned in full. An augmented set is ``factor``
    times larger, so at equal epochs it also gets that many more optimizer
    steps: the original set trained for as many steps (``original-steps``)
    separates the two effects; it is added when that step count differs.
    """
    if not cfg.ablation.enabled:
        return []
    selection = _typed(Selection, selection)
    base = (lora_like(best, selection.teacher_model) if cfg.ablation.method == "lora"
            else full_job(cfg.finetune, selection.student_model))
    runs = [AblationRun(job=base.model_copy(update={"train_set": s.name}), train_set=s)
            for s in ablation_train_sets(cfg)]
    same_steps = max(1, round(base.epochs * cfg.augment.factor))
    if same_steps != base.epochs:
        label = (f"original, same steps ({same_steps} epochs, the augmented sets get {cfg.augment.factor:g} x "
                 f"{base.epochs})")
        runs.append(AblationRun(job=base.model_copy(update={"train_set": "original-steps", "epochs": same_steps}),
                                train_set=TrainSet(name="original-steps", source="original", label=label)))
    return runs


def ablation_labels(runs: Sequence[AblationRun]) -> dict[str, str]:
    """{trained model's name: its training set's label}: the report's augmentation table."""
    return {run.job.name: run.train_set.label for run in runs}


def unique_runs(runs: Sequence[Mapping]) -> list[Mapping]:
    """Runs in order, each once (the ablation repeats the main run on the configured training set)."""
    seen, out = set(), []
    for run in runs:
        key = _typed(TrainedRun, run).key
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out


# ----------------------------------------------------------------------------- the report


def lora_grid_runs(runs: Sequence[Mapping], chosen: Optional[str]) -> list[Mapping]:
    """The LoRA grid's runs: LoRA on the main training set, on the model of the chosen (best) run."""
    grid_model = next((r["base_model"]["name"] for r in runs if r["name"] == chosen), None)
    return [r for r in runs if r["method"] == "lora" and r["job"]["train_set"] == "main"
            and r["base_model"]["name"] == grid_model]


def protocol_note(selection_split: str) -> str:
    """What the choices were made on, for the report's first lines."""
    if selection_split == "validation":
        return ("every choice (family, best epoch, best combination) was made on the validation split held out "
                "of train; test was scored once per model, for this report")
    return ("STUDY PROTOCOL: the family, best epochs and best combinations were chosen on the TEST split, "
            "so the test perplexities here are optimistic")


def report_notes(failures: Sequence[Mapping], runs: Sequence[Mapping], benchmarks: Sequence[Mapping],
                 memory_budget_gb: float, *, augmentation_table: bool, truncated: int, max_length: int,
                 no_gain: Sequence[str] = (), distillation: Sequence[str] = ()) -> list[str]:
    """The report's notes, in order: failures, runs not trained, how runs were made to fit their memory budget
    (and the out-of-memory retries runs needed on the device),
    the teacher checks and the distillation's teacher and outcome (``distillation``), methods that did not help
    (``no_gain``), scoring peaks over the budget, how to read the augmentation table, truncated test sentences."""
    notes = [f"{f['name']} failed and was left out: {f['error']}" for f in failures]
    notes += [f"{r['title']} was not trained: {r['skipped']}" for r in runs if r.get("skipped")]
    fitted: dict[str, list[str]] = {}  # runs that needed micro-batches, checkpointing, ... to fit (ftflow/plan/fit.py)
    for r in runs:
        if r.get("fit_summary") and (r.get("fit_plan") or {}).get("techniques"):
            fitted.setdefault(r["fit_summary"], []).append(r["title"])
    notes += [f"memory fit: {summary} ({titles[0] if len(titles) == 1 else f'{len(titles)} runs'})"
              for summary, titles in fitted.items()]
    notes += [f"{r['title']} ran out of device memory {len(r['oom_retries'])} time(s): "
              + "; ".join(x["line"] for x in r["oom_retries"]) for r in runs if r.get("oom_retries")]
    notes += list(distillation)
    notes += list(no_gain)
    for b in benchmarks:
        if b.get("peak_memory_bytes") and b["peak_memory_bytes"] > memory_budget_gb * 1e9:
            notes.append(f"{b['name']} peaked at {b['peak_memory_bytes'] / 1e9:.1f} GB while scoring, over "
                         f"the {memory_budget_gb:g} GB budget")
    if augmentation_table:
        notes.append("augmentation table: an augmented set is larger, so at equal epochs it also gets more "
                     "optimizer steps; compare it with the original set trained for the same steps (last "
                     "column) to see the effect of the new sentences alone")
    if truncated:
        notes.append(f"{truncated} test sentence(s) were truncated at {max_length} tokens across all rows")
    return notes
