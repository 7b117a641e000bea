"""The device around the stages: TF32 on for training steps where the GPU has it, never for scoring."""

from __future__ import annotations

import pytest
import torch

import ftflow.device
from ftflow.config import LoraConfig
from ftflow.device import resolve_tf32, tf32, tf32_enabled
from ftflow.train.runner import lora_grid, run_job
from tests.tiny import SENTENCES, saved_base


def _gpu(monkeypatch, major: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (major, 0))


def test_tf32_is_on_for_training_only_where_the_gpu_has_it(monkeypatch):
    assert resolve_tf32("auto", "cpu")[0] is False and "cpu has no TF32" in resolve_tf32("on", "cpu")[1]
    _gpu(monkeypatch, 7)  # Volta / Turing: no TF32
    assert resolve_tf32("auto", "cuda")[0] is False
    _gpu(monkeypatch, 8)  # Ampere
    assert resolve_tf32("auto", "cuda")[0] is True and resolve_tf32("on", "cuda")[0] is True
    assert resolve_tf32("off", "cuda") == (False, "off (training.tf32: off)")
    with pytest.raises(ValueError, match="auto, on or off"):
        resolve_tf32("yes", "cuda")


def test_the_switch_is_scoped_and_restored():
    before = tf32_enabled()
    with tf32(True):
        assert tf32_enabled()
        with tf32(False):
            assert not tf32_enabled()
        assert tf32_enabled()
    assert tf32_enabled() == before


@pytest.mark.slow  # trains
@pytest.mark.parametrize("setting", ["on", "off"])
def test_a_run_trains_in_tf32_scores_without_it_and_records_it(setting, tmp_path, monkeypatch):
    """TF32 as the training steps and every scoring pass (baseline, epochs, test) see it, on a pretend Ampere GPU."""
    import transformers

    import ftflow.perplexity

    monkeypatch.setattr(ftflow.device, "tf32_available", lambda device: True)
    seen = {"training": set(), "scoring": set()}
    step, nll = transformers.Trainer.training_step, ftflow.perplexity.batch_nll

    def training_step(self, *args, **kwargs):
        seen["training"].add(tf32_enabled())
        return step(self, *args, **kwargs)

    def batch_nll(*args, **kwargs):
        seen["scoring"].add(tf32_enabled())
        return nll(*args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    monkeypatch.setattr(ftflow.perplexity, "batch_nll", batch_nll)
    base = saved_base(tmp_path / "base", hidden_size=64)
    job = lora_grid(LoraConfig(r=4, learning_rate=1e-2, epochs=2, batch_size=4), base)[0]
    (tmp_path / "out").mkdir()
    before = tf32_enabled()
    run = run_job(job, train_sentences=SENTENCES * 2, validation_sentences=SENTENCES[:5],
                  test_sentences=SENTENCES[5:], seed=0, max_length=32, device="cpu", eval_batch_size=4,
                  work_dir=tmp_path / "work", out_dir=tmp_path / "out", progress=False, tf32=setting)
    assert seen == {"training": {setting == "on"}, "scoring": {False}}
    assert tf32_enabled() == before  # the process is left as it was
    assert run["tf32"]["setting"] == setting and run["tf32"]["training"] is (setting == "on")
    assert run["tf32"]["scoring"] is False
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert f"| TF32 (training steps) | {setting} |" in card
