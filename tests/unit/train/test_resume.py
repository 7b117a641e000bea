"""A training run killed with SIGKILL after its first checkpoint resumes from it when started again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftflow.train.trainer import latest_checkpoint

ROOT = Path(__file__).resolve().parents[3]


def worker(directory: Path, sleep: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "tests.train_worker", str(directory), str(sleep)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    # Reference: the same run, never interrupted.
    reference = worker(tmp_path / "reference", 0.0)
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    expected = json.loads(out.strip().splitlines()[-1])  # the last line; the Trainer prints its logs before
    assert expected["resumed_from"] is None

    # Killed once a checkpoint is on disk (and before the run ends).
    killed = worker(tmp_path / "run", 0.3)
    deadline = time.monotonic() + 240
    while latest_checkpoint(tmp_path / "run" / "work" / "trainer") is None:
        assert killed.poll() is None, killed.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    checkpoint = latest_checkpoint(tmp_path / "run" / "work" / "trainer")
    assert int(checkpoint.name.split("-")[1]) < 24  # 4 epochs x 6 steps: it did not finish

    resumed = worker(tmp_path / "run", 0.0)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["resumed_from"] is not None and result["resumed_from"].startswith("checkpoint-")
    assert f"resuming from {result['resumed_from']}" in err
    assert [e["epoch"] for e in result["history"]] == [1, 2, 3, 4]
    # Optimizer, scheduler and RNG states come back with the checkpoint: the same numbers as never stopping.
    for got, want in zip(result["history"], expected["history"]):
        assert got["validation"]["corpus_ppl"] == pytest.approx(want["validation"]["corpus_ppl"], rel=1e-5)
    assert result["best_epoch"] == expected["best_epoch"]
