"""How training runs are made to fit: the chooser on the study's models, 8-bit state, micro-batches (Trainer)."""

from __future__ import annotations

import pytest
import torch

from ftflow.config import DEFAULT_FIT_ORDER, ConfigError, parse_config
from ftflow.models import architecture
from ftflow.models.architecture import model_config_for
from ftflow.plan import decide as plan_decide
from ftflow.plan.fit import choose_fit
from ftflow.plan.predict import GB, adamw_8bit_state_bytes, predict_training
from ftflow.train.trainer import TrainSettings, encode_dataset, fit
from tests.tiny import SENTENCES, tiny_model, tiny_tokenizer

BUDGET = 20 * GB
# sst2's longest training sentence is 47 words: ~72 tokens under these models' tokenizers (planned for here).
LENGTH = 72


def _fit(model_id, precision, method, **options):
    options = {"batch_size": 4, "max_length": LENGTH, "budget_bytes": BUDGET, "eval_batch_size": 8,
               "eval_length": LENGTH, **options}
    return choose_fit(model_config_for(model_id), precision, method, name=model_id.split("/")[1], **options)


def test_the_study_runs_fit_20_gb_with_exactly_what_they_need():
    # Section 3.1: LoRA (r 16, dropout 0.05) on the 8B teacher in bf16: 22.4 GB at batch 4 in one pass.
    lora8b = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", lora_r=16)
    assert lora8b.tried[0]["peak_bytes"] > BUDGET
    assert (lora8b.fits, lora8b.micro_batch_size, lora8b.accumulation_steps, lora8b.gradient_checkpointing,
            lora8b.optimizer, lora8b.techniques) == (True, 1, 4, False, "adamw", ("micro_batch",))
    assert lora8b.peak_bytes == predict_training(
        model_config_for("ibm-granite/granite-3.3-8b-base"), "bf16", "lora", 1, LENGTH, lora_r=16,
        eval_batch_size=8, eval_length=LENGTH, accumulation_steps=4).peak_bytes
    assert lora8b.summary == ("granite-3.3-8b-base lora: micro-batch 1 x 4 accumulation, checkpointing off, "
                              "fp32 AdamW, predicted 19.0 GB (budget 20 GB)")
    # Qwen2.5-7B: micro-batches of 2 are enough.
    qwen = _fit("Qwen/Qwen2.5-7B", "bf16", "lora", lora_r=16)
    assert (qwen.micro_batch_size, qwen.accumulation_steps, qwen.techniques) == (2, 2, ("micro_batch",))
    # QLoRA and the prefix grid's longest prefix need nothing.
    assert _fit("ibm-granite/granite-3.3-8b-base", "nf4", "lora", lora_r=16).techniques == ()
    prefix = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "prefix", num_virtual_tokens=16)
    assert (prefix.micro_batch_size, prefix.techniques) == (4, ())
    # Section 3.3: granite-3.3-2b in full (fp32 in the config): 41.9 GB; 8-bit state alone leaves fp32 weights and
    # gradients (25.4 GB); bf16 weights with fp32 AdamW and its Kahan buffer are 25.3 GB; both together fit.
    for method in ("full", "distill"):
        full = _fit("ibm-granite/granite-3.3-2b-base", "fp32", method)
        assert (full.fits, full.micro_batch_size, full.gradient_checkpointing, full.optimizer, full.train_precision,
                full.update, full.techniques) == (True, 4, False, "adamw-8bit", "bf16",
                                                  "adamw-8bit-stochastic-rounding", ("optimizer_8bit", "half_weights"))
    assert round(full.tried[0]["peak_bytes"] / GB, 1) == 41.9
    # Weights, gradients (bf16) and 8-bit state; the peak is the end of backward, where the tied embedding's
    # second gradient is summed (two more embedding-sized tensors). The 8-bit step updates one 4M-element slice
    # at a time (55 MB of temporaries), no longer fp32 copies of the whole 100.7M-element embedding (16.62 GB).
    assert round(full.peak_bytes / GB, 2) == 16.22
    # TinyLlama in full fits as configured: nothing special.
    tiny = _fit("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "fp32", "full")
    assert (tiny.micro_batch_size, tiny.gradient_checkpointing, tiny.optimizer, tiny.train_precision,
            tiny.techniques) == (4, False, "adamw", "fp32", ())


def test_checkpointing_only_when_micro_batches_are_not_enough_and_skips_say_why():
    # At 1024 tokens the 8B LoRA does not fit even one sentence a pass without checkpointing; with it, two.
    long = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", lora_r=16, max_length=1024, eval_length=64)
    assert (long.micro_batch_size, long.gradient_checkpointing, long.techniques) == (
        2, True, ("micro_batch", "checkpointing"))
    # The order is the config's: without micro_batch, checkpointing alone keeps the whole batch in one pass.
    alone = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", lora_r=16, fit_order=["checkpointing"])
    assert (alone.micro_batch_size, alone.gradient_checkpointing, alone.techniques) == (4, True, ("checkpointing",))
    # The 8B in full does not fit 20 GB whatever is done: skipped, with the smallest peak and the way out (its
    # 8-bit step on bf16 weights: one 4M-element slice of temporaries, no longer fp32 copies of the whole 201M-element
    # embedding, 35.24 GB before).
    skipped = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "full")
    assert not skipped.fits
    assert skipped.reason.startswith("nothing in fit_order ['micro_batch', 'checkpointing', 'optimizer_8bit', "
                                     "'half_weights', 'paged_optimizer'] fits: the smallest predicted peak is 34.43 GB "
                                     "(micro-batch 1 x 4, checkpointing, paged-adamw-8bit, bf16 weights)")
    assert "training.memory_budget_gb" in skipped.reason
    # fit_order [] only checks.
    assert not _fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", lora_r=16, fit_order=[]).fits
    with pytest.raises(ValueError, match="at most once"):
        _fit("Qwen/Qwen2.5-0.5B", "fp32", "lora", fit_order=["micro_batch", "micro_batch"])


