"""Nothing of a run outlives it: no model, parameter or optimizer state is alive once a training call returns.

Python's cyclic collector runs when allocation counts say so, not when a GPU is full: whatever a reference
cycle holds (a Trainer, its model and optimizer state) would still occupy the device when the next model
loads. These tests run with the cyclic collector disabled (restored after) and never collect themselves:
what is alive after the call is what a real run would still hold when it loads the next model.
"""

from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import ftflow.models.loading
from ftflow.config import DistillConfig, FinetuneConfig, LoraConfig, QLoraConfig
from ftflow.device import free_memory
from ftflow.distill.teacher import compute_teacher_topk
from ftflow.models.loading import load_model, load_tokenizer
from ftflow.train.runner import distill_grid, full_job, lora_grid, qlora_like, run_job
from ftflow.train.trainer import TrainSettings, encode_dataset, train_full, train_lora, train_prefix
from tests.tiny import SENTENCES, saved_base, tiny_tokenizer

TRAIN, VALIDATION, TEST = SENTENCES * 2, SENTENCES[:5], SENTENCES[5:]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    return saved_base(tmp_path_factory.mktemp("base"), hidden_size=64)


class Tracked:
    """Weak references to every model ftflow loads, its parameters, and every optimizer's state tensors."""

    def __init__(self, monkeypatch):
        self.refs: list[tuple[str, weakref.ref]] = []
        self.optimizers = 0

        def tracking_load(*args, **kwargs):
            model = load_model(*args, **kwargs)
            self.refs.append((f"model {type(model).__name__}", weakref.ref(model)))
            self.refs += [(f"parameter {name}", weakref.ref(p)) for name, p in model.named_parameters()]
            return model

        # train_peft / train_full import it at call time; load_trained uses the name in ftflow.models.loading.
        monkeypatch.setattr(ftflow.models.loading, "load_model", tracking_load)

    def on_step(self, optimizer, args, kwargs) -> None:
        """After every optimizer step: the optimizer, the parameters it trains (adapters too) and its state."""
        self.optimizers += 1
        self.refs.append((f"optimizer {type(optimizer).__name__}", weakref.ref(optimizer)))
        for group in optimizer.param_groups:
            self.refs += [("trained parameter", weakref.ref(p)) for p in group["params"]]
        for state in optimizer.state.values():
            self.refs += [(f"optimizer state {key}", weakref.ref(value)) for key, value in state.items()
                          if torch.is_tensor(value) and value.dim() > 0]

    def alive(self) -> list[str]:
        return sorted({name for name, ref in self.refs if ref() is not None})


@contextmanager
def tracked_without_cyclic_gc(monkeypatch):
    tracked = Tracked(monkeypatch)
    hook = register_optimizer_step_post_hook(tracked.on_step)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield tracked
    finally:
        if enabled:
            gc.enable()
        hook.remove()


def _settings(**overrides) -> TrainSettings:
    return TrainSettings(**{**dict(epochs=1, learning_rate=1e-3, batch_size=4, max_length=32, seed=0, device="cpu",
                                   eval_batch_size=4, progress=False, checkpoint_steps=2), **overrides})


def _lora(base, tmp_path, **settings):
    quantization = {"compute_dtype": "fp32"} if settings.get("precision") == "nf4" else None
    train_lora(base["path"], tiny_tokenizer(), TRAIN, VALIDATION, r=4, alpha=8, dropout=0.0,
               target_modules="all-linear", settings=_settings(**settings), work_dir=tmp_path / "work",
               adapter_dir=tmp_path / "adapter", quantization=quantization)


def _prefix(base, tmp_path, **settings):
    train_prefix(base["path"], tiny_tokenizer(), TRAIN, VALIDATION, num_virtual_tokens=2,
                 settings=_settings(**settings), work_dir=tmp_path / "work", adapter_dir=tmp_path / "adapter")


