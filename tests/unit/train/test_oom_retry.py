"""A training run that runs out of device memory is freed and resumed from its last checkpoint with the next setting.

A CPU cannot run out of memory safely, so the error is injected: the Trainer's step raises CUDA's
``torch.OutOfMemoryError`` once, at the fourth optimizer step, after checkpoint-2. 16 sentences, batch 4,
2 epochs: 8 steps.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import transformers
from torch.optim.optimizer import register_optimizer_step_pre_hook

import ftflow.models.loading
from ftflow.config import LoraConfig
from ftflow.models.architecture import model_config_for
from ftflow.plan.fit import choose_fit, out_of_memory_refit
from ftflow.plan.predict import GB
from ftflow.train.runner import OOM_RETRIES, TrainingOutOfMemoryError, lora_grid, run_job
from tests.tiny import SENTENCES, saved_base

TRAIN, VALIDATION, TEST = SENTENCES * 2, SENTENCES[:5], SENTENCES[5:]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    return saved_base(tmp_path_factory.mktemp("base"), hidden_size=64)


def _plan(base, fit_order) -> dict:
    """The fit plan of the LoRA run as tasks/train.py makes it: nothing needed (a budget nothing comes near)."""
    plan = choose_fit(model_config_for(base["path"]), "fp32", "lora", batch_size=4, max_length=32,
                      budget_bytes=100 * GB, fit_order=fit_order, eval_batch_size=4, eval_length=32, lora_r=4,
                      device="cpu", name="tiny")
    return {**plan.model_dump(mode="json"), "summary": plan.summary}


class Steps:
    """What every optimizer step ran with; the Trainer's step raises out-of-memory at the given global steps."""

    def __init__(self, monkeypatch, fail_at: tuple[int, ...] = ()):
        self.micro_batches, self.rates, self.optimizers = [], [], []
        self.pending = list(fail_at)
        step = transformers.Trainer.training_step
        steps = self

        def training_step(trainer, model, inputs, *args, **kwargs):
            if steps.pending and trainer.state.global_step == steps.pending[0]:
                steps.pending.pop(0)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            steps.micro_batches.append(trainer.args.per_device_train_batch_size)
            return step(trainer, model, inputs, *args, **kwargs)

        monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
        self.hook = register_optimizer_step_pre_hook(self._on_step)

    def _on_step(self, optimizer, args, kwargs) -> None:
        self.rates.append(optimizer.param_groups[0]["lr"])
        self.optimizers.append(type(optimizer).__name__)


def _run(base, tmp_path, fit_order, **extra) -> dict:
    job = lora_grid(LoraConfig(r=4, dropout=0.0, learning_rate=1e-2, epochs=2, batch_size=4), base)[0]
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    out.mkdir(parents=True)
    return run_job(job, train_sentences=TRAIN, validation_sentences=VALIDATION, test_sentences=TEST, seed=0,
                   max_length=32, device="cpu", eval_batch_size=4, progress=False, checkpoint_steps=2,
                   work_dir=tmp_path / "work", out_dir=out, fit_plan=_plan(base, fit_order),
                   refit=out_of_memory_refit("cpu", True), **extra)


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    """The same run with nothing injected: its learning rates by step and its result."""
    mp = pytest.MonkeyPatch()
    try:
        steps = Steps(mp)
        result = _run(base, tmp_path_factory.mktemp("uninterrupted"), ("micro_batch",))
        steps.hook.remove()
    finally:
        mp.undo()
    assert result["oom_retries"] == [] and result["resumed_from"] is None
    return steps, result