@pytest.mark.parametrize("method", ["full", "distill", "lora", "prefix"])
def test_the_demo_chooses_nothing_special(method):
    """The demo's zoo teacher (configs/demo.yaml) at its batch size 16: one pass, no checkpointing, fp32 AdamW."""
    from transformers import GraniteConfig

    config = GraniteConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256, vocab_size=1024, tie_word_embeddings=True)
    plan = choose_fit(config, "fp32", method, batch_size=16, max_length=40, budget_bytes=BUDGET, eval_batch_size=32,
                      eval_length=40, device="cpu")
    assert (plan.micro_batch_size, plan.accumulation_steps, plan.gradient_checkpointing, plan.optimizer,
            plan.train_precision, plan.master_weights, plan.update, plan.techniques) == (
        16, 1, False, "adamw", "fp32", None, "adamw", ())


def test_training_budget_defaults_to_the_scoring_budget_and_fit_order_is_validated(tmp_path):
    raw = {"data": {"synthetic": {}}, "models": [{"name": "m", "path": "org/m", "family": "f", "precision": "fp32"}],
           "memory_budget_gb": 24}
    cfg = parse_config(raw, tmp_path)
    assert cfg.training_budget_gb == 24 and cfg.training.fit_order == DEFAULT_FIT_ORDER
    cfg = parse_config({**raw, "training": {"memory_budget_gb": 40, "fit_order": ["checkpointing"]}}, tmp_path)
    assert cfg.training_budget_gb == 40 and cfg.training.fit_order == ("checkpointing",)
    with pytest.raises(ConfigError, match="training.fit_order"):
        parse_config({**raw, "training": {"fit_order": ["micro_batch", "quantize"]}}, tmp_path)


def test_8bit_state_bytes_are_bitsandbytes_own():
    """The predicted 8-bit AdamW state equals what bitsandbytes allocates, for every tensor size class."""
    bnb = pytest.importorskip("bitsandbytes")
    sizes = [64, 4095, 4096, 4097, 256 * 40 + 1, 65536]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    assert sum(storages.values()) == adamw_8bit_state_bytes(sizes)
    # 64 and 4095 elements keep fp32 moments (8 bytes each); the others 2 bytes + 2 absmax per 256; the maps once.
    assert adamw_8bit_state_bytes(sizes) == 8 * (64 + 4095) + 2 * (4096 + 4097 + 10241 + 65536) + 8 * (
        16 + 17 + 41 + 256) + 2048
    # A model's prediction: full fine-tuning in bf16 with 8-bit state keeps no Kahan buffer.
    config = model_config_for("ibm-granite/granite-3.3-2b-base")
    counts = architecture.parameter_counts(config)
    eight = predict_training(config, "bf16", "full", 1, 64, optimizer="adamw-8bit")
    assert eight.optimizer_bytes == adamw_8bit_state_bytes(counts.tensor_sizes)
    assert predict_training(config, "bf16", "full", 1, 64).optimizer_bytes == 6 * counts.total  # moments + Kahan
    paged = predict_training(config, "bf16", "full", 1, 64, optimizer="paged-adamw-8bit")
    assert paged.optimizer_bytes == adamw_8bit_state_bytes([max(counts.tensor_sizes)])


