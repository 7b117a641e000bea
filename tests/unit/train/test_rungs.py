"""Rungs of successive halving: a run trained in rungs ends with the same weights and figures as in one go.

Each rung runs as the ``train`` stage runs it (tasks/train.py): its work directory starts from the previous
rung's kept state (:func:`ftflow.train.rungs.resume_state`), it stops after its fraction of the steps, and its
work directory is kept in its output (:func:`ftflow.train.rungs.keep_state`) and then removed. 16 sentences,
batch 4, 2 epochs: 8 steps; rung 0.3 stops inside the first epoch (step 3), rung 0.5 at its end (step 4).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftflow.config import FinetuneConfig, LoraConfig
from ftflow.train.jobs import full_job, lora_grid
from ftflow.train.runner import run_job
from ftflow.train.rungs import STATE_DIR, keep_state, resume_state, rung_step, total_steps
from tests.tiny import SENTENCES, saved_base

TRAIN, VALIDATION, TEST = SENTENCES * 2, SENTENCES[:5], SENTENCES[5:]


def test_total_steps_and_rung_steps():
    assert total_steps(2, 16, 4) == 8 and total_steps(3, 17, 4) == 15 and total_steps(1, 3, 8) == 1
    assert [rung_step(f, 8) for f in (0.25, 0.3, 0.5, 1.0)] == [2, 3, 4, 8]
    assert rung_step(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats: still step 3
    assert rung_step(0.01, 8) == 1 and rung_step(0.99, 8) == 8
    with pytest.raises(ValueError, match="fraction"):
        rung_step(0.0, 8)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    return saved_base(tmp_path_factory.mktemp("base"), hidden_size=64)


def _job(method: str, base: dict):
    if method == "lora":  # dropout draws from the RNG: the checkpoint's RNG state must carry it across rungs
        return lora_grid(LoraConfig(r=4, dropout=0.1, learning_rate=1e-2, epochs=2, batch_size=4), base)[0]
    return full_job(FinetuneConfig(learning_rate=1e-3, epochs=2, batch_size=4), base)


def _run(job, work: Path, out: Path, fraction=None) -> dict:
    out.mkdir(parents=True)
    return run_job(job, train_sentences=TRAIN, validation_sentences=VALIDATION, test_sentences=TEST, seed=0,
                   max_length=32, device="cpu", eval_batch_size=4, progress=False, checkpoint_steps=2,
                   work_dir=work, out_dir=out, stop_fraction=fraction)


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow  # trains
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_in_rungs_ends_where_the_run_in_one_go_ends(base, tmp_path, method):
    job = _job(method, base)
    grid = _run(job, tmp_path / "grid-work", tmp_path / "grid")

    previous, rungs, kept = None, [], {}
    for fraction in (0.3, 0.5, 1.0):
        work, out = tmp_path / f"work-{fraction}", tmp_path / f"rung-{fraction}"
        assert resume_state(previous, work) == (previous is not None)
        result = _run(job, work, out, fraction)
        rungs.append(result)
        if fraction < 1:
            previous = keep_state(work, out)
            kept[fraction] = _files(previous)
            shutil.rmtree(work)  # as run_stage does once the stage has finished

    first, second, final = rungs
    assert first["rung"]["step"] == 3 and first["rung"]["max_steps"] == 8 and first["history"] == []
    assert second["rung"]["step"] == 4 and [e["epoch"] for e in second["history"]] == [1]
    assert "rung" not in final and final["resumed_from"] == "checkpoint-4"
    # The selection score at the rung's step is the model's there: at an epoch end, that epoch's validation.
    assert second["rung"]["selection"]["corpus_ppl"] == second["history"][0]["validation"]["corpus_ppl"]
    # In one process, on one CPU and thread count, resuming restores weights, optimizer, schedule, RNG and data
    # order exactly, so the rungs reproduce the uninterrupted run bit for bit.
    assert [e["validation"]["corpus_ppl"] for e in final["history"]] == \
        [e["validation"]["corpus_ppl"] for e in grid["history"]]
    assert final["best_validation_ppl"] == grid["best_validation_ppl"]
    assert final["test"]["corpus_ppl"] == grid["test"]["corpus_ppl"]
    got, want = _weights(tmp_path / "rung-1.0" / "model"), _weights(tmp_path / "grid" / "model")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # The next rung never wrote into an earlier rung's kept state (its checkpoints are hard links).
    for fraction, files in kept.items():
        assert _files(tmp_path / f"rung-{fraction}" / STATE_DIR) == files


@pytest.mark.slow  # trains
@pytest.mark.parametrize("fraction, step", [(0.3, 3), (0.5, 4)])
def test_a_rung_scores_the_selection_split_and_writes_its_checkpoint_once(base, tmp_path, monkeypatch, fraction,
                                                                          step):
    """Rung 0.3 stops inside the first epoch (its own score, its own checkpoint); rung 0.5 on the epoch's last step,
    where the epoch's validation and checkpoint are the rung's: none of them twice (for a full-weight run on the
    seed config, a second checkpoint is every weight and its optimizer state written again)."""
    from transformers import Trainer

    from ftflow.train import trainer as trainer_module

    scored, saved = [], []
    score, save = trainer_module._score, Trainer._save_checkpoint

    def counting_score(model, *args, **kwargs):
        scored.append(model.training)
        return score(model, *args, **kwargs)

    def counting_save(self, *args, **kwargs):
        saved.append(self.state.global_step)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "_score", counting_score)
    monkeypatch.setattr(Trainer, "_save_checkpoint", counting_save)
    (tmp_path / "out").mkdir()
    result = run_job(_job("full", base), train_sentences=TRAIN, validation_sentences=VALIDATION, test_sentences=TEST,
                     seed=0, max_length=32, device="cpu", eval_batch_size=4, progress=False, checkpoint_steps=None,
                     work_dir=tmp_path / "work", out_dir=tmp_path / "out", stop_fraction=fraction)
    assert result["rung"]["step"] == step
    assert len(scored) == 2  # the base model (epoch 0), then the rung's step (the epoch's validation at step 4)
    assert saved == [step]
    if step == 4:
        assert result["rung"]["selection"] == result["history"][0]["validation"]


@pytest.mark.slow  # trains
def test_a_rung_trained_from_step_0_ends_where_the_rungs_before_it_end(base, tmp_path):
    """A rung whose previous rung's state was freed (its grid had finished) trains from step 0 to its own step
    (tasks/train.py): the same weights, optimizer state and selection score as resuming from the freed state."""
    job = _job("lora", base)
    first = _run(job, tmp_path / "work-0.3", tmp_path / "rung-0.3", 0.3)
    state = keep_state(tmp_path / "work-0.3", tmp_path / "rung-0.3")
    assert resume_state(state, tmp_path / "work-chained")
    chained = _run(job, tmp_path / "work-chained", tmp_path / "chained", 0.5)
    assert not resume_state(None, tmp_path / "work-fresh")  # the freed state: nothing to resume from
    fresh = _run(job, tmp_path / "work-fresh", tmp_path / "fresh", 0.5)
    assert first["rung"]["step"] == 3 and chained["rung"]["step"] == fresh["rung"]["step"] == 4
    # In one process, on one CPU and thread count, resuming is exact (the test above): so is not resuming.
    assert fresh["rung"]["selection"] == chained["rung"]["selection"]
    got = _weights(tmp_path / "work-fresh" / "trainer" / "checkpoint-4")
    want = _weights(tmp_path / "work-chained" / "trainer" / "checkpoint-4")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    optimizer = [torch.load(tmp_path / w / "trainer" / "checkpoint-4" / "optimizer.pt", weights_only=False)["state"]
                 for w in ("work-fresh", "work-chained")]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*[[s[i] for i in sorted(s)] for s in optimizer]) for k in a)


def test_a_state_freed_while_it_is_copied_leaves_no_work_directory_and_the_rung_starts_from_step_0(
        tmp_path, monkeypatch, caplog):
    """Another run's grid ends and frees the previous rung's state (:func:`free_state`) while this rung copies it:
    the copy fails, nothing half-made is left, and the rung starts from step 0 (``resume_state`` says False)."""
    from ftflow.train import rungs

    out = tmp_path / "rung-0.25"
    (out / STATE_DIR / "trainer" / "checkpoint-2").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        (out / STATE_DIR / "trainer" / "checkpoint-2" / name).write_bytes(b"x" * 64)
    (out / STATE_DIR / "history.json").write_text("[]")
    manifest = {"dir": str(out), "state": STATE_DIR}
    copied, link = [], rungs._link_or_copy

    def freed_midway(source: str, target: str) -> str:
        if not copied:  # the other run frees the state after this rung's first file
            copied.append(link(source, target))
            assert rungs.free_state(manifest) > 0
            return copied[0]
        return link(source, target)

    monkeypatch.setattr(rungs, "_link_or_copy", freed_midway)
    work = tmp_path / "work-0.5"
    with caplog.at_level("WARNING", logger=rungs.log.name):
        assert rungs.resume_state(out / STATE_DIR, work) is False
    assert copied and not (out / STATE_DIR).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rung-0.25"]  # no work directory, no half copy
    assert list(out.iterdir()) == []  # the state's temporary name is gone too
    assert "went away while it was copied" in caplog.text and "starting from step 0" in caplog.text


@pytest.mark.slow  # trains
def test_a_peft_run_writes_each_epoch_ends_checkpoint_once(base, tmp_path, monkeypatch):
    """checkpoint_steps 2 divides the 4-step epochs: steps 4 and 8 are saved once each, at the epoch end, after
    its validation (they were saved twice: by the step schedule, then again at the epoch end)."""
    from transformers import Trainer

    saved, save = [], Trainer._save_checkpoint

    def counting_save(self, *args, **kwargs):
        saved.append(self.state.global_step)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_checkpoint", counting_save)
    result = _run(_job("lora", base), tmp_path / "work", tmp_path / "out")
    assert [e["step"] for e in result["history"]] == [4, 8]
    assert saved == [2, 4, 6, 8]
