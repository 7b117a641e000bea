"""The steps both flows share: data -> candidates -> memory plan, the benchmark of every candidate, training runs.

Each step submits tasks and waits for them; what to run is decided in
:mod:`ftflow.study.design`, never here.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence

from prefect import get_run_logger

from flows.scale import Submit
from ftflow.study import design
from ftflow.stages import calls as stages
from ftflow.artifacts import DiskFull
from ftflow.config import ModelSpec, PipelineConfig, SearchConfig
from ftflow.train.jobs import Job
from ftflow.stages.calls import zoo_candidates
from tasks._stage import with_storage
from tasks.benchmark import benchmark
from tasks.plan_memory import plan_memory
from tasks.prepare_data import prepare_data
from tasks.teacher_logits import teacher_logits
from tasks.train import train
from tasks.zoo import zoo


def candidates_and_plan(cfg: PipelineConfig, data: dict, device: str, artifacts_dir: str,
                        progress: bool = True) -> tuple[list[ModelSpec], dict, list[str]]:
    """The candidate models (the zoo's, built offline, or the config's ``models``), their memory plan, and the
    zoo's teacher checks (one line per family; none for hub models).

    Hub ids are checked first (:func:`ftflow.models.hub.check_candidates`): one the hub refuses, or that is not in the
    cache offline, is not planned; the plan's decision for it says why, so it is a failure, never a candidate any
    minimum counts. Online, the config of an id ftflow does not know is read from the hub for the plan.
    """
    from ftflow.models import hub
    from ftflow.models.architecture import fetched_configs_dir

    stage = lambda task: with_storage(task, artifacts_dir)  # noqa: E731
    zoo_checks: list[str] = []
    if cfg.zoo is not None:
        built = stage(zoo)(**stages.zoo_call(cfg, data, device, artifacts_dir, progress))
        candidates, zoo_checks = zoo_candidates(built), design.zoo_teacher_checks(built)
    else:
        candidates = list(cfg.models)
    report, problems = hub.check_candidates(candidates)
    if report.offline_reason and report.checks:
        get_run_logger().warning("hub: %s; the models are read from the Hugging Face cache (%s)",
                                 report.offline_reason, hub.hub_cache_dir())
    for name, problem in problems.items():
        get_run_logger().warning("%s is left out: %s", name, problem)
    for model_id, problem in hub.fetch_configs(report, fetched_configs_dir(artifacts_dir)).items():
        get_run_logger().warning("%s: %s", model_id, problem)
    usable = [spec for spec in candidates if spec.name not in problems]
    plan = stage(plan_memory)(**stages.plan_memory_call(cfg, usable, data, device, artifacts_dir))
    return candidates, design.with_unavailable(plan, candidates, problems), zoo_checks


def data_candidates_and_plan(cfg: PipelineConfig, device: str, artifacts_dir: str,
                             progress: bool = True) -> tuple[dict, list[ModelSpec], dict, list[str]]:
    """The prepared splits, then :func:`candidates_and_plan`."""
    data = with_storage(prepare_data, artifacts_dir)(**stages.prepare_data_call(cfg, artifacts_dir))
    return (data, *candidates_and_plan(cfg, data, device, artifacts_dir, progress))


def benchmark_candidates(submit: Submit, candidates: list[ModelSpec], plan: dict, data: dict, cfg: PipelineConfig,
                         device: str, artifacts_dir: str, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Benchmark every candidate the plan lets through (:func:`ftflow.study.design.benchmark_plan`); (manifests, failures).

    A candidate the plan skips, or whose run fails, becomes a failure with its
    reason; the others go on.
    """
    logger = get_run_logger()
    task = with_storage(benchmark, artifacts_dir)
    planned, failures = design.benchmark_plan(candidates, plan["decisions"])
    for failure in failures:
        logger.warning("%s is not benchmarked: %s", failure["name"], failure["error"])
    futures = [(spec, submit(task, **stages.benchmark_call(cfg, spec, batch_size, data, device, artifacts_dir,
                                                           progress)))
               for spec, batch_size in planned]
    benchmarks = []
    for spec, future in futures:
        future.wait()
        if future.state.is_completed():
            benchmarks.append(future.result())
        else:
            raise_if_disk_full(future)
            error = error_text(future)
            logger.error("benchmark of %s failed, continuing without it: %s", spec.name, error)
            failures.append({"name": spec.name, "family": spec.family, "precision": spec.precision, "error": error})
    return benchmarks, failures


