"""ftflow status against real runs: it says what a run then does, and why; `ftflow run` skips Prefect when all is cached."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flows.cli
from flows.cli import main
from ftflow.config import load_config
from ftflow.stages.status import pipeline_status
from ftflow.study.recommend import evaluation_answer
from tests.flows.micro import STAGES, micro_config, run_pipeline_runs

ROOT = Path(__file__).resolve().parents[2]
ALPHA = {"distill": {"alpha": 0.25}}


def status_of(config: Path, overrides: dict | None = None):
    return pipeline_status(load_config(config, overrides))


def by_state(status) -> dict[str, set[str]]:
    return {state: {s.label for s in status.stages if s.state == state} for state in ("cached", "run", "after")}


def label(task_run_name: str) -> str:
    """A task run's name as status labels it: Prefect adds a random suffix to tasks without a run name."""
    return task_run_name if "[" in task_run_name else task_run_name.rsplit("-", 1)[0]


def recomputed(runs: dict) -> set[str]:
    return {label(name) for name, (stage, state) in runs.items() if stage in STAGES and state != "Cached"}


@pytest.fixture(scope="module")
def micro(tmp_path_factory, prefect_server) -> tuple[Path, dict]:
    """A micro config after its cold run, and that run's task runs."""
    config = micro_config(tmp_path_factory.mktemp("status"))
    _, runs = run_pipeline_runs(config)
    return config, runs


def test_after_a_run_status_lists_every_stage_run_of_it_as_cached(micro):
    config, runs = micro
    status = status_of(config)
    assert status.nothing_to_run, status.to_text()
    # The same stage runs as the real run made, by their task run names; each in its directory.
    assert by_state(status)["cached"] == {label(name) for name, (stage, _) in runs.items() if stage in STAGES}
    artifacts = config.parent / "artifacts"
    assert all(s.directory == artifacts.resolve() / s.stage / s.key for s in status.stages)
    assert status.evaluation["key"] == status.stages[-1].key and status.stages[-1].label == "evaluate"


class NoPrefect(Exception):
    pass


def _refuse_prefect(*args, **kwargs):
    raise NoPrefect("ftflow run started Prefect")