def test_8bit_adamw_keeps_small_steps_on_bf16_weights_by_stochastic_rounding():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from ftflow.train.optimizers import adamw_8bit_class, stochastic_round_to_bf16

    # Rounding: a quarter of a bf16 step above 1.0 rounds up a quarter of the time; exact values stay.
    quarter = torch.full((200_000,), 1.0 + 2**-9, dtype=torch.float32)
    rounded = stochastic_round_to_bf16(quarter, torch.Generator().manual_seed(0))
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0078125}
    assert rounded.float().mean().item() == pytest.approx(1.0 + 2**-9, abs=2e-5)
    assert torch.equal(stochastic_round_to_bf16(torch.tensor([0.5, -3.0, float("inf")])),
                       torch.tensor([0.5, -3.0, float("inf")], dtype=torch.bfloat16))

    def run(cls, dtype=torch.bfloat16):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.full((65536,), 0.03, dtype=torch.bfloat16).to(dtype))
        optimizer = cls([weight], lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        for _ in range(10):
            weight.grad = torch.full_like(weight, -1.0)
            optimizer.step()
        return weight.detach().float()

    start = torch.full((65536,), 0.03, dtype=torch.bfloat16).float()
    assert torch.equal(run(bnb.optim.AdamW8bit), start)  # bitsandbytes alone: every update rounded away
    # 10 steps of about 2e-5 (a bf16 step at 0.03 is 1.2e-4): the same 8-bit update on fp32 weights is the
    # reference; stochastically rounded bf16 weights reach it on average (noise of the mean: 0.4%).
    reference = (run(bnb.optim.AdamW8bit, torch.float32) - start).mean().item()
    # A constant gradient makes every exact AdamW step lr (10 x 2e-5 = 2e-4); 8-bit moments quantise that
    # step by up to a few percent (1.973e-4 on one machine; bitsandbytes' CPU kernels differ by CPU).
    assert reference == pytest.approx(2e-4, rel=0.03)
    moved = (run(adamw_8bit_class()) - start).mean().item()
    assert moved == pytest.approx(reference, rel=0.02)


def _train(base, tmp_path, name, batching, **settings):
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    run = TrainSettings(epochs=1, learning_rate=1e-3, batch_size=4, max_length=32, seed=0, device="cpu",
                        eval_batch_size=4, progress=False, checkpoint_steps=100, **settings)
    losses = []
    result = fit(model, tokenizer, encode_dataset(tokenizer, SENTENCES * 2, 32), SENTENCES[:4], run,
                 tmp_path / name, lambda m: None, batching=batching,
                 on_progress=lambda e: losses.append(e["loss"]) if e.get("validation_ppl") is None or
                 isinstance(e["epoch"], float) else None)
    result["checkpointing"] = model.is_activation_checkpointing
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, result


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("fit-base")
    tiny_model("llama", hidden_size=64).save_pretrained(path)
    return path


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_micro_batches_with_accumulation_train_like_the_full_batch(base, tmp_path, batching):
    """The Trainer, 16 sentences of different lengths, batch 4: 4 optimizer steps, in 1 x 4, 2 x 2 and 4 x 1."""
    full_losses, full_weights, full = _train(base, tmp_path, "full", batching)
    assert len(full_losses) == 4
    for micro, checkpointing in ((2, False), (1, True)):
        losses, weights, result = _train(base, tmp_path, f"micro{micro}", batching, micro_batch_size=micro,
                                         gradient_checkpointing=checkpointing)
        # The logged loss of every step (rounded to 4 decimals by the Trainer) and the weights after it.
        assert result["checkpointing"] is checkpointing and full["checkpointing"] is False
        assert losses == pytest.approx(full_losses, abs=1e-4)
        for key, value in full_weights.items():
            assert torch.allclose(weights[key], value, rtol=0, atol=1e-5), key
        assert result["history"][-1]["validation"]["corpus_ppl"] == pytest.approx(
            full["history"][-1]["validation"]["corpus_ppl"], rel=1e-5)
    with pytest.raises(ValueError, match="micro_batch_size 3 must divide batch_size 4"):
        _train(base, tmp_path, "bad", batching, micro_batch_size=3)


@pytest.mark.parametrize("packed", [True, False])
def test_distillation_micro_batches_give_the_full_batch_loss_per_token(tmp_path, packed):
    """DistillationTrainer: 4 sentences of different lengths as 1 x 4 micro-batches give the 4-sentence step."""
    from transformers import TrainingArguments

    from ftflow.distill.teacher import compute_teacher_topk
    from ftflow.distill.trainer import DistillationCollator, DistillationTrainer
    from ftflow.tokens import pad_token_id, sentence_ids

    tokenizer = tiny_tokenizer()
    sentences = SENTENCES[:4]
    assert len({len(s.split()) for s in sentences}) > 1  # lengths differ: a mean of micro-batch means would not do
    topk = compute_teacher_topk(tiny_model("llama", seed=0, hidden_size=48), tokenizer, sentences, k=4,
                                max_length=16, progress=False)
    dataset = [{"input_ids": sentence_ids(tokenizer, s, 16)[0], "sentence_index": i} for i, s in enumerate(sentences)]

    def train(micro: int):
        args = TrainingArguments(output_dir=str(tmp_path / f"out{micro}"), per_device_train_batch_size=micro,
                                 gradient_accumulation_steps=4 // micro, max_steps=3, learning_rate=1e-2,
                                 lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
                                 remove_unused_columns=False, save_strategy="no", seed=0)
        trainer = DistillationTrainer(model=tiny_model("llama", seed=1), args=args, train_dataset=dataset,
                                      data_collator=DistillationCollator(pad_token_id(tokenizer), topk, packed=packed),
                                      alpha=0.5, temperature=2.0)
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return losses, [p.detach().clone() for p in trainer.model.parameters()]

    full_losses, full_weights = train(4)
    losses, weights = train(1)
    assert losses == pytest.approx(full_losses, abs=1e-4)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(weights, full_weights))


