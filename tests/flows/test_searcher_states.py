"""How many intermediate rung states a halving search keeps at once (flows/steps.py::searcher).

The search runs with a stand-in for the ``train`` task: each rung writes a ``state/`` folder and a manifest as
tasks/train.py does, when the flow waits for it (as the pipeline's one-worker task runner runs tasks in the
order they were submitted). No Prefect engine runs: only the searcher's bookkeeping is under test.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from flows import steps
from ftflow.config import LoraConfig, SearchConfig
from ftflow.study import halving
from ftflow.train.jobs import lora_grid

MODEL = {"name": "m", "path": "m", "family": "f", "precision": "fp32", "trust_remote_code": False}


def _score(name: str, fraction: float) -> float:
    """A selection PPL that falls as the run trains, its level fixed by the combination."""
    level = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16 ** 8
    return 2.0 + level - 0.5 * fraction


class _Lazy:
    """A future whose run happens when the flow first waits for it."""

    def __init__(self, run):
        self._run, self._result = run, None

    def wait(self):
        if self._result is None:
            self._result = self._run()

    @property
    def state(self):
        return type("State", (), {"is_completed": lambda self: True})()

    def result(self):
        self.wait()
        return self._result


@pytest.fixture
def search(tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "get_run_logger", lambda: logging.getLogger("test"))
    peaks: list[int] = []

    def train(job, rung, **_) -> dict:
        fraction = rung["fraction"]
        out = tmp_path / "train" / f"{job.name}@{fraction:g}"
        out.mkdir(parents=True)
        manifest = {"name": job.name, "title": job.title, "job": job.model_dump(mode="json"), "dir": str(out),
                    "rung": {"fraction": fraction, "step": 1, "max_steps": 4, "from_step": 0}}
        if fraction < 1:
            (out / "state").mkdir()
            (out / "state" / "checkpoint.bin").write_bytes(b"x" * 100)
            manifest["state"] = "state"
            manifest["rung"]["selection"] = {"corpus_ppl": _score(job.name, fraction)}
        else:
            manifest["best_validation_ppl"] = _score(job.name, fraction)
        peaks.append(len(list((tmp_path / "train").glob("*/state"))))
        return manifest

    def submit(task, **kwargs):
        return _Lazy(lambda: train(**kwargs))

    def run(config: SearchConfig, jobs):
        grid = steps.searcher(submit, {"name": "main"}, {"artifacts_dir": str(tmp_path / "artifacts")}, config)
        return grid("LoRA grid", jobs)

    return run, peaks, tmp_path


@pytest.mark.parametrize("stratify", [{}, {"lora": ["r"]}])
def test_a_rung_keeps_only_the_states_of_runs_that_may_still_go_on(search, stratify):
    """9 combinations, eta 3: the first rung's states were all kept until the grid ended (9 at once); now a run
    that can no longer go on frees its state as soon as it has finished, and a survivor frees its previous
    rung's once its next rung has: at most the second rung's combinations and the one just finished."""
    run, peaks, root = search
    config = SearchConfig(strategy="halving", eta=3, rungs=(0.25, 0.5), stratify=stratify)
    jobs = lora_grid(LoraConfig(r=[2, 4, 8], alpha=[8, 16, 32], dropout=0.0, learning_rate=1e-3, epochs=1,
                                batch_size=4), MODEL)
    finals, summary = run(config, jobs)
    counts = halving.reaching(halving.stratum_sizes(jobs, config.axes("lora")), config.eta, config.rungs)
    assert counts == ([9, 3, 1] if not stratify else [9, 3, 3])
    assert max(peaks) <= counts[1] + 1 < counts[0]
    # The same survivors and winner as the scores say, and no state left once the grid has finished.
    first = {job.name: _score(job.name, 0.25) for job in jobs}
    strata = {job.name: halving.stratum(job, config.axes("lora")) for job in jobs} if stratify else None
    assert summary["survivors"][0] == halving.survivors(first, 3, strata)
    assert {r["name"] for r in finals} == set(summary["survivors"][1])
    assert not list((root / "train").glob("*/state")) and len(peaks) == sum(counts)
