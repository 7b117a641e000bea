"""ftflow status without a run: stage calls shared with the tasks, key parts, and the reasons they give."""

from __future__ import annotations

import importlib
import inspect

import pytest

from ftflow.stages import calls as stages
from ftflow.stages.caching import NOT_IN_KEY, key_and_parts, key_inputs, library_versions, module_hashes, stage_key
from ftflow.config import load_config
from ftflow.stages.status import explain_changes, pending_labels, _pending

STAGE_TASKS = {
    "prepare_data": "prepare_data", "augment": "augment", "zoo": "zoo", "plan_memory": "plan_memory",
    "benchmark": "benchmark", "select_family": "select_family", "train": "train",
    "teacher_logits": "teacher_logits", "evaluate": "evaluate",
}


def _task(stage: str):
    module = importlib.import_module(f"tasks.{stage}")
    return module, getattr(module, STAGE_TASKS[stage])


@pytest.mark.parametrize("stage", sorted(STAGE_TASKS))
def test_each_task_module_is_where_status_starts_its_code_key(stage):
    module, task = _task(stage)
    assert module.STAGE == stage and module.MODULES == stages.task_modules(stage)
    assert task.cache_policy.stage == stage and task.cache_policy.modules == stages.task_modules(stage)


def _calls(cfg) -> dict[str, dict]:
    """One call of every stage built by ftflow.stages, with stand-in manifests."""
    data = {"stage": "prepare_data", "fingerprint": "d" * 20, "dir": "d",
            "files": {name: f"{name}.jsonl" for name in ("train", "validation", "test")}}
    spec = cfg.models[0]
    common = stages.train_common(cfg, data, "cpu", 4, "artifacts", False)
    from ftflow.train.jobs import full_job

    job = full_job(cfg.finetune, spec.model_dump(mode="json"))
    return {
        "prepare_data": stages.prepare_data_call(cfg, "artifacts"),
        "augment": stages.augment_call(cfg.augment, data, "artifacts"),
        "zoo": stages.zoo_call(load_config("configs/demo.yaml"), data, "cpu", "artifacts", False),
        "plan_memory": stages.plan_memory_call(cfg, list(cfg.models), data, "cpu", "artifacts"),
        "benchmark": stages.benchmark_call(cfg, spec, 4, data, "cpu", "artifacts", False),
        "select_family": stages.select_family_call(cfg, [], "artifacts"),
        "train": stages.train_call(common, job, data),
        "teacher_logits": stages.teacher_logits_call(cfg, data, {}, data, "cpu", "artifacts", False, "topk"),
        "evaluate": stages.evaluate_call(cfg, data, data, [], [], {}, [], "x", {}, "artifacts"),
    }


def test_every_stage_call_passes_every_parameter_of_its_task():
    """Prefect's key sees a task's defaults too: a call that left one out would give status another key."""
    cfg = load_config("configs/seed-20gb.yaml")
    for stage, call in _calls(cfg).items():
        _, task = _task(stage)
        assert set(call) == set(inspect.signature(task.fn).parameters), stage


def test_report_to_and_where_a_run_goes_are_not_in_any_key():
    assert NOT_IN_KEY == {"artifacts_dir", "progress", "checkpoint_steps", "report_to"}
    call = _calls(load_config("configs/seed-20gb.yaml"))["train"]
    assert stages.key_of("train", call)[0] == stages.key_of("train", {**call, "report_to": ["tensorboard"]})[0]
    assert stages.key_of("train", call)[0] != stages.key_of("train", {**call, "seed": call["seed"] + 1})[0]


def test_key_parts_record_fields_by_hash_and_upstream_stages_by_fingerprint(tmp_path):
    secret = "hf_abcdefghijklmnopqrstuvwxyz"
    data_file = tmp_path / "train.txt"
    data_file.write_text("one\n", encoding="utf-8")
    inputs = {"token": secret, "settings": {"alpha": 0.5, "top_k": [2, 4]}, "train_file": data_file,
              "data": {"stage": "prepare_data", "fingerprint": "f" * 20, "dir": "/x"}}
    key, parts = key_and_parts("demo", inputs, ("tasks.select_family",))
    assert key == stage_key("demo", inputs, ("tasks.select_family",))
    assert secret not in repr(parts)
    assert parts["inputs"] == {
        "token": {"kind": "value", "hash": "87940122a97e7372"},
        "settings.alpha": {"kind": "value", "hash": "d2cbad71ff333de6"},
        "settings.top_k[0]": {"kind": "value", "hash": "d4735e3a265e16ee"},
        "settings.top_k[1]": {"kind": "value", "hash": "4b227777d4dd1fc6"},
        "train_file": {"kind": "file", "hash": "2c8b08da5ce60398"},  # sha256 of b"one\n"
        "data": {"kind": "upstream", "stage": "prepare_data", "fingerprint": "f" * 20},
    }
    assert set(parts["code"]) == set(module_hashes(("tasks.select_family",)))
    assert "ftflow.study.selection" in parts["code"] and "tasks._stage" in parts["code"]
    assert parts["libraries"] == library_versions()


