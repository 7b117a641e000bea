"""The flow of tests/ops/test_dask.py, run in its own process against the test server:
one micro config's candidates benchmarked by the local runner and by Dask, into separate directories."""

from __future__ import annotations

import json
import os
import sys

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.benchmark_only import benchmark_candidates
from flows.scale import mapped_runner
from ftflow.config import RunnerConfig, load_config
from ftflow.stages import calls as stages
from ftflow.stages.calls import zoo_candidates
from tasks._stage import with_storage
from tasks.plan_memory import plan_memory
from tasks.prepare_data import prepare_data
from tasks.zoo import zoo

# Every benchmark claims one "GPU"; the LocalCluster gives each worker one, so each runs one at a time.
DASK = RunnerConfig(kind="dask", n_workers=2, threads_per_worker=1, resources={"GPU": 1})


@task(name="where")
def where() -> dict:
    """The process a task ran in, and the Dask worker running it (None outside Dask)."""
    import distributed

    try:
        worker = distributed.get_worker().address
    except ValueError:
        worker = None
    return {"pid": os.getpid(), "worker": worker}


@flow(name="benchmark-two-runners", task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=False)
def benchmark_on_both(config_path: str, local_dir: str, dask_dir: str) -> dict:
    """Shared inputs, then every candidate benchmarked by the local runner and by Dask."""
    cfg = load_config(config_path)
    out = str(cfg.artifacts_dir)
    data = with_storage(prepare_data, out)(cfg.data, artifacts_dir=out)
    candidates = zoo_candidates(with_storage(zoo, out)(**stages.zoo_call(cfg, data, "cpu", out, False)))
    plan = with_storage(plan_memory, out)(candidates, data, cfg.memory, cfg.memory_budget_gb, cfg.max_length,
                                          cfg.benchmark.batch_size, "cpu", artifacts_dir=out)
    results = {}
    for name, runner, directory in (("local", RunnerConfig(), local_dir), ("dask", DASK, dask_dir)):
        with mapped_runner(runner) as submit:
            benchmarks, failures = benchmark_candidates(submit, candidates, plan, data, cfg, "cpu", directory,
                                                        progress=False)
            placements = [future.result() for future in [submit(where) for _ in range(2)]]
        results[name] = {"benchmarks": benchmarks, "failures": failures, "placements": placements}
    return results


def main(config_path: str, local_dir: str, dask_dir: str, result_path: str) -> None:
    state = benchmark_on_both(config_path, local_dir, dask_dir, return_state=True)
    done = state.is_completed()
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump({"completed": done, "message": state.message, "flow_pid": os.getpid(),
                   "flow_run_id": str(state.state_details.flow_run_id),
                   "results": state.result() if done else None}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:5])
