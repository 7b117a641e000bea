"""training.report_to: the Trainer's TensorBoard logging, read back from the event files a run keeps."""

from __future__ import annotations

import pytest

from ftflow.config import FinetuneConfig
from ftflow.train.jobs import full_job
from ftflow.train.runner import run_job
from tests.tiny import SENTENCES, saved_base

pytestmark = pytest.mark.slow  # two short training runs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    return saved_base(tmp_path_factory.mktemp("base"), hidden_size=64)


def _run(base: dict, directory, report_to) -> dict:
    job = full_job(FinetuneConfig(epochs=2, batch_size=4, learning_rate=1e-3), base)
    (directory / "out").mkdir(parents=True)
    return run_job(job, train_sentences=SENTENCES, validation_sentences=SENTENCES[:5], test_sentences=SENTENCES[5:],
                   seed=0, max_length=32, device="cpu", eval_batch_size=4, work_dir=directory / "work",
                   out_dir=directory / "out", progress=False, report_to=report_to)


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = [p.parent for p in directory.rglob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_event_files_hold_loss_by_step_and_selection_ppl_per_epoch(base, tmp_path):
    with_curves = _run(base, tmp_path / "tb", ["tensorboard"])
    scalars = _scalars(tmp_path / "tb" / "out" / "tensorboard")
    # 8 sentences in batches of 4: 2 steps an epoch, 2 epochs; a loss logged every step.
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    history = with_curves["history"]
    assert [step for step, _ in scalars["eval/selection_ppl"]] == [2, 4] == [e["step"] for e in history]
    assert [ppl for _, ppl in scalars["eval/selection_ppl"]] == pytest.approx(
        [e["validation"]["corpus_ppl"] for e in history], rel=1e-6)  # stored as float32
    assert [b for _, b in scalars["eval/selection_bits_per_byte"]] == pytest.approx(
        [e["validation"]["bits_per_byte"] for e in history], rel=1e-6)
    assert scalars["train/loss"][1][1] == pytest.approx(history[0]["train_loss"], rel=1e-6)
    assert {"train/learning_rate", "train/grad_norm"} <= set(scalars)

    # Curves change which files a run writes, not its numbers: why report_to is not in a run's cache key.
    without = _run(base, tmp_path / "plain", [])
    assert without["history"] == history and without["test"] == with_curves["test"]
    assert not (tmp_path / "plain" / "out" / "tensorboard").exists()
    assert not list((tmp_path / "plain").rglob("events.out.tfevents.*"))