def test_explain_changes_names_each_changed_part():
    old = {"inputs": {"job.alpha": {"kind": "value", "hash": "a"},
                      "job.epochs": {"kind": "value", "hash": "e"},
                      "data.train_file": {"kind": "file", "hash": "1"},
                      "train_set": {"kind": "upstream", "stage": "augment", "fingerprint": "old"},
                      "teacher_topk": {"kind": "upstream", "stage": "teacher_logits", "fingerprint": "t"},
                      "gone": {"kind": "value", "hash": "g"}},
           "code": {"ftflow.distill": "1", "ftflow.train.trainer": "2", "ftflow.old": "3"},
           "libraries": {"torch": "2.4.0", "peft": "0.17.0"}}
    new = {"inputs": {"job.alpha": {"kind": "value", "hash": "b"},
                      "job.epochs": {"kind": "value", "hash": "e"},
                      "data.train_file": {"kind": "file", "hash": "2"},
                      "train_set": {"kind": "upstream", "stage": "augment", "fingerprint": "new"},
                      "teacher_topk": {"kind": "upstream", "stage": "teacher_logits", "fingerprint": None},
                      "added": {"kind": "value", "hash": "n"}},
           "code": {"ftflow.distill": "9", "ftflow.train.trainer": "2", "ftflow.new": "4"},
           "libraries": {"torch": "2.5.0", "peft": "0.17.0"}}
    assert explain_changes(old, new) == [
        "added: a new input (config field or parameter)",
        "data.train_file: the file's content changed",
        "gone: no longer an input",
        "job.alpha changed (config field or parameter)",
        "upstream augment (train_set) is another result: old -> new",
        "code of ftflow.distill changed",
        "code: now reaches ftflow.new",
        "code: no longer reaches ftflow.old",
        "library torch 2.4.0 -> 2.5.0",
    ]  # teacher_topk will be recomputed first: the caller says "after teacher_logits", not a change
    assert explain_changes(old, old) == []


def test_pending_labels_finds_placeholders_in_calls_and_lists():
    grid = [{"stage": "train", "fingerprint": "k", "dir": "/x"}, _pending("train", "lora[a]"), _pending("train", "lora[b]")]
    assert pending_labels(grid) == ["lora[a]", "lora[b]"]
    call = {"data": _pending("prepare_data", "prepare_data"), "benchmarks": [_pending("benchmark", "benchmark[x]")],
            "job": {"name": "not a manifest"}}
    assert pending_labels(call) == ["prepare_data", "benchmark[x]"]
    assert pending_labels({"data": {"stage": "prepare_data", "fingerprint": "k"}}) == []
    assert key_inputs({"artifacts_dir": "a", "progress": True, "seed": 1}) == {"seed": 1}