def test_study_runs_compute_in_flops_and_hours_from_parameters_and_tokens(tmp_path):
    """A planned run's FLOPs: (4 N + 2 N_trainable) per training token, + 2 N checkpointed; 2 N per scored token."""
    from ftflow.plan.study import GPU_PEAK_TFLOPS, TokenStats, plan_study_runs, token_stats, training_flops_per_token

    assert training_flops_per_token(10, 10, False) == 60 and training_flops_per_token(10, 1, True) == 62
    assert token_stats(None, ["a b c", "one two three four five six seven eight nine"], 2048) == TokenStats(
        2, 6 + 15, 15, False)  # 1 + ceil(1.5 * words)
    tokenizer = tiny_tokenizer()
    assert token_stats(tokenizer, ["the cat sat on the mat"], 2048) == TokenStats(1, 7, 7, True)

    cfg = parse_config({"data": {"synthetic": {}}, "models": [
        {"name": "big", "path": "ibm-granite/granite-3.3-8b-base", "family": "granite", "precision": "bf16"},
        {"name": "small", "path": "ibm-granite/granite-3.3-2b-base", "family": "granite", "precision": "fp32"}],
        "lora": {"r": 8, "batch_size": 4}, "qlora": {"enabled": False}, "prefix": {"enabled": False},
        "finetune": {"max_params": 2_600_000_000, "batch_size": 4, "epochs": 2},
        "distill": {"top_k": [10], "batch_size": 4}, "select": {"student_max_params": 2_600_000_000},
        "augment": {"enabled": False}}, tmp_path)
    models = [{"name": m.name, "path": m.path, "family": m.family, "precision": m.precision,
               "trust_remote_code": False} for m in cfg.models]
    parameters = {"big": 8_170_864_640, "small": 2_533_539_840}
    split = {"train": TokenStats(900, 90_000, 72, False), "validation": TokenStats(100, 10_000, 72, False),
             "test": TokenStats(100, 10_000, 72, False)}
    runs, notes = plan_study_runs(cfg, models, parameters, {"big": split, "small": split}, eval_batch_size=8)
    assert [r.title for r in runs] == ["lora[big|r8,a16,d0.05,lr0.0002]", "lora[small|r8,a16,d0.05,lr0.0002]",
                                       "full[small|lr5e-05]", "distill[small|top10,T1,a0.5,lr5e-05]"]
    assert notes[0].startswith("family granite as if selected: teacher big, student small")
    # The teacher pass, planned on the teacher's run that leaves it the least memory (here its only one).
    batch = plan_decide.largest_teacher_batch_size(model_config_for("ibm-granite/granite-3.3-8b-base"), "bf16", 20 * GB,
                                              72, 256, k=10, method="lora", lora_r=8)
    assert notes[-1].startswith(f"teacher pass (topk, top 10, 72 tokens): batch size {batch} with "
                                "lora[big|r8,a16,d0.05,lr0.0002] as the teacher (the least room of the teacher's 1 "
                                "runs), predicted ")
    full = runs[2]
    assert (full.section, full.compute_dtype, full.fit.train_precision) == ("3.3 full", "bf16", "bf16")
    n = 2_533_539_840
    assert full.train_flops == 6 * n * 90_000 * 2  # every weight trained, two epochs
    assert full.eval_flops == 2 * n * (10_000 * 3 + 10_000)  # base model + 2 epochs on validation, test once
    assert full.hours("a100", 0.5) == pytest.approx(full.flops / (312e12 * 0.5) / 3600)
    lora = runs[0]
    trainable = lora.fit.prediction["trainable_parameters"]
    assert lora.train_flops == (4 * 8_170_864_640 + 2 * trainable) * 90_000 * 2 and lora.compute_dtype == "bf16"
    assert runs[1].compute_dtype == "fp32"  # LoRA on the fp32 model computes in fp32: the fp32 peak
    assert runs[1].hours("a100", 0.5) == pytest.approx(runs[1].flops / (GPU_PEAK_TFLOPS["a100"][1] * 1e12 * 0.5)
                                                       / 3600)


