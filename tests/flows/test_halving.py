"""The micro pipeline under successive halving: rungs as cached train runs, survivors carried on, the report's table.

One cold run: a LoRA grid of 3 combinations, the prefix grid of one (halving is a no-op there) and 2
distillation variants, eta 3 (one survivor a rung), rungs 1/4 and 1/2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftflow.artifacts import MANIFEST
from ftflow.config import load_config
from ftflow.stages.status import pipeline_status
from tests.flows.micro import micro_config, run_pipeline_runs

RUNGS = ("0.25", "0.5", "1")


@pytest.fixture(scope="module")
def halved(tmp_path_factory, prefect_server) -> tuple[Path, dict]:
    config = micro_config(tmp_path_factory.mktemp("halving"))
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["lora"]["r"] = [2, 4, 8]
    raw["search"] = {"strategy": "halving", "eta": 3, "rungs": [0.25, 0.5]}
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    _, runs = run_pipeline_runs(config)
    return config, runs


def _rungs(runs: dict, method: str) -> dict[str, list[str]]:
    """Task run names of one method's rungs, by rung."""
    return {rung: sorted(name for name in runs if name.startswith(method) and name.endswith(f" @ rung {rung}"))
            for rung in RUNGS}


def _name(title: str) -> str:
    """A rung's task run name as the job's name: ``lora[m|r2,...] @ rung 1`` -> ``m+lora[r2,...]``."""
    method, rest = title.split(" @ ")[0].split("[", 1)
    model, settings = rest.rstrip("]").split("|", 1)
    return f"{model}+{method}[{settings}]"


def _manifests(config: Path, suffix: str, method: str) -> list[dict]:
    status = pipeline_status(load_config(config))
    return [json.loads((s.directory / MANIFEST).read_text(encoding="utf-8")) for s in status.stages
            if s.stage == "train" and s.label.startswith(method) and s.label.endswith(suffix)]


def test_every_combination_reaches_the_first_rung_and_the_best_third_go_on(halved):
    config, runs = halved
    lora = _rungs(runs, "lora[")
    assert [len(lora[r]) for r in RUNGS] == [3, 1, 1]
    assert _name(lora["0.5"][0]) == _name(lora["1"][0])
    assert [len(names) for names in _rungs(runs, "distill[").values()] == [2, 1, 1]
    # A grid of one (the prefix grid here) trains once, as in grid mode.
    prefix = [name for name in runs if name.startswith("prefix[")]
    assert len(prefix) == 1 and "@ rung" not in prefix[0]

    # The survivor of the first rung: the lowest selection PPL at its step (ties: by name).
    first = _manifests(config, "@ rung 0.25", "lora[")
    scores = sorted((m["rung"]["selection"]["corpus_ppl"], m["name"]) for m in first)
    assert len(first) == 3 and scores[0][1] == _name(lora["0.5"][0])
    assert all(m["rung"]["step"] < m["rung"]["max_steps"] for m in first)

    evaluation = pipeline_status(load_config(config)).evaluation
    summaries = {s["grid"]: s for s in evaluation["halving"]}
    assert set(summaries) == {"LoRA grid", "distillation variants"}
    summary = summaries["LoRA grid"]
    assert summary["winner"] == _name(lora["1"][0]) and summary["survivors"][0] == [summary["winner"]]
    assert [(r["name"], r["last_rung"]) for r in summary["rows"]][0] == (summary["winner"], 1.0)
    assert sorted(r["last_rung"] for r in summary["rows"]) == [0.25, 0.25, 1.0]
    # Of 3 whole runs, halving trained 3 x 1/4 + 1/4 + 1/2 = 1.5 (steps are whole: a rung's step rounds up).
    assert 1.5 / 3 <= summary["ratio"]["tokens"] < 1.0
    report = (Path(evaluation["dir"]) / "report.md").read_text(encoding="utf-8")
    assert "Successive halving: LoRA grid" in report and "Successive halving: distillation variants" in report
    # The final rung wrote what a grid-mode run writes: a model, scored on test, ranked in the leaderboard.
    row = next(row for row in evaluation["leaderboard"] if row["name"] == summary["winner"])
    assert row["test_ppl"] is not None


def test_status_lists_the_rungs_cached_and_a_new_combination_trains_only_its_own_first_rung(halved):
    config, runs = halved
    status = pipeline_status(load_config(config))
    assert status.nothing_to_run, status.to_text()
    labels = {s.label for s in status.stages if s.stage == "train"}
    assert {name for name, (stage, _) in runs.items() if stage == "train"} == labels
    assert any(label.endswith("@ rung 0.25") for label in labels)

    added = pipeline_status(load_config(config, {"lora": {"r": [2, 4, 8, 16]}}))
    will_run = [s.label for s in added.stages if s.state == "run"]
    assert len(will_run) == 1, added.to_text()
    assert will_run[0].startswith("lora[") and "|r16," in will_run[0] and will_run[0].endswith(" @ rung 0.25")
    # Every rung of the other combinations is cached; what comes after the new rung waits for its score.
    cached = {s.label for s in added.stages if s.state == "cached"}
    assert {label for label in labels if label.startswith("lora[") and "@ rung 0.25" in label} <= cached
    assert any(s.state == "after" for s in added.stages)