def _finished(directory, stage: str, key: str, parts: dict) -> None:
    """A stage directory as run_stage leaves it (one output file, the manifest with its record), no Prefect record."""
    from ftflow.artifacts import MANIFEST, OUTPUTS, record_outputs, write_json

    directory.mkdir(parents=True)
    (directory / "train.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    (directory / "validation.jsonl").write_text('{"text": "v"}\n', encoding="utf-8")
    manifest = {"files": {"train": "train.jsonl", "validation": "validation.jsonl"}, "stats": {}, "stage": stage,
                "key": key, "fingerprint": key,
                "dir": str(directory), "key_parts": parts}
    manifest[OUTPUTS] = record_outputs(directory)
    write_json(directory / MANIFEST, manifest)


def test_status_of_a_stage_missing_unrecorded_cached_and_damaged(tmp_path):
    from ftflow.stages.caching import PREFECT_RECORD
    from ftflow.stages.status import pipeline_status

    cfg = load_config("configs/demo.yaml", {"artifacts_dir": str(tmp_path / "artifacts"), "device": "cpu"})
    artifacts = (tmp_path / "artifacts").resolve()
    status = pipeline_status(cfg)
    assert [(s.label, s.state, s.after) for s in status.stages] == [
        ("prepare_data", "run", []), ("augment", "after", ["prepare_data"]), ("zoo", "after", ["prepare_data"]),
        ("plan_memory", "after", ["zoo"]),
        ("benchmark (every candidate the memory plan lets through)", "after", ["plan_memory"]),
        ("select_family", "after", ["plan_memory"]),
        ("training runs (LoRA grid, per-model runs, distillation, ablation)", "after", ["plan_memory"]),
        ("teacher_logits", "after", ["plan_memory"]), ("evaluate", "after", ["plan_memory"])]
    assert status.stages[0].reasons == [
        "not on disk (never computed for these inputs, or its directory was deleted); no other run of "
        f"prepare_data in {artifacts / 'prepare_data'} to compare with"]
    assert not status.nothing_to_run and status.evaluation is None

    # Finished but without Prefect's record (a run killed between the two): the run reuses the outputs,
    # so what reads them has a key already.
    key, parts = stages.key_of("prepare_data", stages.prepare_data_call(cfg, str(cfg.artifacts_dir)))
    final = artifacts / "prepare_data" / key
    _finished(final, "prepare_data", key, parts)
    first, second = pipeline_status(cfg).stages[:2]
    assert (first.state, first.reasons) == ("run", [f"its outputs are in {final} without Prefect's cache record: "
                                                    "the run reuses them"])
    assert (second.label, second.state, second.after) == ("augment", "run", [])

    (final / PREFECT_RECORD).write_text("{}", encoding="utf-8")
    first = pipeline_status(cfg).stages[0]
    assert (first.state, first.directory, first.reasons) == ("cached", final, [])
    assert pipeline_status(cfg).cached_labels == ["prepare_data"]

    (final / "train.jsonl").write_text('{"text": "b"}\n', encoding="utf-8")  # same size, other content
    first, second = pipeline_status(cfg).stages[:2]
    assert first.state == "run" and first.reasons == [
        f"its outputs in {final} failed verification ({final / 'train.jsonl'} has the right size but not the "
        "content that was written (SHA-256 differs)): the run moves them aside and computes it again"]
    assert (second.state, second.after) == ("after", ["prepare_data"])

    # Another synthetic seed: compared with the run on disk, the one field that changed is named.
    reseeded = load_config("configs/demo.yaml", {"artifacts_dir": str(tmp_path / "artifacts"), "device": "cpu",
                                                 "data": {"synthetic": {"seed": 7}}})
    first = pipeline_status(reseeded).stages[0]
    assert first.reasons == ["data.synthetic.seed changed (config field or parameter)",
                             f"(against the closest earlier run: prepare_data, {final})"]


def test_the_zoos_key_follows_the_split_files_it_reads_by_content(tmp_path):
    """The zoo reads the training split (zoo.task_text) and the selection split (its teacher check): a change
    to either rebuilds it; the test split and the file's place do not."""
    cfg = load_config("configs/demo.yaml")

    def key(directory, texts: dict[str, str], config=cfg) -> str:
        directory.mkdir(exist_ok=True)
        for name in ("train", "validation", "test"):
            (directory / f"{name}.jsonl").write_text(texts.get(name, f'{{"text": "{name}"}}\n'), encoding="utf-8")
        data = {"stage": "prepare_data", "fingerprint": directory.name, "dir": str(directory),
                "files": {name: f"{name}.jsonl" for name in ("train", "validation", "test")}}
        return stages.key_of("zoo", stages.zoo_call(config, data, "cpu", "artifacts", False))[0]

    base = key(tmp_path / "a", {})
    assert key(tmp_path / "b", {}) == base  # another prepare_data directory with the same contents
    assert key(tmp_path / "c", {"test": '{"text": "other test"}\n'}) == base
    assert key(tmp_path / "d", {"train": '{"text": "other train"}\n'}) != base
    assert key(tmp_path / "e", {"validation": '{"text": "other validation"}\n'}) != base
    no_task_text = load_config("configs/demo.yaml", {"zoo": {"task_text": False}})
    assert (key(tmp_path / "f", {}, no_task_text)
            == key(tmp_path / "g", {"train": '{"text": "other train"}\n'}, no_task_text))


def test_a_command_on_a_finished_run_is_refused_before_the_run_finished(tmp_path):
    from ftflow.errors import UserError
    from ftflow.stages.status import NoFinishedRunError, finished_evaluation

    cfg = load_config("configs/demo.yaml", {"artifacts_dir": str(tmp_path / "artifacts"), "device": "cpu"})
    with pytest.raises(NoFinishedRunError) as caught:
        finished_evaluation(cfg, "my.yaml")
    assert isinstance(caught.value, UserError)  # ftflow export: one "ftflow:" line, exit 2
    assert str(caught.value) == (f"my.yaml has no finished run in {cfg.artifacts_dir} (its report is not there for "
                                 "this config): run it first, `ftflow run my.yaml`; `ftflow status my.yaml` says what "
                                 "is left")