def test_a_lora_grid_that_cannot_fit_is_said_once_before_training():
    from ftflow.errors import UserError
    from ftflow.plan.fit import GridDoesNotFitError, check_grid_fits

    plans = [_fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", lora_r=r, budget_bytes=15 * GB) for r in (8, 16)]
    assert not any(p.fits for p in plans)
    with pytest.raises(GridDoesNotFitError, match=r"no combination of the teacher's LoRA grid \(2 runs\) fits the "
                       r"training budget: the smallest, lora\[a\], nothing in fit_order .* over the training budget "
                       r"of 15.00 GB .* Nothing was trained.") as caught:
        check_grid_fits(plans, ["lora[a]", "lora[b]"])
    assert isinstance(caught.value, UserError)  # ftflow run: one "ftflow:" line, exit 2
    fitting = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", lora_r=8)
    assert check_grid_fits([plans[0], fitting], ["lora[a]", "lora[b]"]) == [plans[0], fitting]


def _small_model(tmp_path, precision):
    """A two-layer Llama config (hidden 64, intermediate 160, vocab 300) saved as the model directory a job names."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    config.save_pretrained(tmp_path)
    return config, {"name": "m", "path": str(tmp_path), "family": "f", "precision": precision,
                    "trust_remote_code": False}


def test_a_job_is_planned_on_the_set_that_trains_and_its_validation_pass(tmp_path):
    """plan_training_job measures the run's own data: the longest sentence of the set that trains, the longest
    validation sentence for the pass between epochs, both under the run's tokenizer and at most max_length."""
    from ftflow.config import FinetuneConfig
    from ftflow.plan.fit import plan_training_job
    from ftflow.train.jobs import full_job

    config, model = _small_model(tmp_path, "fp32")
    job = full_job(FinetuneConfig(batch_size=2), model)
    original = ["the cat sat on the mat", "a dog ran fast"]  # at most 6 words: 7 tokens with <s>
    # Random insertion (augmentation) lengthened the first sentence to 11 words.
    augmented = original + ["the big cat sat on the red mat and ran fast"]
    validation = ["the film was very good and fun"]  # 7 words: 8 tokens
    common = dict(tokenizer=tiny_tokenizer(), validation_sentences=validation, eval_batch_size=4, max_length=2048,
                  budget_bytes=BUDGET, device="cpu")
    on_original = plan_training_job(job, train_sentences=original, **common)
    on_augmented = plan_training_job(job, train_sentences=augmented, **common)
    assert (on_original.max_length, on_augmented.max_length) == (7, 12)
    assert (on_augmented.prediction["eval_length"], on_augmented.prediction["eval_batch_size"]) == (8, 4)
    assert on_augmented.prediction["step_peak_bytes"] == predict_training(config, "fp32", "full", 2, 12,
                                                                          device="cpu").peak_bytes
    assert plan_training_job(job, train_sentences=augmented, **{**common, "max_length": 9}).max_length == 9
    # A budget the step fits in but the validation pass (64 sentences a batch) does not: with nothing to try
    # (fit_order empty: only check), the run does not fit, at the validation pass's peak.
    wide = predict_training(config, "fp32", "full", 2, 12, device="cpu", eval_batch_size=64, eval_length=8)
    assert wide.step_peak_bytes < wide.eval_peak_bytes
    over = plan_training_job(job, train_sentences=augmented, fit_order=(),
                             **{**common, "eval_batch_size": 64, "budget_bytes": wide.step_peak_bytes})
    assert not over.fits and over.peak_bytes == wide.eval_peak_bytes


def test_a_job_is_planned_with_its_own_settings(tmp_path):
    """The job's method (QLoRA as itself), LoRA rank and dropout and prefix length are what is planned."""
    from ftflow.config import FinetuneConfig, LoraConfig, PrefixConfig, QLoraConfig
    from ftflow.plan.fit import plan_training_job
    from ftflow.train.jobs import full_job, lora_grid, prefix_grid, qlora_like

    config, model = _small_model(tmp_path, "bf16")
    data = dict(tokenizer=tiny_tokenizer(), train_sentences=["the cat sat on the mat"],
                validation_sentences=["a dog ran fast"], eval_batch_size=4, max_length=2048, device="cuda")
    lengths = dict(eval_batch_size=4, eval_length=5, device="cuda")  # trains on 7 tokens (<s> + 6 words); 5 scored

    def plan(job, budget=BUDGET, **options):
        return plan_training_job(job, budget_bytes=budget, **data, **options)

    p2, p64 = prefix_grid(PrefixConfig(num_virtual_tokens=[2, 64], batch_size=2), model)
    assert plan(p2).prediction == predict_training(config, "bf16", "prefix", 2, 7, num_virtual_tokens=2,
                                                   **lengths).to_dict()
    assert plan(p64).prediction == predict_training(config, "bf16", "prefix", 2, 7, num_virtual_tokens=64,
                                                    **lengths).to_dict()
    # 62 more virtual tokens: 62 more key/value vectors per layer and longer attention.
    assert plan(p2).peak_bytes < plan(p64).peak_bytes
    assert plan(p2).prediction != predict_training(config, "bf16", "prefix", 2, 7, num_virtual_tokens=8,
                                                   **lengths).to_dict()
    d0, d1 = lora_grid(LoraConfig(r=16, dropout=[0.0, 0.1], batch_size=2), model)
    assert plan(d0).prediction == predict_training(config, "bf16", "lora", 2, 7, lora_r=16, lora_dropout=0.0,
                                                   **lengths).to_dict()
    assert plan(d1).prediction == predict_training(config, "bf16", "lora", 2, 7, lora_r=16, lora_dropout=0.1,
                                                   **lengths).to_dict()
    assert plan(d0).peak_bytes < plan(d1).peak_bytes  # dropout keeps its mask and its input for backward
    qlora = plan(qlora_like(d1, model, QLoraConfig()))
    assert qlora.method == "qlora" and qlora.prediction == predict_training(
        config, "nf4", "qlora", 2, 7, lora_r=16, lora_dropout=0.1, **lengths).to_dict()
    # bf16 full fine-tuning: fp32 master weights when an fp32 run fits, else bf16 weights (compensated update);
    # fp16 weights cannot be trained without fp32 master weights: nothing to fall back to.
    full = full_job(FinetuneConfig(batch_size=2), model)
    fp32_peak = predict_training(config, "fp32", "full", 2, 7, **lengths).peak_bytes
    assert plan(full).master_weights == "fp32" and plan(full).peak_bytes == fp32_peak
    halved = plan(full, fp32_peak - 1, fit_order=("half_weights",))
    assert (halved.fits, halved.master_weights, halved.update) == (True, "bf16", "adamw-kahan")
    fp16 = plan(full.model_copy(update={"model": dict(model, precision="fp16")}), fp32_peak - 1,
                fit_order=("half_weights",))
    assert not fp16.fits and fp16.master_weights == "fp32"


def test_the_report_says_how_runs_were_made_to_fit():
    from ftflow.study.design import report_notes

    plan = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", lora_r=16)
    run = {"title": "lora[t|r16]", "fit_plan": plan.model_dump(mode="json"), "fit_summary": plan.summary}
    plain = {"title": "lora[s|r16]", "fit_plan": _fit("Qwen/Qwen2.5-0.5B", "fp32", "lora").model_dump(mode="json"),
             "fit_summary": "not shown: nothing was needed"}
    notes = report_notes([], [run, plain], [], 20.0, augmentation_table=False, truncated=0, max_length=2048)
    assert notes == ["memory fit: granite-3.3-8b-base lora: micro-batch 1 x 4 accumulation, checkpointing off, fp32 "
                     "AdamW, predicted 19.0 GB (budget 20 GB) (lora[t|r16])"]


def test_the_report_and_the_card_say_which_runs_ran_out_of_memory():
    from ftflow.study.design import report_notes
    from ftflow.train.cards import oom_retry_line

    retries = [{"failed": "t lora: batch 4, ...", "error": "CUDA out of memory.", "resume_from": "checkpoint-50",
                "next": "t lora: micro-batch 2 x 2 ...", "optimizer_state": "resumed",
                "change": "out of memory on the device with micro-batch 4 x 1: halved the micro-batch, now "
                          "micro-batch 2 x 2 (the effective batch stays 4)"},
               {"failed": "t lora: micro-batch 2 x 2 ...", "error": "CUDA out of memory.", "resume_from": None,
                "next": None, "optimizer_state": None, "change": None}]
    retries = [{**r, "line": oom_retry_line(r)} for r in retries]  # as run_job records them
    notes = report_notes([], [{"title": "lora[t|r16]", "oom_retries": retries}], [], 20.0, augmentation_table=False,
                         truncated=0, max_length=2048)
    assert notes == ["lora[t|r16] ran out of device memory 2 time(s): out of memory on the device with micro-batch 4 "
                     "x 1: halved the micro-batch, now micro-batch 2 x 2 (the effective batch stays 4); resumed from "
                     "checkpoint-50, optimizer state resumed; CUDA out of memory. with t lora: micro-batch 2 x 2 ...: "
                     "nothing left to try"]
    assert oom_retry_line({**retries[0], "resume_from": None, "optimizer_state": None}).endswith(
        "; no checkpoint yet, started over")


def _retries(plan, **options) -> list:
    """Every setting next_fit gives after plan, in order, until it gives None."""
    from ftflow.plan.fit import next_fit

    settings = []
    while (plan := next_fit(plan, **options)) is not None:
        settings.append(plan)
    return settings


def test_after_out_of_memory_the_next_technique_of_fit_order_then_halved_micro_batches():
    # The 8B LoRA run, planned at micro-batch 1 x 4 (19.0 GB): what is left after an out-of-memory error.
    planned = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", lora_r=16)
    retries = _retries(planned)
    assert [r.setting for r in retries] == ["micro-batch 1 x 4, checkpointing",
                                            "micro-batch 1 x 4, checkpointing, adamw-8bit",
                                            "micro-batch 1 x 4, checkpointing, paged-adamw-8bit"]
    assert [r.oom_retries for r in retries] == [1, 2, 3]
    assert all(r.batch_size == 4 and r.micro_batch_size * r.accumulation_steps == 4 for r in retries)
    assert retries[-1].techniques == ("micro_batch", "checkpointing", "optimizer_8bit", "paged_optimizer")
    assert retries[0].reason == ("out of memory on the device with micro-batch 1 x 4: turned on checkpointing, now "
                                 "micro-batch 1 x 4, checkpointing (the effective batch stays 4)")
    assert retries[0].summary.endswith("after 1 out-of-memory error(s) on the device (the plan predicted 19.0 GB, "
                                       "budget 20 GB)")
    # A full fine-tune of an fp32 model on the CPU, planned with nothing on: halving a micro-batch of 6 gives 3
    # (a divisor of the batch), no paged state off CUDA, bf16 weights where the device has bf16.
    full = _fit("Qwen/Qwen2.5-0.5B", "fp32", "full", batch_size=6, budget_bytes=100 * GB)
    assert full.setting == "micro-batch 6 x 1"
    cpu = _retries(full, device="cpu")
    assert [r.setting for r in cpu] == [
        "micro-batch 3 x 2", "micro-batch 3 x 2, checkpointing", "micro-batch 3 x 2, checkpointing, adamw-8bit",
        "micro-batch 3 x 2, checkpointing, adamw-8bit, bf16 weights",
        "micro-batch 1 x 6, checkpointing, adamw-8bit, bf16 weights"]
    assert (cpu[-1].train_precision, cpu[-1].update) == ("bf16", "adamw-8bit-stochastic-rounding")
    no_bf16 = _retries(full, device="cpu", bf16_supported=False)
    assert all(r.train_precision == "fp32" for r in no_bf16) and len(no_bf16) == 4
    # Only what fit_order names: no micro_batch there, so no halving either.
    only = _fit("Qwen/Qwen2.5-0.5B", "fp32", "full", batch_size=6, budget_bytes=100 * GB, fit_order=("checkpointing",))
    assert [r.setting for r in _retries(only)] == ["micro-batch 6 x 1, checkpointing"]
    assert _retries(_fit("Qwen/Qwen2.5-0.5B", "fp32", "full", batch_size=6, budget_bytes=100 * GB, fit_order=())) == []


def test_a_skipped_run_has_no_retry():
    from ftflow.plan.fit import next_fit

    skipped = _fit("ibm-granite/granite-3.3-8b-base", "bf16", "lora", budget_bytes=15 * GB)
    with pytest.raises(ValueError, match="was not trained"):
        next_fit(skipped)


def test_fitted_runs_train_through_ftflows_own_paths(base, tmp_path):
    """LoRA with checkpointing and micro-batches, and bf16 full fine-tuning with 8-bit AdamW, on CPU."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from ftflow.train.trainer import train_full, train_lora

    tokenizer = tiny_tokenizer()
    settings = dict(epochs=1, learning_rate=1e-3, batch_size=4, max_length=32, seed=0, device="cpu",
                    eval_batch_size=4, progress=False, checkpoint_steps=100)
    lora = train_lora(str(base), tokenizer, SENTENCES * 2, SENTENCES[:4], r=4, alpha=8, dropout=0.0,
                      target_modules="all-linear", work_dir=tmp_path / "lora", adapter_dir=tmp_path / "adapter",
                      settings=TrainSettings(**settings, micro_batch_size=2, gradient_checkpointing=True,
                                             optimizer="adamw-8bit"))
    assert lora["precision_plan"]["optimizer"] == "adamw-8bit" and lora["history"][-1]["step"] == 4
    assert lora["best_validation_ppl"] < lora["baseline_validation"]["corpus_ppl"]
    # An fp32 model trained as bf16 weights (half_weights) with 8-bit state: stochastic rounding, every tensor moves.
    full = train_full(str(base), tokenizer, encode_dataset(tokenizer, SENTENCES * 2, 32), SENTENCES[:4],
                      work_dir=tmp_path / "full", model_dir=tmp_path / "model",
                      settings=TrainSettings(**{**settings, "learning_rate": 1e-4}, precision="bf16",
                                             master_weights="bf16", optimizer="adamw-8bit"))
    assert full["precision_plan"] == {"load": "bf16", "trained_weights": "bf16", "autocast": None,
                                      "loss_scaling": False, "optimizer": "adamw-8bit-stochastic-rounding"}
    before = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=None).state_dict()
    assert all(after[k].dtype == torch.bfloat16 for k in after)
    assert all(not torch.equal(after[k], before[k]) for k in before)