def test_an_intermediate_rung_keeps_no_model_and_its_state_until_its_grid_has_finished(halved):
    config, runs = halved
    status = pipeline_status(load_config(config))
    entry = next(s for s in status.stages if s.label.endswith("@ rung 0.25"))
    manifest = json.loads((entry.directory / MANIFEST).read_text(encoding="utf-8"))
    # The state is a transient output: freed once the grid's last rung had finished, the rung still verifies.
    assert manifest["files"] == {} and manifest["state"] == "state" and manifest["transient"] == ["state"]
    assert not (entry.directory / "state").exists() and entry.state == "cached"
    assert not any(path.startswith("state/") for path in manifest["outputs"])
    assert manifest["rung"]["fraction"] == 0.25 and 1 <= manifest["rung"]["step"] < manifest["rung"]["max_steps"]
    assert "test" not in manifest and manifest["compute"]["epoch_tokens"] > 0


def test_a_rung_whose_previous_state_was_freed_trains_from_step_0(halved):
    """eta 2 lets two of the LoRA grid's three combinations through the first rung: the second one's state was
    freed when the grid finished under eta 3, so its rung 1/2 trains from the start to its step."""
    config, _ = halved
    before = {m["name"]: m for m in _manifests(config, "@ rung 0.5", "lora[")}
    assert len(before) == 1 and before[next(iter(before))]["rung"]["from_step"] >= 1  # resumed from rung 1/4
    _, again = run_pipeline_runs(config, {"search": {"eta": 2}})
    trained = sorted(name for name, (stage, state) in again.items()
                     if stage == "train" and state != "Cached" and " @ rung " in name)
    # The new rung 1/2 (and its rung 1 when it leads there); every rung 1/4 is cached. (A new LoRA grid winner
    # also retrains the per-model runs, which take its settings.)
    assert trained and trained[0].startswith("lora[") and trained[0].endswith(" @ rung 0.5"), trained
    assert all(name.startswith("lora[") and name.endswith((" @ rung 0.5", " @ rung 1")) for name in trained), trained
    status = pipeline_status(load_config(config, {"search": {"eta": 2}}))
    assert status.nothing_to_run, status.to_text()
    second = {m["name"]: m for m in (json.loads((s.directory / MANIFEST).read_text(encoding="utf-8"))
                                     for s in status.stages if s.stage == "train" and s.label.startswith("lora[")
                                     and s.label.endswith("@ rung 0.5"))}
    assert len(second) == 2 and before.keys() < second.keys()
    (new,) = [m for name, m in second.items() if name not in before]
    old = before[next(iter(before))]
    assert new["rung"]["from_step"] == 0 and new["rung"]["step"] == old["rung"]["step"]
    summary = next(s for s in status.evaluation["halving"] if s["grid"] == "LoRA grid")
    assert set(summary["survivors"][0]) == set(second)
    # The grid has finished again: every intermediate state is freed.
    assert not any((s.directory / "state").exists() for s in status.stages if "@ rung 0." in s.label)


def test_a_stratified_grid_keeps_each_strata_best_to_the_end(halved):
    """search.stratify: the LoRA grid stratified by rank makes each of its three combinations a stratum of one,
    so every one goes on to the end (eta 3 keeps ceil(1/3) = 1 of each); status knows it before the run."""
    config, _ = halved
    strata = {"search": {"stratify": {"lora": ["r"]}}}
    before = pipeline_status(load_config(config, strata))
    assert any(s.state == "run" and s.label.startswith("lora[") and " @ rung 0.5" in s.label for s in before.stages)
    _, again = run_pipeline_runs(config, strata)
    status = pipeline_status(load_config(config, strata))
    assert status.nothing_to_run, status.to_text()
    lora = _rungs({s.label: None for s in status.stages if s.stage == "train"}, "lora[")
    assert [len(lora[r]) for r in RUNGS] == [3, 3, 3]
    summary = next(s for s in status.evaluation["halving"] if s["grid"] == "LoRA grid")
    assert summary["stratify"] == ["r"] and [len(kept) for kept in summary["survivors"]] == [3, 3, 3]
    assert all(row["survived"] for row in summary["rows"])
    report = (Path(status.evaluation["dir"]) / "report.md").read_text(encoding="utf-8")
    assert "survivors chosen within each r; they meet at the end" in report