def trainer(submit: Submit, main_set: dict, common: dict) -> Callable[..., list[dict]]:
    """``train_all(jobs, train_sets=None, topk=None)``: one cached ``train`` run per job, all awaited.

    ``train_sets`` (one manifest per job) defaults to ``main_set``, the
    pipeline's training set; ``common`` holds the parameters every run shares
    (:func:`ftflow.stages.calls.train_common`).
    """
    task = with_storage(train, common["artifacts_dir"])

    def train_all(jobs: Sequence[Job], train_sets: Optional[Sequence[dict]] = None,
                  topk: Optional[dict] = None) -> list[dict]:
        futures = [submit(task, **stages.train_call(common, job, train_set, topk))
                   for job, train_set in zip(jobs, train_sets or [main_set] * len(jobs))]
        return settle(jobs, futures)

    return train_all


def searcher(submit: Submit, main_set: dict, common: dict, search: SearchConfig
             ) -> Callable[..., tuple[list[dict], Optional[dict]]]:
    """``search_grid(name, jobs, train_sets=None, topks=None)``: one grid trained as ``search.strategy`` says.

    Returns the runs that trained to the end (grid: every combination; halving: the last rung's survivors) and,
    under halving, the grid's summary for the report (:func:`ftflow.study.halving.grid_summary`). Under halving
    every rung is a cached ``train`` run resuming from the previous rung's (docs/halving.md); who goes on is
    :func:`ftflow.study.halving.survivors` of the rung's results (within each stratum of ``search.stratify``),
    whatever order they finished in. Once the last rung has finished, the intermediate rungs' kept states are
    freed (a rung that later needs one trains from step 0).
    ``topks`` (one per job): distillation's stored teacher targets.
    """
    from ftflow.plan.disk import size_text
    from ftflow.study import halving
    from ftflow.train.rungs import free_state

    task = with_storage(train, common["artifacts_dir"])

    def search_grid(name: str, jobs: Sequence[Job], train_sets: Optional[Sequence[dict]] = None,
                    topks: Optional[Sequence[Optional[dict]]] = None) -> tuple[list[dict], Optional[dict]]:
        logger = get_run_logger()
        train_sets = list(train_sets or [main_set] * len(jobs))
        topks = list(topks or [None] * len(jobs))
        if search.strategy == "grid" or len(jobs) < 2:
            if search.strategy == "halving" and len(jobs) == 1:
                logger.info("%s has one combination: successive halving is a no-op there, it trains as in grid "
                            "mode", name)
            futures = [submit(task, **stages.train_call(common, job, s, t)) for job, s, t in zip(jobs, train_sets,
                                                                                                  topks)]
            return settle(jobs, futures), None
        alive, previous, rungs = list(range(len(jobs))), [None] * len(jobs), []
        axes = search.axes(jobs[0].method)
        if axes:
            logger.info("%s: %d strata by %s; each keeps its own best 1/%d at every rung but the last", name,
                        len(halving.stratum_sizes(jobs, axes)), ", ".join(axes), search.eta)
        freed = 0
        for fraction in halving.rung_fractions(search.rungs):
            futures = [submit(task.with_options(task_run_name=stages.rung_title(jobs[i], fraction)),
                              **stages.train_call(common, jobs[i], train_sets[i], topks[i],
                                                  rung=stages.rung_of(fraction, previous[i])))
                       for i in alive]
            strata = {jobs[i].name: halving.stratum(jobs[i], axes) for i in alive}
            sizes = Counter(strata.values())
            finished: dict[str, dict] = {}

            def on_result(k: int, result: dict, alive=tuple(alive), fraction=fraction) -> None:
                """As each run of the rung finishes: its previous rung's state has served (this rung resumed from
                it, or it was freed), and a run that can no longer go on (:func:`halving.out_of_the_running`)
                needs its own state no more; both are freed at once."""
                nonlocal freed
                freed += free_state(previous[alive[k]]) if previous[alive[k]] is not None else 0
                finished[result["name"]] = result
                if fraction < 1:
                    scores = {n: halving.rung_score(r) for n, r in finished.items()}
                    for out in halving.out_of_the_running(scores, search.eta, sizes, strata):
                        freed += free_state(finished[out])

            results = settle([jobs[i] for i in alive], futures, on_result)
            for i, result in zip(alive, results):
                previous[i] = result
            rungs.append(results)
            if fraction < 1:
                kept = halving.rung_survivors(results, search.eta, axes)
                logger.info("%s, rung %g: %d of %d go on: %s", name, fraction, len(kept), len(alive),
                            ", ".join(kept))
                alive = [i for i in alive if jobs[i].name in set(kept)]
        # Every survivor has trained to the end: no rung of this grid resumes from an intermediate state any more.
        freed += sum(free_state(result) for results in rungs[:-1] for result in results)
        logger.info("%s: the intermediate rungs' states are freed (%s; each once its run could no longer go on "
                    "or its next rung had finished)", name, size_text(freed))
        summary = halving.grid_summary(name, rungs, search.eta, axes)
        logger.info("%s: winner %s; training tokens %.2f of the full grid's", name, summary["winner"],
                    summary["ratio"]["tokens"] or 0.0)
        return rungs[-1], summary

    return search_grid


