"""How training keeps its updates: precision plans, fp32 master weights, Kahan-compensated bf16, QLoRA's dtype."""

from __future__ import annotations

import pytest
import torch

from ftflow.tokens import sentence_ids
from ftflow.train.runner import run_job
from ftflow.train.trainer import PrecisionPlan, TrainSettings, encode_dataset, plan_precision, train_full
from tests.tiny import SENTENCES, saved_base, tiny_model, tiny_tokenizer


def test_precision_plans():
    assert plan_precision("full", "fp32", "cpu") == PrecisionPlan("fp32", "fp32", None, False, "adamw")
    # bf16 in full: fp32 master weights under bf16 autocast unless told they do not fit.
    assert plan_precision("full", "bf16", "cpu") == PrecisionPlan("bf16", "fp32", "bf16", False, "adamw")
    assert plan_precision("full", "bf16", "cpu", master_weights="bf16") == PrecisionPlan(
        "bf16", "bf16", None, False, "adamw-kahan")
    assert plan_precision("full", "fp16", "cuda") == PrecisionPlan("fp16", "fp32", "fp16", True, "adamw")
    assert plan_precision("peft", "bf16", "cuda") == PrecisionPlan("bf16", "fp32", "bf16", False, "adamw")
    # QLoRA: the autocast is the configured compute dtype, never the Trainer's own choice.
    assert plan_precision("peft", "nf4", "cuda", compute_dtype="fp32").autocast is None
    assert plan_precision("peft", "nf4", "cuda", compute_dtype="bf16").autocast == "bf16"
    assert plan_precision("peft", "nf4", "cuda", compute_dtype="fp16") == PrecisionPlan(
        "nf4", "fp32", "fp16", True, "adamw")
    with pytest.raises(ValueError, match="fp16 training needs loss scaling, which the Trainer only does on CUDA"):
        plan_precision("full", "fp16", "cpu")
    with pytest.raises(ValueError, match="fp16 weights cannot be trained in fp16"):
        plan_precision("full", "fp16", "cuda", master_weights="fp16")
    with pytest.raises(ValueError, match="only applies to full fine-tuning"):
        plan_precision("peft", "bf16", "cuda", master_weights="bf16")
    with pytest.raises(ValueError, match="cannot be fine-tuned in full; use QLoRA"):
        plan_precision("full", "nf4", "cuda")


