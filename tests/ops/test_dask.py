"""Mapped work on a real dask.distributed LocalCluster (two worker processes) gives the local runner's results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest

from tests.flows.micro import micro_config
from tests.ops.conftest import REPO, tail, wait_for_task_runs


def same_numbers(a, b, rel=1e-5) -> bool:
    """Equal structures; floats equal to ``rel`` (Dask workers run torch on one thread, the flow on two)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_numbers(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_numbers(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=rel)
    return a == b


def test_benchmarks_on_a_dask_local_cluster_equal_the_local_runners(ops_server, tmp_path):
    config = micro_config(tmp_path)
    result_path, log = tmp_path / "result.json", tmp_path / "flow.log"
    with open(log, "wb") as out:
        # Through -c rather than -m: Dask's spawned workers would import a __main__ module again.
        done = subprocess.run([sys.executable, "-c", "import sys; from tests.ops.dask_flow import main; main(*sys.argv[1:])",
                               str(config), str(tmp_path / "local"), str(tmp_path / "dask"), str(result_path)],
                              cwd=REPO, env=ops_server.env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, tail(log)
    run = json.loads(result_path.read_text())
    assert run["completed"], f"{run['message']}\n{tail(log)}"
    local, dask = run["results"]["local"], run["results"]["dask"]

    assert local["failures"] == dask["failures"] == []
    assert len(local["benchmarks"]) == len(dask["benchmarks"]) == 4
    for mine, theirs in zip(local["benchmarks"], dask["benchmarks"]):
        assert Path(mine["dir"]).parent.parent == tmp_path / "local"
        assert Path(theirs["dir"]).parent.parent == tmp_path / "dask"
        assert mine["key"] == theirs["key"]
        for split in ("validation", "test"):
            assert same_numbers(mine[split], theirs[split]), (mine["name"], split, mine[split], theirs[split])
        per_sentence = [json.loads(Path(m["dir"], "per_sentence.json").read_text()) for m in (mine, theirs)]
        assert same_numbers(*per_sentence), mine["name"]

    # Local work ran in the flow's process; Dask work in the cluster's worker processes.
    assert {p["pid"] for p in local["placements"]} == {run["flow_pid"]}
    assert all(p["worker"] and p["pid"] != run["flow_pid"] for p in dask["placements"])
    # The Dask task runs belong to the flow run and were computed (not read from a cache).
    with ops_server.client() as client:
        task_runs = wait_for_task_runs(client, UUID(run["flow_run_id"]))
    benchmark_runs = [r for r in task_runs if r.name.startswith("benchmark[")]
    assert len(benchmark_runs) == 8 and all(r.state.name == "Completed" for r in benchmark_runs), \
        sorted((r.name, r.state.name) for r in benchmark_runs)


def _halving_summaries(directory: Path, env: dict[str, str], runner: dict) -> list[dict]:
    """The micro study under successive halving (a LoRA grid of 3, 2 distillation variants) run by ``runner``;
    the report's halving summaries, one per grid."""
    import yaml

    from ftflow.config import load_config
    from ftflow.stages.status import pipeline_status

    directory.mkdir()
    config = micro_config(directory)
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["lora"]["r"] = [2, 4, 8]
    raw.update(qlora={"enabled": False}, prefix={"enabled": False}, runner=runner,
               search={"strategy": "halving", "eta": 3, "rungs": [0.25, 0.5]})
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    # Through -c rather than -m: Dask's spawned workers would import a __main__ module again.
    done = subprocess.run([sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))",
                           "run", str(config), "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"mapped work on {runner['kind']}" in done.stdout + done.stderr, done.stderr[-4000:]
    return pipeline_status(load_config(config)).evaluation["halving"]


def test_halving_on_a_dask_local_cluster_keeps_the_local_runners_survivors(ops_server, tmp_path):
    """Issue 28: the same survivors whatever the runner. The rungs of a grid run side by side on two worker
    processes (finishing in any order); the survivors, the winner and each combination's last rung are those of
    the local runner."""
    local = _halving_summaries(tmp_path / "local", ops_server.env, {"kind": "local"})
    dask = _halving_summaries(tmp_path / "dask", ops_server.env,
                              {"kind": "dask", "n_workers": 2, "threads_per_worker": 1})
    assert [s["grid"] for s in local] == [s["grid"] for s in dask] == ["LoRA grid", "distillation variants"]
    for mine, theirs in zip(local, dask):
        assert mine["survivors"] == theirs["survivors"], mine["grid"]
        assert mine["winner"] == theirs["winner"] is not None, mine["grid"]
        assert [(r["name"], r["last_rung"]) for r in mine["rows"]] == [(r["name"], r["last_rung"])
                                                                       for r in theirs["rows"]], mine["grid"]
        # The same training on another process: equal up to float summation order (Dask workers and the flow
        # may run torch on a different number of threads), far below the gaps between the combinations.
        assert same_numbers([r["selection_ppl"] for r in mine["rows"]],
                            [r["selection_ppl"] for r in theirs["rows"]], rel=1e-4), mine["grid"]
