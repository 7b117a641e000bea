"""The end-to-end pipeline: data -> models -> benchmark -> select -> train -> distill -> evaluate.

Run it with ``ftflow run [CONFIG]`` or ``python -m flows.pipeline [CONFIG]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from ftflow.config import load_config
from ftflow.models import resolve_device
from tasks._stage import with_storage
from tasks.augment import augment
from tasks.benchmark import benchmark
from tasks.distill import distill
from tasks.evaluate import evaluate
from tasks.finetune_full import finetune_full
from tasks.plan_memory import plan_memory
from tasks.prepare_data import prepare_data
from tasks.publish import publish
from tasks.select_family import select_family
from tasks.teacher_logits import teacher_logits
from tasks.train_teacher import train_teacher
from tasks.zoo import zoo, zoo_candidates

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


# One task at a time: candidate models are loaded one after another, never side by side in memory.
@flow(name="ftflow-pipeline", flow_run_name="{config_path}", validate_parameters=False,
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline(config_path: str = str(DEFAULT_CONFIG), overrides: dict | None = None, progress: bool = True) -> dict:
    """Run every stage of ftflow for one config; returns the evaluation manifest."""
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    out = str(cfg.artifacts_dir)
    device = resolve_device(cfg.device)
    logger.info("config %s -> artifacts in %s, device %s", config_path, out, device)
    stage = lambda task: with_storage(task, out)  # noqa: E731  results live beside the outputs
    common = dict(artifacts_dir=out, progress=progress)

    data = stage(prepare_data)(cfg.data, artifacts_dir=out)
    train = stage(augment)(cfg.augment, data, artifacts_dir=out)
    if cfg.zoo is not None:
        candidates = zoo_candidates(stage(zoo)(cfg.zoo, device, **common))
    else:
        candidates = list(cfg.models)

    # Nothing is loaded that the memory plan predicts will not fit.
    plan = stage(plan_memory)(candidates, data, cfg.memory, cfg.memory_budget_gb, cfg.max_length,
                              cfg.benchmark.batch_size, device, artifacts_dir=out)
    benchmarks, failures, futures = [], [], []
    for spec in candidates:
        decision = plan["decisions"][spec.name]
        if decision["precision"] is None:
            logger.warning("%s is not benchmarked: %s", spec.name, decision["reason"])
            failures.append({"name": spec.name, "family": spec.family, "precision": spec.precision,
                             "error": decision["reason"]})
            continue
        planned = spec.model_copy(update={"precision": decision["precision"]})
        futures.append((planned, stage(benchmark).submit(planned, data, decision["batch_size"], cfg.max_length,
                                                          device, **common)))
    for spec, future in futures:
        future.wait()
        if future.state.is_completed():
            benchmarks.append(future.result())
        else:
            error = _error_text(future)
            logger.error("benchmark of %s failed, continuing without it: %s", spec.name, error)
            failures.append({"name": spec.name, "family": spec.family, "precision": spec.precision, "error": error})

    # Later scoring (validation per epoch, teacher logits, test) uses the most cautious planned batch size.
    eval_batch = (cfg.benchmark.batch_size if cfg.benchmark.batch_size != "auto" else
                  min([d["batch_size"] for d in plan["decisions"].values() if d["precision"]], default=1))
    selection = stage(select_family)(benchmarks, cfg.select, cfg.selection_split, artifacts_dir=out)
    run = dict(seed=cfg.seed, max_length=cfg.max_length, device=device, eval_batch_size=eval_batch,
               selection_split=cfg.selection_split, **common)
    lengths = {name: d["max_length"] for name, d in plan["decisions"].items()}
    teacher = stage(train_teacher)(selection, train, data, cfg.teacher, **run,
                                   memory_budget_gb=cfg.memory_budget_gb, planned_length=lengths[selection["teacher"]])
    topk = stage(teacher_logits)(teacher, train, cfg.distill.top_k, cfg.max_length, device, eval_batch, **common)
    student_memory = dict(memory_budget_gb=cfg.memory_budget_gb, planned_length=lengths[selection["student"]])
    distilled = stage(distill)(selection, topk, train, data, cfg.distill, **run, **student_memory)
    finetuned = stage(finetune_full)(selection, train, data, cfg.finetune, **run, **student_memory)
    evaluation = stage(evaluate)(data, train, benchmarks, failures, selection, teacher, distilled, finetuned,
                                 cfg.name, eval_batch, cfg.max_length, device, cfg.selection_split,
                                 cfg.memory_budget_gb, **common)
    publish(evaluation, plan)
    logger.info("report: %s", Path(evaluation["dir"]) / evaluation["files"]["report"])
    return evaluation


def _error_text(future) -> str:
    try:
        future.result()
    except BaseException as exc:  # the task's own exception, re-raised by Prefect
        return f"{type(exc).__name__}: {exc}"
    return str(future.state.message)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
