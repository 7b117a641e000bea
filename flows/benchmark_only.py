"""Benchmark only: data -> (zoo) -> memory plan -> perplexity of every candidate -> table artifacts.

The first stages of the pipeline, the very steps ``flows/pipeline.py`` runs (``flows/steps.py``), with the
candidates scored where ``runner`` says (the flow's process, or Dask: see ``flows/scale.py``).
Deployed as ``ftflow-benchmark/benchmark-only`` in ``prefect.yaml``; run it directly with
``python -m flows.benchmark_only [CONFIG]``.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows import DEFAULT_CONFIG
from flows.scale import mapped_runner
from flows.steps import benchmark_candidates, data_candidates_and_plan
from ftflow.config import load_config
from ftflow.models.loading import resolve_device
from ftflow.plan.budget import use_expandable_segments
from tasks.publish_benchmark import publish_benchmark

__all__ = ["benchmark_candidates", "benchmark_only"]  # benchmark_candidates: the pipeline's step (flows/steps.py)


# One task at a time in this process (runner.kind: local): models are loaded one after another.
@flow(name="ftflow-benchmark", flow_run_name="benchmark {config_path}", validate_parameters=False,
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def benchmark_only(config_path: str = str(DEFAULT_CONFIG), overrides: dict | None = None,
                   progress: bool = True) -> dict:
    """Score every candidate model of one config; returns the plan, the benchmarks and the failures."""
    use_expandable_segments()  # before CUDA starts
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    out = str(cfg.artifacts_dir)
    device = resolve_device(cfg.device)
    logger.info("config %s -> artifacts in %s, device %s, mapped work on %s", config_path, out, device,
                cfg.runner.kind)
    data, candidates, plan, _ = data_candidates_and_plan(cfg, device, out, progress)  # zoo checks: logged
    with mapped_runner(cfg.runner) as submit:
        benchmarks, failures = benchmark_candidates(submit, candidates, plan, data, cfg, device, out, progress)
    publish_benchmark(benchmarks, failures, plan)
    return {"plan": plan, "benchmarks": benchmarks, "failures": failures}


if __name__ == "__main__":
    result = benchmark_only(config_path=sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT_CONFIG))
    for row in result["benchmarks"]:
        print(f"{row['name']:24s} {row['precision']:5s} validation PPL {row['validation']['corpus_ppl']:.3f}")
