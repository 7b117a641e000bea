"""Where mapped work runs (benchmark candidates, grid combinations): the flow's own runner, or Dask.

``runner.kind: local`` submits to the flow's task runner (one task at a time in
the flow's process). ``runner.kind: dask`` submits to prefect-dask's
``DaskTaskRunner``: an existing cluster at ``runner.address``, or a
``distributed.LocalCluster`` with ``n_workers`` processes of
``threads_per_worker`` threads started for the block and closed after it.
``runner.resources`` (e.g. ``{GPU: 1}``) is declared on every task submitted,
so Dask runs it only on a worker started with that resource
(``dask worker tcp://scheduler:8786 --resources GPU=1``); a LocalCluster gives
each of its workers those resources.

Tasks run in Dask's worker processes, possibly on other machines: their inputs
and outputs (data splits, checkpoints, Prefect's result records, stage locks)
are paths under ``artifacts_dir``, which must be storage every worker sees at
the same path.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

from prefect.futures import PrefectFuture
from prefect.utilities.callables import get_call_parameters

from ftflow.config import RunnerConfig

Submit = Callable[..., PrefectFuture]


@contextmanager
def mapped_runner(runner: RunnerConfig) -> Iterator[Submit]:
    """Yield ``submit(task, **kwargs) -> PrefectFuture`` that runs tasks where ``runner`` says.

    Call it inside a flow run. Resolve the futures (``.wait()``, ``.result()``,
    ``.state``) inside the block: with ``kind: dask`` a LocalCluster is closed when
    the block ends, after every submitted task has finished.
    """
    if runner.kind == "local":
        yield lambda task, **kwargs: task.submit(**kwargs)
        return

    dask_runner = dask_task_runner(runner)
    submitted: list[PrefectFuture] = []

    def submit(task, **kwargs: Any) -> PrefectFuture:
        parameters = get_call_parameters(task.fn, (), kwargs)
        with _annotate_resources(runner.resources):
            future = dask_runner.submit(task, parameters=parameters)
        submitted.append(future)
        return future

    with dask_runner:
        yield submit
        # The cluster must outlive its work, even work whose future nobody waited for.
        for future in submitted:
            future.wait()


def dask_task_runner(runner: RunnerConfig):
    """prefect-dask's ``DaskTaskRunner`` for ``runner`` (an existing cluster, or a LocalCluster)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # optional at import time; listed in pyproject's dependencies
        raise RuntimeError("runner.kind: dask needs prefect-dask: pip install 'prefect-dask>=0.3'") from exc
    if runner.address is not None:
        return DaskTaskRunner(address=runner.address)
    cluster_kwargs: dict[str, Any] = dict(n_workers=runner.n_workers, threads_per_worker=runner.threads_per_worker,
                                          processes=True)
    if runner.resources:
        cluster_kwargs["resources"] = dict(runner.resources)
    return DaskTaskRunner(cluster_kwargs=cluster_kwargs)


def _annotate_resources(resources: dict[str, float]):
    """Dask annotations for the tasks submitted inside: the resources each one claims on a worker."""
    if not resources:
        return nullcontext()
    import dask

    return dask.annotate(resources=dict(resources))
