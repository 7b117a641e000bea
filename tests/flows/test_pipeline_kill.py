"""A pipeline process killed (SIGKILL) while it trains: running again resumes that run from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from ftflow.train.trainer import latest_checkpoint
from tests.flows.micro import STAGES, micro_config, run_pipeline_runs

ROOT = Path(__file__).resolve().parents[2]
# Long enough LoRA runs (3 steps per epoch, a checkpoint every step) that a kill lands mid-run.
SLOW_GRID = {"lora": {"epochs": 15}, "training": {"checkpoint_steps": 1}}


def checkpoints(artifacts: Path) -> list[Path]:
    """Checkpoints of unfinished training runs (their work directories)."""
    return [c for work in (artifacts / "train").glob(".*.work") if (c := latest_checkpoint(work / "trainer"))]


def test_killed_pipeline_resumes_the_interrupted_training_run(tmp_path, prefect_server):
    config = micro_config(tmp_path)
    artifacts = tmp_path / "artifacts"
    overrides = ["--set", "lora.epochs=15", "--set", "training.checkpoint_steps=1"]
    # The child talks to this session's Prefect server, so it does not start its own.
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=PREFECT_API_URL.value())
    child = subprocess.Popen([sys.executable, "-m", "flows.pipeline", str(config), *overrides, "--no-progress"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoints(artifacts):
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training checkpoint appeared"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    (interrupted,) = checkpoints(artifacts)
    run_dir = interrupted.parents[2] / interrupted.parents[1].name[1:].removesuffix(".work")
    assert not run_dir.exists()  # the run did not finish

    _, runs = run_pipeline_runs(config, SLOW_GRID)
    upstream = {"prepare_data", "augment", "zoo", "plan_memory", "benchmark", "select_family"}
    assert all(state == "Cached" for stage, state in runs.values() if stage in upstream)
    assert {stage for stage, _ in runs.values()} >= STAGES
    assert (run_dir / "manifest.json").is_file() and not interrupted.exists()
    manifest = (run_dir / "manifest.json").read_text()
    assert '"resumed_from": "checkpoint-' in manifest
    # Nothing of the killed run is left behind: no temporary output directory, no failure record.
    assert not list(artifacts.glob("*/.*.partial"))
    assert sorted(p.name for p in artifacts.iterdir() if p.is_file()) == []