def test_kahan_compensated_bf16_adamw_keeps_updates_that_bf16_rounding_drops():
    """10 AdamW steps of 2e-5 on bf16 weights of 0.03 (a bf16 step there is 1.2e-4)."""
    import optimi

    def run(optimizer_cls, **kwargs):
        weight = torch.nn.Parameter(torch.full((1000,), 0.03, dtype=torch.bfloat16))
        start = weight.detach().clone()
        optimizer = optimizer_cls([weight], lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kwargs)
        for _ in range(10):
            weight.grad = torch.full_like(weight, -1.0)
            optimizer.step()
        return weight.detach(), start, optimizer.state[weight]

    plain, start, _ = run(torch.optim.AdamW)
    assert torch.equal(plain, start)  # every update rounded away
    kahan, start, state = run(optimi.AdamW, kahan_sum=True)
    # A constant gradient makes each AdamW step exactly lr: 10 steps add 2e-4 (1.6 bf16 steps at 0.03).
    assert start[0].item() == 0.030029296875
    assert torch.equal(kahan, torch.full_like(kahan, 0.030273437500))  # start + 2e-4, rounded to bf16
    # The compensation holds the rest: weight + compensation is the fp32 result to bf16's precision of 2e-4.
    exact = (kahan.float() + state["kahan_comp"].float()) - start.float()
    assert torch.allclose(exact, torch.full_like(exact, 2e-4), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    tiny_model("llama", hidden_size=64).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _changed_fraction(bf16_checkpoint, tmp_path, plan=None, **settings) -> tuple[float, dict, dict]:
    """Full fine-tuning of the bf16 checkpoint for 10 steps at lr 2e-5; the fraction of weights that moved.

    ``plan`` forces a precision plan on :func:`ftflow.train.trainer.fit` (to measure plain AdamW on bf16 weights,
    the old behaviour); otherwise :func:`ftflow.train.trainer.train_full` plans it.
    """
    from transformers import AutoModelForCausalLM

    from ftflow.train.trainer import fit

    tokenizer = tiny_tokenizer()
    train = encode_dataset(tokenizer, SENTENCES * 5, 32)  # 40 sentences, batch 4: 10 steps in the one epoch
    run = TrainSettings(epochs=1, learning_rate=2e-5, batch_size=4, max_length=32, seed=0, device="cpu",
                        precision="bf16", eval_batch_size=4, progress=False, checkpoint_steps=100,
                        packing="off", **settings)  # padded: the numbers below are about precision, not batching
    if plan is None:
        result = train_full(str(bf16_checkpoint), tokenizer, train, SENTENCES[:5], settings=run,
                            work_dir=tmp_path / "work", model_dir=tmp_path / "model")
    else:
        model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.bfloat16).train()
        result = fit(model, tokenizer, train, SENTENCES[:5], run, tmp_path / "work",
                     lambda m: m.save_pretrained(tmp_path / "model"), plan=plan)
    before = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=None).state_dict()
    changed = sum(int((after[k].float() != before[k]).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values()), result, after


def _movable_fraction(bf16_checkpoint) -> float:
    """The share of weights a gradient reaches: all but the input-embedding rows of tokens never read as input.

    Computed from the data, not measured. A sentence's last token is read by no prediction (nothing follows
    it and nothing attends to it), so its input-embedding row gets a gradient only where the token appears
    elsewhere; every other weight gets one at every step, so an optimizer that keeps every update moves
    exactly these.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.float32)
    used = {i for text in SENTENCES for i in sentence_ids(tokenizer, text, 32)[0][:-1]}
    embedding = model.get_input_embeddings().weight
    unused_rows = embedding.shape[0] - len(used)
    return 1 - unused_rows * embedding.shape[1] / sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_bf16_full_finetuning_keeps_fp32_master_weights_and_changes_every_trained_weight(bf16_checkpoint, tmp_path):
    fraction, result, after = _changed_fraction(bf16_checkpoint, tmp_path)
    assert result["history"][-1]["step"] == 10
    assert result["precision_plan"] == {"load": "bf16", "trained_weights": "fp32", "autocast": "bf16",
                                        "loss_scaling": False, "optimizer": "adamw"}
    assert next(iter(after.values())).dtype == torch.float32  # the master weights are what is saved
    # Plain AdamW on the bf16 weights (before): 23% changed. With fp32 masters every weight a gradient reaches
    # moves; the rest are embedding rows of tokens the data never uses, which no optimizer moves. The count is
    # exact whatever the CPU's kernels, but for a weight whose gradient happens to be 0 at every step (a
    # SiLU gate saturated on every token: 1 of the 78,272 here on one machine): a tolerance of 0.1%.
    assert fraction >= 0.99
    assert fraction == pytest.approx(_movable_fraction(bf16_checkpoint), abs=1e-3)


@pytest.mark.slow
def test_bf16_weights_without_fp32_masters_train_with_a_kahan_compensated_update(bf16_checkpoint, tmp_path):
    plain, _, _ = _changed_fraction(bf16_checkpoint, tmp_path / "plain",
                                    plan=PrecisionPlan("bf16", "bf16", None, False, "adamw"))
    fraction, result, after = _changed_fraction(bf16_checkpoint, tmp_path / "kahan", master_weights="bf16")
    assert result["precision_plan"] == {"load": "bf16", "trained_weights": "bf16", "autocast": None,
                                        "loss_scaling": False, "optimizer": "adamw-kahan"}
    assert next(iter(after.values())).dtype == torch.bfloat16
    # A bf16 weight moves once its summed updates reach half a bf16 step; plain AdamW drops each smaller one.
    # The exact shares depend on the CPU's kernels (AVX-512 and AVX2 round a few ties differently: 0.227910
    # against 0.227936), so the property is asserted, with margins far wider than that: plain AdamW moves a
    # minority of the weights, the compensated update at least twice as many, and neither more than a
    # gradient reaches.
    movable = _movable_fraction(bf16_checkpoint)
    assert 0.05 < plain < 0.5
    assert fraction > 2 * plain
    assert fraction <= movable + 1e-9


@pytest.fixture(scope="module")
def fp32_base(tmp_path_factory) -> dict:
    return saved_base(tmp_path_factory.mktemp("fp32"), hidden_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("compute_dtype, expected", [("fp32", None), ("bf16", torch.bfloat16)])
def test_qlora_trains_in_its_configured_compute_dtype(compute_dtype, expected, fp32_base, tmp_path, monkeypatch):
    """While training, the autocast around the 4-bit layers is qlora.compute_dtype's (none for fp32)."""
    import bitsandbytes as bnb

    from ftflow.config import LoraConfig, QLoraConfig
    from ftflow.train.runner import lora_grid, qlora_like

    seen = set()
    forward = bnb.nn.Linear4bit.forward

    def recording(self, x):
        out = forward(self, x)
        if self.training and torch.is_grad_enabled():
            seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return out

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", recording)
    best = lora_grid(LoraConfig(r=4, learning_rate=1e-2, epochs=1, batch_size=4), fp32_base)[0]
    job = qlora_like(best, fp32_base, QLoraConfig(compute_dtype=compute_dtype))
    (tmp_path / "out").mkdir()
    run = run_job(job, train_sentences=SENTENCES, validation_sentences=SENTENCES[:5], test_sentences=SENTENCES[5:],
                  seed=0, max_length=32, device="cpu", eval_batch_size=4, work_dir=tmp_path / "work",
                  out_dir=tmp_path / "out", progress=False)
    assert seen == {expected}
    assert run["precision_plan"]["autocast"] == (None if compute_dtype == "fp32" else compute_dtype)
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert f"| autocast | {run['precision_plan']['autocast'] or 'none'} |" in card


@pytest.mark.slow
def test_qlora_checkpoints_without_the_reentrant_variant(fp32_base, tmp_path, monkeypatch):
    """prepare_model_for_kbit_training's checkpointing is the non-reentrant one (PEFT's default falls back)."""
    import transformers.modeling_utils

    from ftflow.train.trainer import train_lora

    calls = []
    checkpoint = transformers.modeling_utils.checkpoint

    def recording(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant", "not given"))
        return checkpoint(function, *args, **kwargs)

    # The decoder layers call the function transformers bound when checkpointing was turned on.
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", recording)
    settings = TrainSettings(epochs=1, learning_rate=1e-2, batch_size=4, max_length=32, seed=0, device="cpu",
                             precision="nf4", eval_batch_size=4, progress=False)
    train_lora(fp32_base["path"], tiny_tokenizer(), SENTENCES, SENTENCES[:5], r=4, alpha=8, dropout=0.0,
               target_modules="all-linear", settings=settings, work_dir=tmp_path / "work",
               adapter_dir=tmp_path / "adapter", quantization={"compute_dtype": "fp32"})
    assert calls and set(calls) == {False}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_full_weight_runs_checkpoint_at_epoch_ends_and_peft_runs_every_checkpoint_steps(method, fp32_base, tmp_path,
                                                                                       monkeypatch):
    """16 sentences, batch 4, 2 epochs: 8 steps. A full checkpoint holds every weight and its optimizer state."""
    import transformers

    from ftflow.train.trainer import train_lora

    saved_at = []
    save = transformers.Trainer._save_checkpoint

    def recording(self, *args, **kwargs):
        saved_at.append(self.state.global_step)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", recording)
    settings = TrainSettings(epochs=2, learning_rate=1e-3, batch_size=4, max_length=32, seed=0, device="cpu",
                             eval_batch_size=4, progress=False, checkpoint_steps=3)
    tokenizer = tiny_tokenizer()
    if method == "full":
        train_full(fp32_base["path"], tokenizer, encode_dataset(tokenizer, SENTENCES * 2, 32), SENTENCES[:5],
                   settings=settings, work_dir=tmp_path / "work", model_dir=tmp_path / "model")
    else:
        train_lora(fp32_base["path"], tokenizer, SENTENCES * 2, SENTENCES[:5], r=4, alpha=8, dropout=0.0,
                   target_modules="all-linear", settings=settings, work_dir=tmp_path / "work",
                   adapter_dir=tmp_path / "adapter")
    if method == "full":
        assert saved_at == [4, 8]
    else:  # every 3 steps and at epoch ends (the last step's twice: the Trainer's end-of-training save, then ftflow's)
        assert sorted(set(saved_at)) == [3, 4, 6, 8]
    # One checkpoint kept (save_total_limit), the last.
    assert sorted(p.name for p in (tmp_path / "work").glob("checkpoint-*")) == ["checkpoint-8"]