def plan_grid_and_check_it_fits(cfg: PipelineConfig, jobs: Sequence[Job], train_set: dict, data: dict,
                                device: str, eval_batch_size: int) -> None:
    """Before any training: fail once, with the figure, if no LoRA grid combination fits the training budget."""
    from ftflow.data.splits import read_split
    from ftflow.plan.fit import check_grid_fits
    from ftflow.plan.fit import plan_training_job
    from ftflow.plan.budget import stage_budget
    from ftflow.plan.decide import bf16_available
    from ftflow.models.loading import load_tokenizer
    from tasks._stage import stage_path

    if not jobs:
        return
    teacher = jobs[0].model
    budget = stage_budget(cfg.training_budget_gb, device, cfg.memory.cuda_margin_gb)
    options = dict(tokenizer=load_tokenizer(teacher["path"], teacher["trust_remote_code"]),
                   train_sentences=read_split(stage_path(train_set, "train")),
                   validation_sentences=read_split(stage_path(data, cfg.selection_split)),
                   eval_batch_size=eval_batch_size, max_length=cfg.max_length,
                   budget_bytes=budget.budget_bytes, fit_order=cfg.training.fit_order,
                   logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens, device=device,
                   bf16_supported=bf16_available(device))
    check_grid_fits([plan_training_job(job, **options) for job in jobs], [job.title for job in jobs])


def distil(cfg: PipelineConfig, train_all: Callable[..., list[dict]], search_grid: Callable[..., tuple],
           selection: dict, runs: list[dict], benchmarks: list[dict], augmented: dict, device: str,
           artifacts_dir: str, progress: bool) -> tuple[design.TeacherChoice, list[dict], Optional[dict]]:
    """Distillation from the teacher's best run of any method, whenever the two tokenizers allow it.

    Returns the teacher choice (:func:`ftflow.study.design.distillation_teacher`), the runs (the student's full
    fine-tune at the distillation's steps, the equal-budget reference, then every variant trained to the end;
    each loss's teacher targets stored once, ``teacher_logits`` at its own planned batch size, at the largest k)
    and the variants' halving summary (None in grid mode): the variants of every loss are one grid.
    """
    from ftflow.distill.vocabulary import distillation_problem

    choice = design.distillation_teacher(cfg, selection, runs, benchmarks,
                                         distillation_problem(selection["teacher_model"], selection["student_model"]))
    (get_run_logger().info if choice.distil else get_run_logger().warning)(choice.reason)
    if not choice.distil:
        return choice, [], None
    distilled = train_all([design.distillation_reference(cfg, selection)])
    task = with_storage(teacher_logits, artifacts_dir)
    jobs, topks = [], []
    for variant in design.distillation_variants(cfg):
        targets = task(**stages.teacher_logits_call(cfg, choice.teacher, design.distillation_student(selection),
                                                    augmented, device, artifacts_dir, progress, variant))
        variant_jobs = design.distillation_jobs(cfg, selection, variant)
        jobs += variant_jobs
        topks += [targets] * len(variant_jobs)
    variants, summary = search_grid("distillation variants", jobs, topks=topks)
    return choice, distilled + variants, summary


def log_family_checks(benchmarks: list[dict], zoo_checks: Sequence[str] = ()) -> list[str]:
    """Does each family's teacher beat its student on validation before fine-tuning? Logged; the lines for the
    report returned: the zoo's own checks when it made them (they also say how long each teacher pretrained)."""
    checks = design.family_teacher_check(benchmarks, "validation")
    for beats, line in checks:
        (get_run_logger().info if beats else get_run_logger().warning)(line)
    return design.teacher_check_notes(zoo_checks, checks)


def settle(jobs: Sequence[Job], futures: list,
           on_result: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Wait for every run, in order; if any failed, fail here naming each one and its cause (the others stay
    cached). ``on_result(k, result)``: called as the ``k``-th run's result arrives."""
    results, errors = [], []
    for k, (job, future) in enumerate(zip(jobs, futures)):
        future.wait()
        if future.state.is_completed():
            results.append(future.result())
            if on_result is not None:
                on_result(k, results[-1])
        else:
            raise_if_disk_full(future)
            errors.append(f"{job.title}: {error_text(future)}")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} training run(s) failed (finished runs are cached; fix "
                           "the cause and run again to resume):\n  " + "\n  ".join(errors))
    return results


def raise_if_disk_full(future) -> None:
    """A full disk stops the run at once (every later stage would fail on it too), with its own message."""
    try:
        future.result()
    except DiskFull:
        raise
    except BaseException:  # any other failure is the caller's to record
        pass


def error_text(future) -> str:
    """The exception a failed task raised, as ``Type: message``."""
    try:
        future.result()
    except BaseException as exc:  # the task's own exception, re-raised by Prefect
        return f"{type(exc).__name__}: {exc}"
    return str(future.state.message)
