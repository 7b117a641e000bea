"""A finished artifacts directory can be copied or moved: every stage is Cached there, reading its own files."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from flows.cli import main
from ftflow.config import load_config
from ftflow.stages.status import pipeline_status
from tests.flows.micro import STAGES, micro_config, run_pipeline_runs

# One run per method: a short cold run that still has every stage.
FEWER_RUNS = {"lora": {"r": [2]}, "qlora": {"enabled": False}, "prefix": {"enabled": False}, "distill": {"top_k": [2]}}


def test_a_copied_directory_whose_original_is_deleted_is_all_cached_with_the_same_report(tmp_path, prefect_server,
                                                                                        capsys):
    (tmp_path / "project").mkdir()
    config = micro_config(tmp_path / "project")
    raw = yaml.safe_load(config.read_text())
    for section, values in FEWER_RUNS.items():
        raw[section].update(values)
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    _, cold = run_pipeline_runs(config)
    assert {state for stage, state in cold.values() if stage in STAGES} == {"Completed"}
    original = tmp_path / "project" / "artifacts"
    report = pipeline_status(load_config(config)).evaluation
    report_text = Path(report["dir"], report["files"]["report"]).read_text(encoding="utf-8")

    # As the README says to make a writable copy, then the original removed (a folder renamed, another mount).
    copy = tmp_path / "elsewhere" / "artifacts-copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    moved = {"artifacts_dir": str(copy)}
    status = pipeline_status(load_config(config, moved))
    assert status.nothing_to_run, status.to_text()
    assert all(copy.resolve() in s.directory.parents for s in status.stages)

    _, rerun = run_pipeline_runs(config, moved)
    assert {state for stage, state in rerun.values() if stage in STAGES} == {"Cached"}, rerun
    assert main(["run", str(config), "--set", f"artifacts_dir={copy}", "--no-progress"]) == 0
    shown = Path(capsys.readouterr().out.split("report: ")[1].splitlines()[0])
    assert shown == copy.resolve() / "evaluate" / report["key"] / report["files"]["report"]
    assert shown.read_text(encoding="utf-8") == report_text
    # No manifest in the copy names the original (Prefect's record metadata aside: where it was first written).
    for path in [*copy.rglob("manifest.json"), *copy.rglob("prefect-result.json")]:
        text = path.read_text(encoding="utf-8").replace(f'"storage_key":"{original.resolve()}', "")
        assert str(original.resolve()) not in text, path
