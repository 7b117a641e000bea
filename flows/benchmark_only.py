"""Benchmark only: data -> (zoo) -> memory plan -> perplexity of every candidate -> table artifacts.

The first stages of the pipeline, composed as ``flows/pipeline.py`` composes them, with the
candidates scored where ``runner`` says (the flow's process, or Dask: see ``flows/scale.py``).
Deployed as ``ftflow-benchmark/benchmark-only`` in ``prefect.yaml``; run it directly with
``python -m flows.benchmark_only [CONFIG]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.scale import Submit, mapped_runner
from ftflow.config import ModelSpec, PipelineConfig, load_config
from ftflow.models import resolve_device
from tasks._stage import with_storage
from tasks.benchmark import benchmark
from tasks.plan_memory import plan_memory
from tasks.prepare_data import prepare_data
from tasks.publish_benchmark import publish_benchmark
from tasks.zoo import zoo, zoo_candidates

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


# One task at a time in this process (runner.kind: local): models are loaded one after another.
@flow(name="ftflow-benchmark", flow_run_name="benchmark {config_path}", validate_parameters=False,
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def benchmark_only(config_path: str = str(DEFAULT_CONFIG), overrides: dict | None = None,
                   progress: bool = True) -> dict:
    """Score every candidate model of one config; returns the plan, the benchmarks and the failures."""
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    out = str(cfg.artifacts_dir)
    device = resolve_device(cfg.device)
    logger.info("config %s -> artifacts in %s, device %s, mapped work on %s", config_path, out, device,
                cfg.runner.kind)

    data = with_storage(prepare_data, out)(cfg.data, artifacts_dir=out)
    if cfg.zoo is not None:
        candidates = zoo_candidates(with_storage(zoo, out)(cfg.zoo, device, artifacts_dir=out, progress=progress))
    else:
        candidates = list(cfg.models)
    plan = with_storage(plan_memory, out)(candidates, data, cfg.memory, cfg.memory_budget_gb, cfg.max_length,
                                          cfg.benchmark.batch_size, device, artifacts_dir=out,
                                          logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens)
    with mapped_runner(cfg.runner) as submit:
        benchmarks, failures = benchmark_candidates(submit, candidates, plan, data, cfg, device, out, progress)
    publish_benchmark(benchmarks, failures, plan)
    return {"plan": plan, "benchmarks": benchmarks, "failures": failures}


def benchmark_candidates(submit: Submit, candidates: list[ModelSpec], plan: dict, data: dict, cfg: PipelineConfig,
                         device: str, artifacts_dir: str, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Benchmark every candidate the plan lets through; returns (manifests, failures).

    A candidate the plan skips, or whose run fails, becomes a failure with its
    reason; the others go on.
    """
    logger = get_run_logger()
    task = with_storage(benchmark, artifacts_dir)
    benchmarks, failures, futures = [], [], []
    for spec in candidates:
        decision = plan["decisions"][spec.name]
        if decision["precision"] is None:
            logger.warning("%s is not benchmarked: %s", spec.name, decision["reason"])
            failures.append({"name": spec.name, "family": spec.family, "precision": spec.precision,
                             "error": decision["reason"]})
            continue
        planned = spec.model_copy(update={"precision": decision["precision"]})
        futures.append((planned, submit(task, spec=planned, data=data, batch_size=decision["batch_size"],
                                        max_length=cfg.max_length, device=device, artifacts_dir=artifacts_dir,
                                        progress=progress, logits_chunk_tokens=cfg.benchmark.logits_chunk_tokens)))
    for spec, future in futures:
        future.wait()
        if future.state.is_completed():
            benchmarks.append(future.result())
        else:
            error = _error_text(future)
            logger.error("benchmark of %s failed, continuing without it: %s", spec.name, error)
            failures.append({"name": spec.name, "family": spec.family, "precision": spec.precision, "error": error})
    return benchmarks, failures


def _error_text(future) -> str:
    try:
        future.result()
    except BaseException as exc:  # the task's own exception, re-raised by Prefect
        return f"{type(exc).__name__}: {exc}"
    return str(future.state.message)


if __name__ == "__main__":
    result = benchmark_only(config_path=sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT_CONFIG))
    for row in result["benchmarks"]:
        print(f"{row['name']:24s} {row['precision']:5s} validation PPL {row['validation']['corpus_ppl']:.3f}")