def _full(base, tmp_path, **settings):
    tokenizer = tiny_tokenizer()
    train_full(base["path"], tokenizer, encode_dataset(tokenizer, TRAIN, 32), VALIDATION,
               settings=_settings(**settings), work_dir=tmp_path / "work", model_dir=tmp_path / "model")


RUNS = {
    "lora": (_lora, {}),
    # bf16 autocast: accelerate binds the model's forward onto the model (a cycle of the library's own).
    "lora-bf16": (_lora, {"precision": "bf16"}),
    # 4-bit weights point back at their layer (bitsandbytes' Params4bit.module): cycles in every layer.
    "qlora": (_lora, {"precision": "nf4"}),
    "prefix": (_prefix, {}),
    "full": (_full, {}),
    "full-bf16-kahan": (_full, {"precision": "bf16", "master_weights": "bf16"}),
    # bitsandbytes' 8-bit optimizer closes over itself when the accelerator reloads its state.
    "full-8bit-checkpointing": (_full, {"optimizer": "adamw-8bit", "micro_batch_size": 2,
                                        "gradient_checkpointing": True}),
}


@pytest.mark.slow  # trains
@pytest.mark.parametrize("run", list(RUNS))
def test_nothing_of_a_training_run_is_alive_after_it_returns(run, base, tmp_path, monkeypatch):
    train, settings = RUNS[run]
    with tracked_without_cyclic_gc(monkeypatch) as tracked:
        train(base, tmp_path, **settings)
        assert tracked.optimizers > 0 and any(name.startswith("optimizer state") for name, _ in tracked.refs)
        assert tracked.alive() == []


@pytest.mark.slow  # trains
@pytest.mark.parametrize("run", ["lora", "full"])
def test_no_reference_cycle_holds_an_fp32_run(run, base, tmp_path, monkeypatch):
    """Reference counting alone frees an fp32 run: ftflow's own code makes no cycle (gc.collect a no-op here)."""
    train, settings = RUNS[run]
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)
    with tracked_without_cyclic_gc(monkeypatch) as tracked:
        train(base, tmp_path, **settings)
        assert tracked.alive() == []


def _run_job(job, tmp_path, **extra) -> dict:
    out = tmp_path / "out"
    out.mkdir(parents=True)
    return run_job(job, train_sentences=TRAIN, validation_sentences=VALIDATION, test_sentences=TEST, seed=0,
                   max_length=32, device="cpu", eval_batch_size=4, progress=False, checkpoint_steps=2,
                   work_dir=tmp_path / "work", out_dir=out, **extra)


@pytest.mark.slow  # trains
@pytest.mark.parametrize("method", ["lora", "qlora", "full", "distill"])
def test_nothing_of_run_job_is_alive_after_it_returns(method, base, tmp_path, monkeypatch):
    """run_job trains, reloads the trained model for the test split, scores it: none of them is alive after."""
    lora = lora_grid(LoraConfig(r=4, learning_rate=1e-2, epochs=1, batch_size=4), base)[0]
    extra = {}
    if method == "distill":
        teacher = load_model(base["path"], "fp32", "cpu")
        store = compute_teacher_topk(teacher, load_tokenizer(base["path"]), TRAIN, k=4, max_length=32,
                                     batch_size=4, progress=False)
        del teacher
        store.save(tmp_path / "topk")
        extra["teacher_topk_dir"] = tmp_path / "topk"
    job = {"lora": lora, "qlora": qlora_like(lora, base, QLoraConfig(compute_dtype="fp32")),
           "full": full_job(FinetuneConfig(learning_rate=1e-3, epochs=1, batch_size=4), base),
           "distill": distill_grid(DistillConfig(top_k=[4], learning_rate=1e-3, epochs=1, batch_size=4), base)[0]}
    with tracked_without_cyclic_gc(monkeypatch) as tracked:
        result = _run_job(job[method], tmp_path, **extra)
        loaded = [name for name, _ in tracked.refs if name.startswith("model ")]
        assert len(loaded) == 2, loaded  # the base model trained, and the trained model reloaded for test
        assert tracked.alive() == []
    assert result["test"]["corpus_ppl"] > 1