@pytest.mark.slow  # trains
def test_a_halved_micro_batch_resumes_the_run_and_optimises_the_same_thing(base, tmp_path, uninterrupted,
                                                                           monkeypatch):
    reference_steps, reference = uninterrupted
    steps = Steps(monkeypatch, fail_at=(3,))
    loaded = []
    load = ftflow.models.loading.load_model

    def tracking_load(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(ftflow.models.loading, "load_model", tracking_load)
    enabled = gc.isenabled()
    gc.disable()  # the failed attempt's model must be freed by the retry, not by the cyclic collector
    try:
        result = _run(base, tmp_path, ("micro_batch",))
        # Two training attempts, then the test split's reload (load_trained, beside load_model since the move),
        # and the failed attempt's model is gone.
        assert len(loaded) == 3 and loaded[0]() is None
    finally:
        if enabled:
            gc.enable()
        steps.hook.remove()
    (retry,) = result["oom_retries"]
    assert retry["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"
    assert retry["resume_from"] == "checkpoint-2" and retry["optimizer_state"] == "resumed"
    assert retry["failed"].startswith("tiny lora: batch 4") and "micro-batch 2 x 2" in retry["next"]
    assert result["resumed_from"] == "checkpoint-2" and result["optimizer_state"] == "resumed"
    assert result["fit_plan"]["micro_batch_size"] == 2 and result["fit_plan"]["oom_retries"] == 1
    # Steps 1-3 at micro-batch 4 (the 4th ran out of memory), then from checkpoint-2 on steps 3-8 in 2 x 2: the
    # same 8 steps, at the same rates.
    assert steps.micro_batches == [4, 4, 4] + [2] * 12
    assert steps.rates == pytest.approx(reference_steps.rates[:3] + reference_steps.rates[2:], rel=1e-12)
    # Same sentences per step, loss over the same tokens: the uninterrupted run's numbers, to float rounding
    # (micro-batches sum in another order).
    assert [e["step"] for e in result["history"]] == [4, 8]
    for got, want in zip(result["history"], reference["history"]):
        assert got["validation"]["corpus_ppl"] == pytest.approx(want["validation"]["corpus_ppl"], rel=1e-4)
    card = (tmp_path / "out0" / "model" / "README.md").read_text()
    assert ("| out-of-memory retries | out of memory on the device with micro-batch 4 x 1: halved the micro-batch"
            in card)
    assert "resumed from checkpoint-2, optimizer state resumed |" in card


@pytest.mark.slow  # trains
def test_another_optimizer_resumes_weights_and_schedule_and_restarts_its_state(base, tmp_path, uninterrupted,
                                                                             monkeypatch, caplog):
    pytest.importorskip("bitsandbytes")
    reference_steps, reference = uninterrupted
    steps = Steps(monkeypatch, fail_at=(3,))
    try:
        with caplog.at_level("WARNING"):
            result = _run(base, tmp_path, ("optimizer_8bit",))
    finally:
        steps.hook.remove()
    (retry,) = result["oom_retries"]
    assert retry["optimizer_state"] == "restarted" and "turned on optimizer_8bit" in retry["change"]
    assert result["optimizer_state"] == "restarted" and result["precision_plan"]["optimizer"] == "adamw-8bit"
    # fp32 AdamW for steps 1-3, bitsandbytes' 8-bit AdamW from checkpoint-2 on, at the schedule's own rates.
    assert steps.optimizers == ["AdamW"] * 3 + ["AdamW8bit"] * 6
    assert steps.rates == pytest.approx(reference_steps.rates[:3] + reference_steps.rates[2:], rel=1e-12)
    assert ("checkpoint-2 holds adamw optimizer state, which this run's adamw-8bit optimizer cannot load: resuming "
            "the weights, step, data order and learning-rate schedule from it; the optimizer state restarts from zero"
            in caplog.text)
    assert result["history"][-1]["step"] == 8
    assert result["best_validation_ppl"] < reference["baseline_validation"]["corpus_ppl"]


@pytest.mark.slow  # trains
def test_nothing_left_to_try_is_a_clear_error_and_a_killed_retry_keeps_its_setting(base, tmp_path, monkeypatch):
    steps = Steps(monkeypatch, fail_at=(3,))
    with pytest.raises(TrainingOutOfMemoryError, match=r"lora\[tiny\|.*\] ran out of device memory \(CUDA out of "
                       r"memory.*\) with tiny lora: batch 4.*training.fit_order \(empty\) leaves nothing to try "
                       r"after 0 retries: lower max_length"):
        _run(base, tmp_path / "empty", ())
    # A run killed after its retry (here: the second attempt is interrupted) resumes with the retried setting.
    steps.pending = [3, 5]
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", _interrupt_after(4))
    with pytest.raises(KeyboardInterrupt):
        _run(base, tmp_path / "killed", ("micro_batch", "checkpointing"))
    recorded = json.loads((tmp_path / "killed" / "work" / OOM_RETRIES).read_text())
    assert [r["next_plan"]["micro_batch_size"] for r in recorded] == [2]
    monkeypatch.undo()
    steps.hook.remove()
    again = Steps(monkeypatch, fail_at=(5,))
    try:
        result = _run(base, tmp_path / "killed", ("micro_batch", "checkpointing"))
    finally:
        again.hook.remove()
    assert again.micro_batches[0] == 2  # the setting of the retry, not the plan's 4
    assert [r["change"].split(": ")[1].split(",")[0] for r in result["oom_retries"]] == [
        "halved the micro-batch", "turned on checkpointing"]
    assert result["fit_plan"]["gradient_checkpointing"] is True and result["history"][-1]["step"] == 8


def _interrupt_after(step: int):
    save = transformers.Trainer._save_checkpoint

    def saving(trainer, *args, **kwargs):
        save(trainer, *args, **kwargs)
        if trainer.state.global_step >= step:
            raise KeyboardInterrupt  # as a kill would stop it: after a checkpoint, before the run ends

    return saving
