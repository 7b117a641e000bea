"""`ftflow run` end to end (in this process, on the session's Prefect server): a read-only artifacts directory,
and the final summary of models that failed."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from ftflow.config import ZooConfig, load_config
from ftflow.models.zoo import build_zoo
from ftflow.stages.status import pipeline_status
from tests.flows.micro import BIGGER, SIZE, write_data


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """Two working models of one family, a checkpoint that cannot load, and configs naming them."""
    directory = tmp_path_factory.mktemp("cli-run")
    write_data(directory)
    zoo = ZooConfig(vocab_size=300, corpus_sentences=200, pretrain_steps=3, batch_size=8, max_length=32,
                    families=[{"name": "granite", "architecture": "granite", "student": SIZE, "teacher": BIGGER}])
    built = build_zoo(zoo, (directory / "train.txt").read_text().splitlines() * 4, directory / "checkpoints",
                      progress=False, log=lambda *a: None)
    members = {m["role"]: m["path"] for m in built["families"][0]["members"]}
    ghost = directory / "ghost-model"  # a config (so it is planned and passes the path check), no weights
    ghost.mkdir()
    shutil.copy(Path(members["student"]) / "config.json", ghost / "config.json")
    models = [{"name": "small", "path": str(members["student"]), "family": "granite"},
              {"name": "large", "path": str(members["teacher"]), "family": "granite"}]
    base = {
        "name": "cli micro", "device": "cpu", "max_length": 32,
        "data": {"train_file": "train.txt", "test_file": "test.txt", "validation_fraction": 0.2},
        "augment": {"enabled": False},
        "lora": {"epochs": 1, "batch_size": 16}, "qlora": {"enabled": False}, "prefix": {"enabled": False},
        "distill": {"epochs": 1, "batch_size": 16, "top_k": 3, "require_better_teacher": False}, "finetune": {"epochs": 1, "batch_size": 16},
    }
    good, broken = directory / "good.yaml", directory / "broken.yaml"
    good.write_text(yaml.safe_dump({**base, "models": models}), encoding="utf-8")
    mistyped = [{"name": "ghost", "path": str(ghost), "family": "granite"},
                {"name": "typo", "path": "ibm-granite/granite-3.3-8b-bsae", "family": "granite"}]
    broken.write_text(yaml.safe_dump({**base, "models": models + mistyped}), encoding="utf-8")
    return {"good": good, "broken": broken, "artifacts": directory / "artifacts"}


class ReadOnly:
    """Every write under ``root`` is refused as a read-only mount refuses it (tests run as root, which
    ignores permission bits); reads go through."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, monkeypatch, root: Path) -> None:
        self.root = str(root.resolve()) + os.sep
        self.refused: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def guarded_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self.check(file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, *args, **kwargs):
            if flags & self.WRITE_FLAGS:
                self.check(path)
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
        monkeypatch.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "rmdir", "unlink", "remove", "utime"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self.first_path_checked(real))
        for name in ("rename", "replace"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self.both_paths_checked(real))

    def check(self, path) -> None:
        if isinstance(path, int):
            return
        full = os.path.abspath(os.fspath(path))
        if (full + os.sep).startswith(self.root):
            self.refused.append(full)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), full)

    def first_path_checked(self, real):
        def guarded(path, *args, **kwargs):
            self.check(path)
            return real(path, *args, **kwargs)
        return guarded

    def both_paths_checked(self, real):
        def guarded(source, target, *args, **kwargs):
            self.check(source)
            self.check(target)
            return real(source, target, *args, **kwargs)
        return guarded