def test_nothing_of_the_teacher_pass_is_alive_after_it_returns(base, tmp_path, monkeypatch):
    from ftflow.distill.teacher import teacher_topk_for_student

    teacher_run = {"name": "tiny+full[]", "method": "full", "precision": "fp32", "base_model": base,
                   "dir": str(tmp_path.parent), "files": {"model": base["path"]}}
    with tracked_without_cyclic_gc(monkeypatch) as tracked:
        store = teacher_topk_for_student(teacher_run, base, TRAIN, k=4, max_length=32, device="cpu", progress=False)
        assert len(tracked.refs) > 1 and tracked.alive() == []
    assert store.n_sentences == len(TRAIN)


def test_nothing_of_the_zoos_pretraining_and_check_is_alive_after_them(monkeypatch):
    from ftflow.models import zoo
    from tests.tiny import tiny_model

    with tracked_without_cyclic_gc(monkeypatch) as tracked:
        model = tiny_model("llama", hidden_size=64)
        tracked.refs.append(("model", weakref.ref(model)))
        zoo.pretrain(model, tiny_tokenizer(), TRAIN, steps=3, batch_size=4, learning_rate=1e-3, max_length=32, seed=0)
        zoo._check_ppl(model, tiny_tokenizer(), zoo.TeacherCheck(VALIDATION, max_length=32))
        del model
        assert tracked.optimizers == 3 and tracked.alive() == []


def test_free_memory_empties_the_cuda_cache_only_for_cuda(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    free_memory("cpu")
    assert emptied == []
    free_memory("cuda")
    assert emptied == [True]


_FREEZE_CHILD = r"""
import gc, json, sys, weakref
import torch
import transformers  # the import-time objects a stage's process holds before its first model
from ftflow.device import free_memory, freeze_long_lived_objects

tracked_before = len(gc.get_objects())
freeze_long_lived_objects()
frozen = gc.get_freeze_count()
freeze_long_lived_objects()  # once per process: a second call freezes nothing more
again = gc.get_freeze_count()

class Holder:
    pass

holder = Holder()
holder.itself = holder  # a reference cycle, as the Trainer's callbacks make, holding a model-sized tensor
holder.weights = torch.zeros(1000)
alive = weakref.ref(holder)
del holder
gc.disable()  # only free_memory may collect it
free_memory("cpu")
print(json.dumps({"tracked_before": tracked_before, "tracked_after": len(gc.get_objects()), "frozen": frozen,
                  "again": again, "cycle_freed": alive() is None}))
"""


_LIBRARIES_CHILD = r"""
import gc, json
import torch, transformers
from ftflow.device import freeze_long_lived_objects

freeze_long_lived_objects()
import datasets, peft, transformers.trainer  # what a training run imports on first use, after the freeze
print(json.dumps({"tracked": len(gc.get_objects())}))
"""


def test_the_training_libraries_are_frozen_with_the_rest():
    """A training run's first-use imports (Trainer, PEFT, datasets) happen after the process froze its objects:
    they must be frozen too, else each collection of each later run walks them again (about 0.1 s each on this
    machine, several per run: successive halving's short rungs paid it at every rung)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _LIBRARIES_CHILD], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # Unfrozen, these imports leave well over 100,000 tracked objects for the collector; frozen, a few thousand.
    assert seen["tracked"] < 20_000, seen


def test_freezing_the_import_time_objects_leaves_collection_to_what_came_after():
    import json
    import subprocess
    import sys
    # A process of its own: freezing is process-wide, once.
    out = subprocess.run([sys.executable, "-c", _FREEZE_CHILD], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # torch and transformers alone leave well over 100,000 tracked objects; the collector walks a few after.
    assert seen["tracked_before"] > 100_000 and seen["frozen"] > 100_000
    assert seen["tracked_after"] < seen["tracked_before"] // 10
    assert seen["again"] == seen["frozen"]
    # What is made after the freeze is still collected by free_memory: a model in a cycle does not stay.
    assert seen["cycle_freed"] is True