def test_run_with_nothing_to_do_prints_the_leaderboard_from_disk_without_prefect(micro, monkeypatch, capsys):
    config, _ = micro
    monkeypatch.setattr(flows.cli, "_prefect_api", _refuse_prefect)
    assert main(["run", str(config), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("ftflow: nothing to run, every stage is cached (`ftflow status` lists them); "
                                   "the results below are read from disk and no Prefect run is recorded "
                                   "(--record for one)")
    evaluation = status_of(config).evaluation
    leaderboard = (Path(evaluation["dir"]) / "leaderboard.md").read_text(encoding="utf-8")
    assert leaderboard in captured.out and f"report: {evaluation['dir']}/report.md" in captured.out
    # Asked for a recorded run, or with anything to compute: the real run starts (never a stale leaderboard).
    with pytest.raises(NoPrefect):
        main(["run", str(config), "--no-progress", "--record"])
    with pytest.raises(NoPrefect):
        main(["run", str(config), "--no-progress", "--set", "distill.alpha=0.3"])


def test_a_finished_run_opens_with_its_answer_in_the_report_the_terminal_and_status(micro, monkeypatch, capsys):
    config, _ = micro
    evaluation = status_of(config).evaluation
    recommendation = evaluation["recommendation"]
    name = recommendation["name"]
    report = (Path(evaluation["dir"]) / "report.md").read_text(encoding="utf-8")
    assert report.startswith(f"# micro\n\n## Answer\n\n**Recommended: `{name}`**")
    assert report.index("## Answer") < report.index("## Data") < report.index("## Leaderboard")
    # Every scored model kept its test sentences' scores: each leaderboard row has its interval.
    scored = [row for row in evaluation["leaderboard"] if row["test_ppl"] is not None]
    assert scored and all(row["test_ppl_low"] < row["test_ppl"] < row["test_ppl_high"] for row in scored)
    assert recommendation["comparison"]["metric"] in ("ppl", "bits_per_byte")
    controls = [row for row in evaluation["leaderboard"] if row["role"] == "ablation control"]
    assert all(row["rank"] is None for row in controls) and name not in {row["name"] for row in controls}
    # ftflow run (from disk) and ftflow status print the same answer first.
    monkeypatch.setattr(flows.cli, "_prefect_api", _refuse_prefect)
    assert main(["run", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    answer = evaluation_answer(evaluation, str(config))
    assert out.lstrip("\n").startswith(answer) and answer.startswith("## Answer")
    assert f"`ftflow export {config} --to DIR`" in answer
    assert main(["status", str(config)]) == 0
    assert capsys.readouterr().out.startswith(answer)


def test_export_writes_the_recommended_model_that_reloads_to_its_test_ppl(micro, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftflow.data.splits import read_split
    from ftflow.perplexity import score_sentences

    config, _ = micro
    evaluation = status_of(config).evaluation
    name = evaluation["recommendation"]["name"]
    row = next(r for r in evaluation["leaderboard"] if r["name"] == name)
    assert main(["export", str(config), "--to", str(tmp_path / "best")]) == 0
    assert capsys.readouterr().out.startswith(f"exported {name} ")
    test = read_split(next((config.parent / "artifacts" / "prepare_data").glob("*/test.jsonl")))
    kind = row["kind"]
    if kind == "prefix":  # the adapter on the base its card names
        model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "best")
    else:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    max_length = load_config(config).max_length  # as the run scored it: sentences cut at the same length
    ppl = score_sentences(model, AutoTokenizer.from_pretrained(tmp_path / "best"), test, max_length=max_length,
                          progress=False).corpus_ppl
    # fp32 micro models: merged LoRA, a copied checkpoint or adapter, QLoRA with fp32 compute (see tests/unit/
    # test_export.py for why each tolerance holds).
    assert ppl == pytest.approx(row["test_ppl"], rel=1e-4), kind
    # A named run, and a name that is not in the leaderboard: one ftflow line, nothing written.
    lora = next(r["name"] for r in evaluation["leaderboard"] if r["kind"] == "lora")
    assert main(["export", str(config), lora, "--to", str(tmp_path / "lora")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lora") is not None
    capsys.readouterr()
    assert main(["export", str(config), "no-such-model", "--to", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftflow: no model named 'no-such-model' in this run's leaderboard") and err.count("\n") == 1
    assert not (tmp_path / "none").exists()


def test_a_distillation_field_status_predicts_the_reruns_and_says_why(micro):
    config, _ = micro
    status = status_of(config, ALPHA)
    states = by_state(status)
    assert states["run"] == {"distill[qwen2-student|top2,T1,a0.25,lr5e-05]",
                             "distill[qwen2-student|top4,T1,a0.25,lr5e-05]"}
    assert states["after"] == {"evaluate"}
    for entry in status.stages:
        if entry.state == "run":
            top = entry.label.split("|")[1].split(",")[0]
            assert entry.reasons[0] == "job.alpha changed (config field or parameter)"
            assert entry.reasons[1].startswith(f"(against the closest earlier run: distill[qwen2-student|{top},T1,"
                                               "a0.5,lr5e-05], ")
            assert len(entry.reasons) == 2
    (evaluate,) = [s for s in status.stages if s.label == "evaluate"]
    assert evaluate.after == sorted(states["run"], key=lambda label: label) and evaluate.reasons == []
    # The run then reruns exactly those, and afterwards nothing is left to run.
    _, runs = run_pipeline_runs(config, ALPHA)
    assert recomputed(runs) == states["run"] | {"evaluate"}
    assert status_of(config, ALPHA).nothing_to_run


def test_train_file_content_status_names_the_file_and_puts_the_rest_after_it(micro):
    config, _ = micro
    train = config.parent / "train.txt"
    original = train.read_text(encoding="utf-8")
    try:
        train.write_text(original.replace("\n", " indeed\n", 1), encoding="utf-8")
        status = status_of(config)
    finally:
        train.write_text(original, encoding="utf-8")
    first = status.stages[0]
    assert (first.label, first.state) == ("prepare_data", "run")
    assert first.reasons[0] == "data.train_file: the file's content changed" and len(first.reasons) == 2
    assert [(s.label, s.state, s.after) for s in status.stages[1:4]] == [
        ("augment", "after", ["prepare_data"]), ("zoo", "after", ["prepare_data"]), ("plan_memory", "after", ["zoo"])]
    assert {s.state for s in status.stages[4:]} == {"after"}
    assert all(s.after == ["plan_memory"] for s in status.stages[4:])
    assert status_of(config).nothing_to_run  # the original content: cached again


def test_a_module_source_change_status_names_the_module(micro, tmp_path):
    """In a copy of the code with one line of code added to ftflow/distill/losses.py, through the CLI, without Prefect."""
    config, _ = micro
    for package in ("ftflow", "tasks", "flows"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "ftflow" / "distill" / "losses.py", "a", encoding="utf-8") as handle:
        handle.write("\nCHANGED = True  # a changed line of code (a comment would change no key)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-c", "import sys, flows.cli; code = flows.cli.main(sys.argv[1:]); "
                           "assert 'prefect' not in sys.modules, 'status imported Prefect'; sys.exit(code)",
                           "status", str(config)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"ftflow status: {config} (artifacts in {(config.parent / 'artifacts').resolve()})"
    grid = [i for i, line in enumerate(lines) if line.startswith("will run  lora[qwen2-teacher|")]
    assert len(grid) == 2
    for i in grid:
        assert lines[i + 1] == "              - code of ftflow.distill.losses changed"
        assert lines[i + 2].startswith("              - (against the closest earlier run: lora[qwen2-teacher|")
    # Everything before training is cached; teacher_logits and every later run wait for the grid.
    cached = [line.split()[:2] for line in lines[1:grid[0]]]
    assert cached == [["cached", name] for name in (
        "prepare_data", "augment", "zoo", "plan_memory", "benchmark[granite-student|fp32]",
        "benchmark[granite-teacher|fp32]", "benchmark[qwen2-student|fp32]", "benchmark[qwen2-teacher|fp32]",
        "select_family")]
    after = [line.split("  after ")[0].split(maxsplit=1)[1].strip() for line in lines[grid[-1] + 3:-1]
             if line.startswith("after ")]
    # The distillation teacher is the teacher's best run of any method, so the grid's rerun leaves its choice
    # (and the distillation runs it decides) open: they are one group, after the grid.
    assert after == ["per-model runs (LoRA with the best combination, QLoRA, full, prefix grid)",
                     "teacher_logits (of the teacher's best run)",
                     "distillation runs and the student's full fine-tune at equal steps", "evaluate"]
    distill = lines.index(next(line for line in lines if line.startswith("after     distillation runs")))
    assert lines[distill].endswith("  after " + ", ".join(lines[i].split()[2] for i in grid))
    assert lines[-1] == "2 stage run(s) will run, 4 after them, 9 cached"
