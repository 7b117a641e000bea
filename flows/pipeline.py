"""The end-to-end pipeline: data -> models -> benchmark -> select -> LoRA grid -> other methods -> distill -> report.

Run it with ``ftflow run [CONFIG]`` or ``python -m flows.pipeline [CONFIG]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from ftflow.config import load_config
from ftflow.methods import TrainJob, best_run, distill_grid, full_job, lora_grid, lora_like, prefix_grid, qlora_like
from ftflow.models import resolve_device
from flows.scale import mapped_runner
from tasks._stage import with_storage
from tasks.augment import augment
from tasks.benchmark import benchmark
from tasks.evaluate import evaluate
from tasks.plan_memory import plan_memory
from tasks.prepare_data import prepare_data
from tasks.publish import publish
from tasks.select_family import select_family
from tasks.teacher_logits import teacher_logits
from tasks.train import train
from tasks.zoo import zoo, zoo_candidates

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


# One task at a time: candidate models are loaded one after another, never side by side in memory.
# Mapped work (benchmarks, training runs) goes where `runner` says: here, or a Dask cluster (flows/scale.py).
@flow(name="ftflow-pipeline", flow_run_name="{config_path}", validate_parameters=False,
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(config_path: str = str(DEFAULT_CONFIG), overrides: dict | None = None, progress: bool = True) -> dict:
    """Run every stage of ftflow for one config; returns the evaluation manifest."""
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    out = str(cfg.artifacts_dir)
    device = resolve_device(cfg.device)
    logger.info("config %s -> artifacts in %s, device %s, mapped work on %s", config_path, out, device,
                cfg.runner.kind)
    stage = lambda task: with_storage(task, out)  # noqa: E731  results live beside the outputs
    common = dict(artifacts_dir=out, progress=progress)

    data = stage(prepare_data)(cfg.data, artifacts_dir=out)
    augmented = stage(augment)(cfg.augment, data, artifacts_dir=out)
    if cfg.zoo is not None:
        candidates = zoo_candidates(stage(zoo)(cfg.zoo, device, **common))
    else:
        candidates = list(cfg.models)
    # Nothing is loaded that the memory plan predicts will not fit.
    plan = stage(plan_memory)(candidates, data, cfg.memory, cfg.memory_budget_gb, cfg.max_length,
                              cfg.benchmark.batch_size, device, artifacts_dir=out,
                              logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens)

    with mapped_runner(cfg.runner) as submit:
        benchmarks, failures = _benchmark_all(submit, stage(benchmark), candidates, plan, data, cfg.max_length,
                                              device, cfg.benchmark.logits_chunk_tokens, common)
        # Later scoring (validation per epoch, teacher logits, test) uses the most cautious planned batch size.
        eval_batch = (cfg.benchmark.batch_size if cfg.benchmark.batch_size != "auto" else
                      min([d["batch_size"] for d in plan["decisions"].values() if d["precision"]], default=1))
        selection = stage(select_family)(benchmarks, cfg.select, cfg.selection_split, artifacts_dir=out)
        # Each run plans its memory on its own training set (tasks/train.py), not on the plan's lengths.
        run = dict(data=data, seed=cfg.seed, max_length=cfg.max_length, device=device, eval_batch_size=eval_batch,
                   selection_split=cfg.selection_split, memory_budget_gb=cfg.memory_budget_gb,
                   logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens,
                   checkpoint_steps=cfg.training.checkpoint_steps, packing=cfg.training.packing, **common)

        def train_all(jobs: list[TrainJob], train_sets: list[dict] | None = None, topk: dict | None = None):
            """Submit one training run per job (each cached on its own) and wait for all of them."""
            futures = [
                submit(stage(train), job=job, train_set=train_set, teacher_topk=topk, **run)
                for job, train_set in zip(jobs, train_sets or [augmented] * len(jobs))  # augmented: the main set
            ]
            return _settle(jobs, futures)

        teacher, student = selection["teacher_model"], selection["student_model"]
        # 1. The LoRA grid on the teacher; its best combination (on the selection split) is carried on.
        grid = train_all(lora_grid(cfg.lora, teacher))
        best = best_run(grid)
        best_job = TrainJob.model_validate(best["job"])
        logger.info("best LoRA combination: %s (selection PPL %.4f)", best["title"], best["best_validation_ppl"])

        # 2. Per compared model: LoRA with that combination, QLoRA, full fine-tuning (small enough models);
        #    the prefix-tuning grid on the teacher.
        per_model = train_all(_per_model_jobs(cfg, benchmarks, selection, best_job, logger))

        # 3. Distillation variants from the best LoRA teacher, its log-probs stored once at the largest k.
        topk = stage(teacher_logits)(best, student, augmented, max(cfg.distill.top_k), cfg.max_length, device,
                                     eval_batch, **common)
        distilled = train_all(distill_grid(cfg.distill, student), topk=topk)

        # 4. The measured effect of augmentation: one run repeated on each training set.
        ablation_runs, ablation = [], {}
        if cfg.ablation.enabled:
            variants = _ablation_train_sets(cfg, data, augmented, stage(augment), out)
            base_job = (lora_like(best_job, teacher) if cfg.ablation.method == "lora"
                        else full_job(cfg.finetune, student))
            jobs = [base_job.model_copy(update={"train_set": name}) for name in variants]
            # An augmented set is `factor` times larger, so at equal epochs it also gets that many more
            # optimizer steps: the original set trained for as many steps separates the two effects.
            same_steps = max(1, round(base_job.epochs * cfg.augment.factor))
            if same_steps != base_job.epochs:
                jobs.append(base_job.model_copy(update={"train_set": "original-steps", "epochs": same_steps}))
                variants["original-steps"] = (data, f"original, same steps ({same_steps} epochs, the augmented "
                                                    f"sets get {cfg.augment.factor:g} x {base_job.epochs})")
            ablation_runs = train_all(jobs, [train_set for train_set, _ in variants.values()])
            ablation = {r["name"]: label for r, (_, label) in zip(ablation_runs, variants.values())}

    runs = _unique(grid + per_model + distilled + ablation_runs)
    evaluation = stage(evaluate)(data, augmented, benchmarks, failures, selection, runs, best["name"],
                                 ablation, cfg.name, cfg.max_length, cfg.selection_split,
                                 cfg.memory_budget_gb, artifacts_dir=out)
    publish(evaluation, plan, benchmarks)
    logger.info("report: %s", Path(evaluation["dir"]) / evaluation["files"]["report"])
    failed = [row for row in evaluation["leaderboard"] if row.get("error")]
    if failed:  # the run goes on without them; the last lines of its log say which and why
        logger.warning("%d model(s) or run(s) have no result:\n  %s", len(failed),
                       "\n  ".join(f"{row['name']} ({row['kind']}): {row['error']}" for row in failed))
    return evaluation


def _benchmark_all(submit, benchmark_task, candidates, plan: dict, data: dict, max_length: int, device: str,
                   logits_chunk_tokens: int, common: dict) -> tuple[list[dict], list[dict]]:
    """Score every candidate the plan lets in; a model that fails is recorded and the others go on."""
    logger = get_run_logger()
    benchmarks, failures, futures = [], [], []
    for spec in candidates:
        decision = plan["decisions"][spec.name]
        if decision["precision"] is None:
            logger.warning("%s is not benchmarked: %s", spec.name, decision["reason"])
            failures.append({"name": spec.name, "family": spec.family, "precision": spec.precision,
                             "error": decision["reason"]})
            continue
        planned = spec.model_copy(update={"precision": decision["precision"]})
        futures.append((planned, submit(benchmark_task, spec=planned, data=data, batch_size=decision["batch_size"],
                                        max_length=max_length, device=device,
                                        logits_chunk_tokens=logits_chunk_tokens, **common)))
    for spec, future in futures:
        future.wait()
        if future.state.is_completed():
            benchmarks.append(future.result())
        else:
            error = _error_text(future)
            logger.error("benchmark of %s failed, continuing without it: %s", spec.name, error)
            failures.append({"name": spec.name, "family": spec.family, "precision": spec.precision, "error": error})
    return benchmarks, failures


def _per_model_jobs(cfg, benchmarks: list[dict], selection: dict, best_job: TrainJob, logger) -> list[TrainJob]:
    """LoRA (the best combination), QLoRA and full fine-tuning per compared model; the prefix grid on the teacher."""
    by_name = {b["name"]: b for b in benchmarks}
    teacher = selection["teacher_model"]
    compared = ([b["model"] for b in benchmarks] if cfg.compare.models == "all"
                else [by_name[selection["teacher"]]["model"], by_name[selection["student"]]["model"]])
    jobs = []
    for model in compared:
        if model["name"] != teacher["name"]:  # the teacher's LoRA run is the grid's best
            jobs.append(lora_like(best_job, model))
        if cfg.qlora.enabled:
            jobs.append(qlora_like(best_job, model, cfg.qlora))
        parameters = by_name[model["name"]]["parameters"]
        if parameters <= cfg.finetune.max_params:
            jobs.append(full_job(cfg.finetune, model))
        else:
            logger.info("%s is not fine-tuned in full: %s parameters > finetune.max_params %s", model["name"],
                        f"{parameters:,}", f"{cfg.finetune.max_params:,}")
    if cfg.prefix.enabled:
        jobs += prefix_grid(cfg.prefix, teacher)
    return jobs


def _ablation_train_sets(cfg, data: dict, augmented: dict, augment_task, out: str) -> dict[str, tuple[dict, str]]:
    """{train_set name: (manifest with files.train, label)}: original, the configured mix, each method alone."""
    mix = "all methods (configured mix)"
    if cfg.augment.enabled:
        variants = {"main": (augmented, mix), "original": (data, "original")}
    else:  # the pipeline trains on the original split; the mix is made for the comparison only
        on = cfg.augment.model_copy(update={"enabled": True})
        made = augment_task.with_options(task_run_name="augment[mix]")(on, data, artifacts_dir=out)
        variants = {"main": (data, "original"), "augmented": (made, mix)}
    if cfg.ablation.per_method:
        for method in sorted(m for m, w in cfg.augment.methods.items() if w > 0):
            only = cfg.augment.model_copy(update={"enabled": True, "methods": {method: 1.0}})
            made = augment_task.with_options(task_run_name=f"augment[{method}]")(only, data, artifacts_dir=out)
            variants[method] = (made, f"{method} only")
    return variants


def _settle(jobs: list[TrainJob], futures: list) -> list[dict]:
    """Wait for every run; if any failed, fail here naming each one and its cause (the others stay cached)."""
    results, errors = [], []
    for job, future in zip(jobs, futures):
        future.wait()
        if future.state.is_completed():
            results.append(future.result())
        else:
            errors.append(f"{job.title}: {_error_text(future)}")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(jobs)} training run(s) failed (finished runs are cached; fix "
                           "the cause and run again to resume):\n  " + "\n  ".join(errors))
    return results


def _unique(runs: list[dict]) -> list[dict]:
    """Runs in order, each once (the ablation repeats the main run on the configured training set)."""
    seen, out = set(), []
    for r in runs:
        if r["key"] not in seen:
            seen.add(r["key"])
            out.append(r)
    return out


def _error_text(future) -> str:
    try:
        future.result()
    except BaseException as exc:  # the task's own exception, re-raised by Prefect
        return f"{type(exc).__name__}: {exc}"
    return str(future.state.message)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