def test_cli_run_then_a_read_only_copy_still_gives_the_report(study, prefect_server, monkeypatch, capsys):
    assert main(["run", str(study["good"]), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "have no result" not in first

    read_only = ReadOnly(monkeypatch, study["artifacts"])
    # Every stage is cached: the leaderboard and report come back without one write under the directory,
    # read from disk (no Prefect run: not even a write is tried), or through a recorded Prefect run.
    leaderboard = first[first.index("| "):first.index("report: ")]
    assert main(["run", str(study["good"]), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "ftflow: nothing to run, every stage is cached" in captured.err
    assert leaderboard in captured.out and "report: " in captured.out
    assert read_only.refused == []
    assert main(["run", str(study["good"]), "--no-progress", "--record"]) == 0
    captured = capsys.readouterr()
    assert f"artifacts directory {study['artifacts']} is not writable" in captured.err
    assert leaderboard in captured.out and "report: " in captured.out
    assert any(path.endswith(".mutex") or path.endswith(".locks") for path in read_only.refused)

    # A stage to compute: one message naming the directory and how to go on; no traceback.
    assert main(["run", str(study["good"]), "--no-progress", "--set", "distill.alpha=0.25"]) == 2
    err = capsys.readouterr().err
    message = err[err.index("ftflow: the run had to compute"):]
    assert message.startswith(f"ftflow: the run had to compute a stage, but the artifacts directory "
                              f"{study['artifacts']} is not writable (every stage writes its outputs, its Prefect "
                              f"cache record and its lock there); copy it somewhere writable and run there: cp -r "
                              f"{study['artifacts']} ")
    assert f"&& ftflow run {study['good']} --set artifacts_dir=" in message
    assert "Traceback" not in err


def test_the_final_summary_lists_every_model_that_failed_and_why(study, prefect_server, capsys, tmp_path,
                                                                 monkeypatch):
    from huggingface_hub import constants

    from ftflow.models import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "_MEMO", {})
    assert main(["run", str(study["broken"]), "--no-progress"]) == 1
    captured = capsys.readouterr()
    # The mistyped hub id is said before anything runs (offline: it is not in the cache), and the run goes on.
    typo = (f"ibm-granite/granite-3.3-8b-bsae is not in the Hugging Face cache ({tmp_path / 'hf-cache'}/"
            "models--ibm-granite--granite-3.3-8b-bsae: no config.json) and HF_HUB_OFFLINE is set: ")
    assert f"ftflow: typo is left out: {typo}" in captured.err
    assert "(did you mean ibm-granite/granite-3.3-8b-base?)" in captured.err
    out = captured.out
    summary = out[out.index("2 model(s) or run(s) have no result"):].splitlines()
    assert summary[0] == "2 model(s) or run(s) have no result (details in the report):"
    assert summary[1].startswith("  - ghost (baseline): cannot plan: its tokenizer cannot be read") and \
        "ghost-model" in summary[1]
    assert summary[2].startswith(f"  - typo (baseline): {typo}")
    assert len(summary) == 3


def test_a_full_disk_stops_the_run_in_one_line_and_loses_nothing_finished(study, prefect_server, monkeypatch,
                                                                          capsys, tmp_path):
    artifacts = tmp_path / "small-disk"

    def half_written_plot(frame, path) -> None:  # as on a full disk: part of the file, then ENOSPC
        Path(path).write_bytes(b"\0" * 300_000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("tasks.evaluate.plot_leaderboard", half_written_plot)
    assert main(["run", str(study["good"]), "--no-progress", "--set", f"artifacts_dir={artifacts}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("ftflow: ")][-1]
    assert message.startswith(f"ftflow: no space is left on the device of {artifacts.resolve()} (")
    assert ("free) while writing evaluate's outputs; it had written 0.3 MiB when the write failed, so it needs at "
            "least that much more. Nothing finished was lost: the unfinished output was removed") in message
    # The unfinished stage left nothing; every finished one is still there and cached.
    assert list((artifacts / "evaluate").iterdir()) == []
    monkeypatch.undo()
    status = pipeline_status(load_config(study["good"], {"artifacts_dir": str(artifacts)}))
    assert [(s.stage, s.state) for s in status.stages if s.state != "cached"] == [("evaluate", "run")]

    # torch's own writer says a full disk with a RuntimeError about its stream: a run that fails so on a full
    # device (a training run, in a worker thread) is said the same way.
    def stream_error(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6400 vs 6292")

    monkeypatch.setattr("tasks.train.run_job", stream_error)
    monkeypatch.setattr("ftflow.artifacts.free_bytes", lambda directory: 4096)
    assert main(["run", str(study["good"]), "--no-progress", "--set", f"artifacts_dir={artifacts}",
                 "--set", "distill.alpha=0.3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("ftflow: ")][-1]
    assert message.startswith(f"ftflow: no space is left on the device of {artifacts.resolve()} (0.0 MiB free) "
                              "while writing train's outputs (the write failed with RuntimeError: [enforce fail at "
                              "inline_container.cc:672] . unexpected pos 6400 vs 6292)")
    assert "the unfinished output was removed (a training run's checkpoints are kept to resume from)" in message
