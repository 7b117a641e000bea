"""ftflow.plan (predict, decide): exact counts, the study's memory findings, and the planner's decisions.

Everything runs on configs (``meta`` device) or tiny models, so the file takes
seconds on a CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    LlamaConfig,
    Qwen2Config,
)

from ftflow.distill import teacher as distill_teacher
from ftflow.models import architecture
from ftflow.plan import decide as plan_decide
from ftflow.plan import plots as plan_plots
from ftflow.plan import predict as plan_predict
from ftflow.plan import tables as plan_tables
from ftflow.models.known import ARCHITECTURE_FIELDS, KNOWN_MODELS, PUBLISHED_PARAMETERS
from ftflow.plan.predict import (GB, NF4_BYTES_PER_PARAM, RUNTIME_OVERHEAD_BYTES, TRAINING_LAYER_BYTES,
                                 predict_scoring, predict_training)
from ftflow.models.architecture import UnknownModelError, count_config_parameters, model_config_for, parameter_counts
from ftflow.plan.decide import choose_precision, largest_batch_size

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "granite": GraniteConfig}

# The study (shared/seed/report.md, section 1) on a 20 GB GPU. Its setting as read
# here: every sentence scored alone (batch size 1) with inputs cut at 2048 tokens
# (section 2.1), the worst case being a sentence that fills all 2048.
STUDY_BUDGET = 20 * GB
STUDY_BATCH, STUDY_LENGTH = 1, 2048
STUDY_SMALL = (  # "models <= 2B" (Granite's "2b" has 2.53B parameters)
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "Qwen/Qwen2.5-0.5B",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "meta-llama/Llama-3.2-1B-Instruct",
    "ibm-granite/granite-3.0-2b-base",
    "ibm-granite/granite-3.3-2b-base",
    "ibm-granite/granite-3.3-2b-instruct",
)
STUDY_LARGE = (
    "Qwen/Qwen2.5-7B-Instruct",
    "ibm-granite/granite-3.0-8b-base",
    "ibm-granite/granite-3.3-8b-base",
)


def small_config(architecture: str = "llama", **overrides):
    return CONFIG_CLASSES[architecture](**{**SMALL, **overrides})


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "granite"])
@pytest.mark.parametrize("tied", [True, False])
def test_meta_count_equals_a_real_model(architecture, tied):
    config = small_config(architecture, tie_word_embeddings=tied)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(config)
    assert count_config_parameters(config) == sum(p.numel() for p in real.parameters())
    counts = parameter_counts(config)
    linears = [m for m in real.modules() if isinstance(m, torch.nn.Linear) and m is not real.lm_head]
    assert counts.linear_weights == sum(m.weight.numel() for m in linears)
    assert counts.output_untied == (0 if tied else 300 * 64)


def test_tied_embeddings_are_counted_once():
    tied = count_config_parameters(small_config(tie_word_embeddings=True))
    untied = count_config_parameters(small_config(tie_word_embeddings=False))
    assert untied - tied == 300 * 64


def test_lora_and_prefix_trainable_counts_match_peft():
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    config = small_config("qwen2")
    counts = parameter_counts(config)
    lora = get_peft_model(AutoModelForCausalLM.from_config(config),
                          LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    assert lora.get_nb_trainable_parameters()[0] == counts.lora(4)
    prefix = get_peft_model(AutoModelForCausalLM.from_config(config),
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    predicted = predict_training(config, "fp32", "prefix", 1, 16, num_virtual_tokens=5)
    assert prefix.get_nb_trainable_parameters()[0] == predicted.trainable_parameters == 5 * 2 * 2 * 32


def test_every_known_model_has_every_field_and_builds():
    for model_id, numbers in KNOWN_MODELS.items():
        assert set(ARCHITECTURE_FIELDS) <= set(numbers), model_id
        config = model_config_for(model_id)
        assert config.model_type == numbers["model_type"]
        assert config.hidden_size == numbers["hidden_size"]


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_PARAMETERS))
def test_known_models_match_their_published_counts(model_id):
    counted = count_config_parameters(model_config_for(model_id))
    assert counted == pytest.approx(PUBLISHED_PARAMETERS[model_id], rel=0.03)


@pytest.mark.parametrize("model_id, exact", [
    # Exact counts of the published safetensors.
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1_100_048_384),
    ("Qwen/Qwen2.5-0.5B", 494_032_768),
    ("Qwen/Qwen2.5-7B", 7_615_616_512),
    ("meta-llama/Llama-3.2-1B", 1_235_814_400),
    ("meta-llama/Llama-3.2-3B", 3_212_749_824),
    ("ibm-granite/granite-3.3-2b-instruct", 2_533_539_840),
    ("ibm-granite/granite-3.3-8b-instruct", 8_170_864_640),
])
def test_known_models_exact_counts(model_id, exact):
    assert count_config_parameters(model_config_for(model_id)) == exact


# ----------------------------------------------------------------------------- finding configs


def test_known_hub_id_builds_the_right_config_class_case_insensitively():
    config = model_config_for("qwen/qwen2.5-0.5b")
    assert isinstance(config, Qwen2Config)
    assert (config.hidden_size, config.num_key_value_heads, config.tie_word_embeddings) == (896, 2, True)


def test_local_directory_is_read(tmp_path):
    small_config("granite", tie_word_embeddings=True).save_pretrained(tmp_path)
    config = model_config_for(str(tmp_path))
    assert isinstance(config, GraniteConfig)
    assert config.hidden_size == 64


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownModelError, match="config.json"):
        model_config_for(str(tmp_path))


def test_unknown_model_error_names_the_model_and_the_fixes():
    with pytest.raises(UnknownModelError) as error:
        model_config_for("nobody-org/no-such-model-7b")
    message = str(error.value)
    assert "nobody-org/no-such-model-7b" in message
    assert "ftflow/models/known.py" in message
    assert "local checkpoint directory" in message


# ----------------------------------------------------------------------------- predictions, exact values


def test_scoring_prediction_by_hand():
    """Full-logits scoring (logits_chunk_tokens=0): the [B, L, V] logits and what the loss copies of them."""
    config = small_config(tie_word_embeddings=False)
    n = count_config_parameters(config)
    batch, length = 3, 20
    fp32 = predict_scoring(config, "fp32", batch, length, device="cpu", logits_chunk_tokens=0)
    assert fp32.weights_bytes == 4 * n
    assert fp32.logits_bytes == batch * length * 300 * (4 + 8)
    assert fp32.activations_bytes == batch * length * (2 * 64 + 3 * 160) * 4 + batch * length * length
    assert fp32.peak_bytes == 4 * n + max(fp32.logits_bytes, fp32.activations_bytes) + RUNTIME_OVERHEAD_BYTES["cpu"]
    assert fp32.allocated_bytes == fp32.peak_bytes - RUNTIME_OVERHEAD_BYTES["cpu"]
    bf16 = predict_scoring(config, "bf16", batch, length, logits_chunk_tokens=0)
    assert bf16.weights_bytes == 2 * n
    assert bf16.logits_bytes == batch * length * 300 * (2 + 8)
    assert bf16.overhead_bytes == RUNTIME_OVERHEAD_BYTES["cuda"]
    cached = predict_scoring(config, "bf16", batch, length, kv_cache=True, logits_chunk_tokens=0)
    cache = 2 * 2 * batch * length * 32 * 2  # keys and values, 2 layers, kv_dim 32, bf16
    assert cached.peak_bytes == bf16.peak_bytes + cache
    assert cached.activations_bytes == bf16.activations_bytes + cache


def test_chunked_scoring_prediction_by_hand():
    config = small_config(tie_word_embeddings=False)  # hidden 64, vocab 300
    batch, length = 3, 20
    hidden = batch * length * 64 * 4  # the decoder's last hidden state, fp32
    # A chunk of 16 scored positions: their logits and log-softmax in fp32 (8 bytes each) beside the hidden states.
    small = predict_scoring(config, "fp32", batch, length, device="cpu", logits_chunk_tokens=16)
    assert small.logits_bytes == max(hidden + batch * 300 * (2 * 4 + 8), 2 * hidden, hidden + 16 * 300 * 8) == 53760
    # A chunk larger than the 3 x 19 scored positions is charged for those only.
    large = predict_scoring(config, "fp32", batch, length, device="cpu", logits_chunk_tokens=1024)
    assert large.logits_bytes == hidden + 57 * 300 * 8 == 152160
    bf16 = predict_scoring(config, "bf16", batch, length, logits_chunk_tokens=16)
    assert bf16.logits_bytes == batch * length * 64 * 2 + 16 * 300 * 8 == 46080
    full = predict_scoring(config, "fp32", batch, length, device="cpu", logits_chunk_tokens=0)
    assert full.logits_bytes == batch * length * 300 * 12 == 216000
    assert small.peak_bytes == small.weights_bytes + max(small.logits_bytes, small.activations_bytes) \
        + RUNTIME_OVERHEAD_BYTES["cpu"]
    with pytest.raises(ValueError, match="logits_chunk_tokens must be >= 0"):
        predict_scoring(config, "fp32", 1, 8, logits_chunk_tokens=-1)


def test_chunked_scoring_lets_qwen_0_5b_evaluate_126_sequences_of_2048_tokens_in_20_gb():
    """Issue 16: full logits cost 3.7 GB per 2048-token sequence of Qwen2.5-0.5B (batch 4 in 20 GB, fp32)."""
    config = model_config_for("Qwen/Qwen2.5-0.5B")
    full = plan_decide.plan_model("qwen", "Qwen/Qwen2.5-0.5B", 20 * GB, max_length=2048, logits_chunk_tokens=0)
    chunked = plan_decide.plan_model("qwen", "Qwen/Qwen2.5-0.5B", 20 * GB, max_length=2048)
    assert (full.precision, full.batch_size) == ("fp32", 4)
    assert (chunked.precision, chunked.batch_size) == ("fp32", 126)
    at_4 = predict_scoring(config, "fp32", 4, 2048)
    at_4_full = predict_scoring(config, "fp32", 4, 2048, logits_chunk_tokens=0)
    assert at_4_full.logits_bytes == 4 * 2048 * 151936 * 12 == 14_935_916_544
    # 1024 positions of logits (8 bytes each) beside the hidden states: the logits' share down 12x.
    assert at_4.logits_bytes == 4 * 2048 * 896 * 4 + 1024 * 151936 * 8 == 1_274_019_840


def test_nf4_weights_quantize_linear_layers_only():
    config = small_config(tie_word_embeddings=False)
    counts = parameter_counts(config)
    nf4 = predict_scoring(config, "nf4", 1, 8)
    assert nf4.weights_bytes == math.ceil(counts.linear_weights * NF4_BYTES_PER_PARAM) + 2 * counts.unquantized
    assert counts.unquantized == 2 * 300 * 64 + (2 * 2 + 1) * 64  # embeddings, output layer, norms


def test_nf4_bytes_per_parameter_match_bitsandbytes():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(512, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True).to("cpu")
    state = layer.weight.quant_state
    stored = layer.weight.numel() * layer.weight.element_size() + state.absmax.numel() * state.absmax.element_size()
    stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert stored == pytest.approx(512 * 256 * NF4_BYTES_PER_PARAM, rel=0.01)


def test_full_training_state_by_hand():
    config = small_config(tie_word_embeddings=True)
    n = count_config_parameters(config)
    fp32 = predict_training(config, "fp32", "full", 2, 16)
    assert (fp32.weights_bytes, fp32.gradients_bytes, fp32.optimizer_bytes) == (4 * n, 4 * n, 8 * n)
    assert fp32.logits_bytes == 2 * 16 * 300 * 12
    bf16 = predict_training(config, "bf16", "full", 2, 16)
    # bf16 weights train with the Kahan-compensated AdamW: two bf16 moments and a bf16 compensation buffer.
    assert (bf16.weights_bytes, bf16.gradients_bytes, bf16.optimizer_bytes) == (2 * n, 2 * n, 6 * n)
    embedding = 300 * 64 * 4
    # Start of backward: activations, logits and the output layer's gradient; end: every
    # gradient and, the embeddings being tied, two more embedding-sized tensors.
    dynamic = max(fp32.activations_bytes + fp32.logits_bytes + embedding, fp32.gradients_bytes + 2 * embedding)
    assert fp32.peak_bytes == 4 * n + 8 * n + dynamic + fp32.overhead_bytes
    untied = predict_training(small_config(tie_word_embeddings=False), "fp32", "full", 2, 16)
    n_untied = n + 300 * 64
    dynamic = max(untied.activations_bytes + untied.logits_bytes + embedding, 4 * n_untied)
    assert untied.peak_bytes == 12 * n_untied + dynamic + untied.overhead_bytes


def test_adapters_are_small_and_fp32():
    config = small_config()
    counts = parameter_counts(config)
    lora = predict_training(config, "bf16", "lora", 1, 16, lora_r=8)
    assert lora.trainable_parameters == counts.lora(8)
    assert lora.weights_bytes == 2 * counts.total + 4 * counts.lora(8)
    assert (lora.gradients_bytes, lora.optimizer_bytes) == (4 * counts.lora(8), 8 * counts.lora(8))
    qlora = predict_training(config, "nf4", "qlora", 1, 16, lora_r=8)
    # prepare_model_for_kbit_training keeps everything that is not 4-bit in fp32.
    expected = math.ceil(counts.linear_weights * NF4_BYTES_PER_PARAM) + 4 * counts.unquantized + 4 * counts.lora(8)
    assert qlora.weights_bytes == expected


def test_distillation_adds_the_kd_log_softmax_and_its_gradient():
    config = small_config(tie_word_embeddings=True)  # vocab 300
    batch, length = 4, 64  # activations and logits, not the gradients, make the peak
    for precision, extra in (("fp32", 8), ("bf16", 6)):  # 4 (the KD log-softmax) + d (its gradient branch)
        full = predict_training(config, precision, "full", batch, length)
        distill = predict_training(config, precision, "distill", batch, length)
        assert distill.case == "train-distill"
        assert distill.logits_bytes - full.logits_bytes == batch * length * 300 * extra
        assert distill.peak_bytes - full.peak_bytes == batch * length * 300 * extra == {8: 614400, 6: 460800}[extra]
        assert (distill.weights_bytes, distill.gradients_bytes, distill.optimizer_bytes) == (
            full.weights_bytes, full.gradients_bytes, full.optimizer_bytes)


def test_training_peak_includes_the_validation_pass_with_the_optimizer_resident():
    config = small_config()  # hidden 64, intermediate 160, vocab 300
    step_only = predict_training(config, "fp32", "lora", 1, 16, device="cpu")
    run = predict_training(config, "fp32", "lora", 1, 16, device="cpu", eval_batch_size=64, eval_length=20)
    assert step_only.peak_bytes == step_only.step_peak_bytes == run.step_peak_bytes == 470_868_480
    assert step_only.eval_peak_bytes == 0
    # Validation: 64 x 20 tokens; its MLP phase (2 hidden + 3 intermediate fp32 elements per token, and the
    # padding mask) is larger than its logits phase (one chunk of 1024 positions at 8 bytes per logit).
    layer = 64 * 20 * (2 * 64 + 3 * 160) * 4 + 64 * 20 * 20
    chunk = 64 * 20 * 64 * 4 + 1024 * 300 * 8
    assert (layer, chunk) == (3_138_560, 2_785_280)
    # Weights, adapters' AdamW moments resident, gradients not (the Trainer sets them to None after each step).
    assert run.eval_peak_bytes == run.weights_bytes + run.optimizer_bytes + layer + RUNTIME_OVERHEAD_BYTES["cpu"]
    assert run.eval_peak_bytes == 473_614_592
    assert run.peak_bytes == max(run.step_peak_bytes, run.eval_peak_bytes) == 473_614_592
    assert (run.eval_batch_size, run.eval_length) == (64, 20)
    # A small validation batch leaves the step as the peak.
    small = predict_training(config, "fp32", "lora", 1, 16, device="cpu", eval_batch_size=1, eval_length=20)
    assert small.peak_bytes == small.step_peak_bytes == 470_868_480 > small.eval_peak_bytes


def test_gradient_checkpointing_saves_activations_and_is_on_for_qlora():
    config = small_config(num_hidden_layers=6)
    plain = predict_training(config, "fp32", "full", 4, 64)
    checkpointed = predict_training(config, "fp32", "full", 4, 64, gradient_checkpointing=True)
    assert checkpointed.activations_bytes < plain.activations_bytes / 2
    assert predict_training(config, "nf4", "qlora", 4, 64).activations_bytes == predict_training(
        config, "nf4", "qlora", 4, 64, gradient_checkpointing=True).activations_bytes
    assert predict_training(config, "nf4", "qlora", 4, 64, gradient_checkpointing=False).activations_bytes \
        > predict_training(config, "nf4", "qlora", 4, 64).activations_bytes


def test_bad_arguments_are_reported_together():
    config = small_config()
    with pytest.raises(ValueError) as error:
        predict_training(config, "fp32", "qlora", 0, 1)
    message = str(error.value)
    assert "precision must be nf4" in message and "batch_size" in message and "max_length" in message
    with pytest.raises(ValueError, match="method='qlora'"):
        predict_training(config, "nf4", "full", 1, 8)
    with pytest.raises(ValueError, match="precision must be one of"):
        predict_scoring(config, "int8", 1, 8)


def _saved_bytes_per_layer_token(config, dtype, method: str) -> float:
    """Bytes saved for backward per token by one decoder layer (difference of 2 and 1 layers)."""
    from peft import LoraConfig, get_peft_model

    batch, length = 2, 16

    def saved(layers: int) -> int:
        model = AutoModelForCausalLM.from_config(small_config(**{**config, "num_hidden_layers": layers}), dtype=dtype)
        if method == "lora":
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_dropout=0.05,
                                                     target_modules="all-linear"))
        model.train()
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            return tensor

        ids = torch.randint(4, 300, (batch, length), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        return sum(storages.values())

    return (saved(3) - saved(2)) / (batch * length)


@pytest.mark.parametrize("method, dtype, group", [
    ("full", torch.float32, "fp32"), ("full", torch.bfloat16, "half"), ("lora", torch.float32, "fp32"),
])
def test_training_layer_bytes_match_what_autograd_saves(method, dtype, group):
    """The activation table is exact for this transformers version (re-measure if it fails after an upgrade)."""
    numbers = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
    measured = _saved_bytes_per_layer_token(numbers, dtype, method)
    shape = architecture._shape(small_config(**numbers))
    assert measured == TRAINING_LAYER_BYTES[(method, group)].per_token(shape, 8 if method == "lora" else 0)


# ----------------------------------------------------------------------------- the study, section 1


@pytest.mark.parametrize("model_id", STUDY_SMALL)
def test_study_small_models_fit_in_fp32_within_5_to_13_gb(model_id):
    config = model_config_for(model_id)
    assert count_config_parameters(config) < 2.6e9
    # The study's evaluator made full logits (as ftflow did before chunked scoring).
    choice = choose_precision(config, STUDY_BUDGET, batch_size=STUDY_BATCH, max_length=STUDY_LENGTH,
                              logits_chunk_tokens=0)
    assert choice["precision"] == "fp32"
    assert 5 * GB <= choice["peak_bytes"] <= 13 * GB


@pytest.mark.parametrize("model_id", STUDY_LARGE)
def test_study_7b_8b_models_need_bf16_and_fit_in_17_to_19_gb(model_id):
    config = model_config_for(model_id)
    fp32 = predict_scoring(config, "fp32", STUDY_BATCH, STUDY_LENGTH, logits_chunk_tokens=0)
    bf16 = predict_scoring(config, "bf16", STUDY_BATCH, STUDY_LENGTH, logits_chunk_tokens=0)
    assert fp32.peak_bytes > STUDY_BUDGET
    assert 17 * GB <= bf16.peak_bytes <= 19 * GB
    choice = choose_precision(config, STUDY_BUDGET, batch_size=STUDY_BATCH, max_length=STUDY_LENGTH,
                              logits_chunk_tokens=0)
    assert choice["precision"] == "bf16"
    assert "fp32 needs" in choice["reason"]


# ----------------------------------------------------------------------------- decisions


def test_choose_precision_tries_fp32_then_half_then_nf4():
    config = model_config_for("Qwen/Qwen2.5-1.5B")
    peaks = {p: predict_scoring(config, p, 1, 512).peak_bytes for p in ("fp32", "bf16", "fp16", "nf4")}
    assert peaks["fp32"] > peaks["bf16"] == peaks["fp16"] > peaks["nf4"]

    def choose(budget, **kwargs):
        return choose_precision(config, budget, batch_size=1, max_length=512, **kwargs)

    assert choose(peaks["fp32"])["precision"] == "fp32"
    assert choose(peaks["fp32"] - 1)["precision"] == "bf16"
    assert choose(peaks["fp32"] - 1, bf16_supported=False)["precision"] == "fp16"
    assert choose(peaks["bf16"] - 1)["precision"] == "nf4"
    assert choose(peaks["bf16"] - 1)["tried"] == {p: peaks[p] for p in ("fp32", "bf16", "nf4")}


def test_choose_precision_skips_with_the_predicted_peak_and_the_reason():
    config = model_config_for("Qwen/Qwen2.5-1.5B")
    nf4_peak = predict_scoring(config, "nf4", 1, 512).peak_bytes
    bf16_peak = predict_scoring(config, "bf16", 1, 512).peak_bytes
    no_nf4 = choose_precision(config, nf4_peak, batch_size=1, max_length=512, allow_nf4=False)
    assert no_nf4["precision"] is None
    assert no_nf4["peak_bytes"] == bf16_peak
    assert "skipped" in no_nf4["reason"] and "nf4 not allowed" in no_nf4["reason"]
    nothing = choose_precision(config, nf4_peak - 1, batch_size=1, max_length=512)
    assert nothing["precision"] is None
    assert nothing["peak_bytes"] == nf4_peak
    assert f"{nf4_peak / GB:.2f} GB" in nothing["reason"] and f"{(nf4_peak - 1) / GB:.2f} GB" in nothing["reason"]


def test_largest_batch_size_fits_and_the_next_does_not():
    config = model_config_for("meta-llama/Llama-3.2-1B")
    budget = 20 * GB
    batch = largest_batch_size(config, "fp32", budget, 512)
    assert 1 <= batch < 256
    assert predict_scoring(config, "fp32", batch, 512).peak_bytes <= budget
    assert predict_scoring(config, "fp32", batch + 1, 512).peak_bytes > budget


def test_largest_batch_size_is_monotone_capped_and_zero_when_nothing_fits():
    config = model_config_for("Qwen/Qwen2.5-0.5B")
    sizes = [largest_batch_size(config, "bf16", budget * GB, 1024) for budget in (1, 4, 8, 16, 32, 64)]
    assert sizes == sorted(sizes)
    assert sizes[0] == 0 and sizes[-1] > sizes[1]
    assert largest_batch_size(config, "bf16", 10**15, 1024, cap=7) == 7
    with pytest.raises(ValueError):
        largest_batch_size(config, "bf16", GB, 1024, cap=0)


def test_plan_model_table_and_plot(tmp_path):
    plans = [
        plan_decide.plan_model("qwen-7b", "Qwen/Qwen2.5-7B-Instruct", STUDY_BUDGET, max_length=2048),
        plan_decide.plan_model("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", STUDY_BUDGET, max_length=2048,
                          batch_size=2),
        plan_decide.plan_model("granite-8b", "ibm-granite/granite-3.3-8b-base", 4 * GB, max_length=2048,
                          allow_nf4=False),
    ]
    qwen, tiny, granite = plans
    assert (qwen.precision, tiny.precision, granite.precision) == ("bf16", "fp32", None)
    assert qwen.batch_size == largest_batch_size(model_config_for("Qwen/Qwen2.5-7B-Instruct"), "bf16",
                                                 STUDY_BUDGET, 2048) >= 1
    assert qwen.decision_batch_size == 1 and qwen.predictions["bf16"].batch_size == 1
    assert qwen.peak_bytes == predict_scoring(model_config_for("Qwen/Qwen2.5-7B-Instruct"), "bf16",
                                              qwen.batch_size, 2048).peak_bytes <= STUDY_BUDGET
    assert tiny.batch_size == tiny.decision_batch_size == 2
    assert granite.batch_size == 0 and not granite.fits
    frame = plan_tables.plan_table(plans)
    assert list(frame.columns) == list(plan_tables.PLAN_COLUMNS)
    assert len(frame) == 9
    chosen = frame[frame["chosen"]]
    assert dict(zip(chosen["model"], chosen["precision"])) == {"qwen-7b": "bf16", "tinyllama": "fp32"}
    assert dict(zip(chosen["model"], chosen["eval_batch_size"])) == {"qwen-7b": qwen.batch_size, "tinyllama": 2}
    assert (frame[frame["model"] == "granite-8b"]["reason"].str.contains("skipped")).all()
    assert frame.loc[(frame["model"] == "qwen-7b") & (frame["precision"] == "fp32"), "fits"].item() is False
    markdown = plan_tables.plan_markdown(frame)
    assert markdown.splitlines()[0].startswith("| model | parameters | precision")
    assert len(markdown.splitlines()) == 2 + len(frame)
    path = tmp_path / "plan.png"
    plan_plots.plot_plan(frame, STUDY_BUDGET, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_candidate_is_what_the_pipeline_obeys():
    from ftflow.plan.decide import plan_candidate

    budget = 20 * plan_predict.GB
    fixed = plan_candidate("g8", "ibm-granite/granite-3.3-8b-base", budget, precision="fp32", batch_size="auto",
                           max_length=128, device="cuda")
    assert fixed["precision"] is None and fixed["reason"].startswith("skipped: fp32 (fixed in config) needs 33.")
    auto = plan_candidate("g8", "ibm-granite/granite-3.3-8b-base", budget, precision="auto", batch_size="auto",
                          max_length=128, device="cuda")
    assert auto["precision"] == "bf16" and auto["batch_size"] >= 1 and auto["peak_bytes"] <= budget
    lowered = plan_candidate("g2", "ibm-granite/granite-3.3-2b-base", budget, precision="fp32", batch_size=64,
                             max_length=2048, device="cuda")
    assert lowered["precision"] == "fp32" and 1 <= lowered["batch_size"] < 64 and lowered["peak_bytes"] <= budget
    assert "lowered from 64" in lowered["reason"]
    unknown = plan_candidate("x", "no-such-org/no-such-model", budget, precision="auto", batch_size=8,
                             max_length=128, device="cuda")
    assert unknown["precision"] is None and unknown["reason"].startswith("cannot plan")


def test_training_that_would_not_fit_is_refused_before_loading():
    from ftflow.plan.decide import MemoryBudgetError, check_training_fits

    budget = 20 * plan_predict.GB
    lora = check_training_fits("ibm-granite/granite-3.3-8b-base", "bf16", "lora", batch_size=1, max_length=128,
                               budget_bytes=budget)
    assert lora.case == "train-lora" and lora.peak_bytes <= budget
    assert check_training_fits("ibm-granite/granite-3.3-8b-base", "nf4", "lora", batch_size=1, max_length=128,
                               budget_bytes=budget).case == "train-qlora"
    with pytest.raises(MemoryBudgetError, match="full training of ibm-granite/granite-3.3-8b-base .* over the 20.00 GB"):
        check_training_fits("ibm-granite/granite-3.3-8b-base", "bf16", "full", batch_size=1, max_length=128,
                            budget_bytes=budget)


# ----------------------------------------------------------------------------- the teacher pass


def test_teacher_pass_prediction_by_hand():
    """The pass's phases on a small config (hidden 64, intermediate 160, kv_dim 32, vocab 300), k = 5."""
    config = small_config(tie_word_embeddings=False)
    counts, n = parameter_counts(config), count_config_parameters(config)
    batch, length, chunk, k = 3, 20, 16, 5
    tokens = batch * length
    options = dict(k=k, logits_chunk_tokens=chunk, device="cpu")
    topk = plan_predict.predict_teacher_pass(config, "fp32", batch, length, **options)
    hidden = tokens * 64 * 4
    # One chunk beside the gathered hidden states: in fp32 the head's output is the float32 logits, then their
    # log-softmax (or the tail's exp beside it): 8 bytes per element; its results until moved (16 k + 4 each).
    assert topk.logits_bytes == hidden + 16 * 300 * 8 + 16 * (16 * k + 4) == 55104
    # The forward: the embedding output, the layer's input, residual and normed input, the MLP's three
    # products, the padding mask.
    assert topk.activations_bytes == tokens * (4 * 64 + 3 * 160) * 4 + batch * length * length == 177840
    assert topk.weights_bytes == 4 * n and topk.case == "teacher-topk"
    assert topk.peak_bytes == 4 * n + 177840 + RUNTIME_OVERHEAD_BYTES["cpu"]
    # Sampled: the log-softmax and the draws' float64 cumulative sums (all 16 rows: under the draw's cap),
    # and the draws' float64 uniforms until they are moved.
    sampled = plan_predict.predict_teacher_pass(config, "fp32", batch, length, variant="sampled", **options)
    assert sampled.logits_bytes == hidden + 16 * 300 * (4 + 8) + 16 * (16 * k + 4) + 16 * k * 8 == 74944
    # bf16: the head's bf16 output and its fp32 copy (6 bytes) never exceed the log-softmax's moment (8).
    bf16 = plan_predict.predict_teacher_pass(config, "bf16", batch, length, **options)
    assert bf16.logits_bytes == tokens * 64 * 2 + 16 * 300 * 8 + 16 * (16 * k + 4)
    # Over a shared range of 200 ids in fp32 the head's 300 columns stay alive under the log-softmax's view.
    shared = plan_predict.predict_teacher_pass(config, "fp32", batch, length, vocab_size=200, **options)
    assert shared.logits_bytes == hidden + 16 * 300 * 4 + 16 * 200 * 4 + 16 * (16 * k + 4)
    # A chunk of 1024 is charged for the 60 positions there are; full logits: [B, L, V] and one sentence's.
    whole = plan_predict.predict_teacher_pass(config, "fp32", batch, length, k=k, device="cpu")
    assert whole.logits_bytes == hidden + 60 * 300 * 8 + 60 * (16 * k + 4)
    full = plan_predict.predict_teacher_pass(config, "bf16", batch, length, k=k, logits_chunk_tokens=0)
    assert full.logits_bytes == tokens * 300 * 2 + length * 300 * 8
    # Granite divides its logits by logits_scaling in its forward: a second [B, L, V] copy.
    granite = plan_predict.predict_teacher_pass(small_config("granite"), "bf16", 8, length, k=k, logits_chunk_tokens=0)
    assert granite.logits_bytes == 2 * 8 * tokens // batch * 300 * 2


def test_the_plan_draws_in_chunks_as_the_teacher_pass_does():

    assert plan_predict.TEACHER_DRAW_CHUNK_ELEMENTS == distill_teacher.DRAW_CHUNK_ELEMENTS


def test_teacher_pass_counts_the_teacher_as_its_run_loads_it():
    config = small_config(tie_word_embeddings=False)
    counts = parameter_counts(config)
    batch, length = 3, 20
    tokens = batch * length
    base = plan_predict.predict_teacher_pass(config, "bf16", batch, length, k=5)
    # An unmerged LoRA adapter (fp32): its weights, and per token its fp32 input copy and fp32 sums (a CPU's
    # mixed-dtype add also copies the bf16 base output to fp32).
    lora = plan_predict.predict_teacher_pass(config, "bf16", batch, length, k=5, method="lora", lora_r=8)
    assert lora.weights_bytes == base.weights_bytes + counts.lora(8) * 4
    assert lora.activations_bytes == base.activations_bytes + tokens * (4 * 64 + (8 - 2) * 160)
    on_cpu = plan_predict.predict_teacher_pass(config, "bf16", batch, length, k=5, method="lora", lora_r=8, device="cpu")
    assert on_cpu.activations_bytes == lora.activations_bytes + tokens * 4 * 160
    merged = plan_predict.predict_teacher_pass(config, "bf16", batch, length, k=5, method="lora", lora_merged=True)
    assert merged == base
    assert plan_predict.predict_teacher_pass(config, "bf16", batch, length, k=5, method="distill") == base
    # QLoRA: nf4 weights, one weight dequantized at a time, the adapter in fp32.
    qlora = plan_predict.predict_teacher_pass(config, "nf4", batch, length, k=5, method="qlora", lora_r=8)
    assert qlora.weights_bytes == plan_predict._weights_bytes(counts, "nf4") + counts.lora(8) * 4
    # Prefix: its table (fp32), and the key/value cache PEFT hands the forward, which every layer extends.
    prefix = plan_predict.predict_teacher_pass(config, "bf16", batch, length, k=5, method="prefix", num_virtual_tokens=4)
    assert prefix.weights_bytes == base.weights_bytes + 4 * 2 * 2 * 32 * 4
    cache = 2 * 2 * batch * (length + 4) * 32 * 2 + batch * 4 * 2 * 2 * 32 * 4
    assert prefix.activations_bytes == base.activations_bytes + batch * length * 4 + cache
    with pytest.raises(ValueError) as error:
        plan_predict.predict_teacher_pass(config, "bf16", 1, 8, k=0, method="qlora", variant="dense")
    for fragment in ("k must be >= 1", "variant must be topk or sampled", "QLoRA teachers are nf4"):
        assert fragment in str(error.value)


def _teacher_run(method: str = "lora", precision: str = "bf16", **job) -> dict:
    model = {"name": "granite-3.3-8b-base", "path": "ibm-granite/granite-3.3-8b-base", "family": "granite",
             "precision": precision, "trust_remote_code": False}
    return {"name": f"granite-3.3-8b-base+{method}", "method": method, "precision": precision,
            "base_model": model, "job": {"method": method, **job}}


def test_teacher_pass_batch_is_the_largest_that_fits_or_the_configured_one_lowered():
    from tests.tiny import SENTENCES, tiny_tokenizer

    config = model_config_for("ibm-granite/granite-3.3-8b-base")
    run = _teacher_run(r=16)
    common = dict(tokenizer=tiny_tokenizer(), sentences=SENTENCES, max_length=2048, k=100, variant="topk",
                  budget_bytes=20 * GB, device="cuda")
    plan = plan_decide.plan_teacher_pass(run, batch_size_cap=4096, **common)
    assert plan.max_length == 12  # the longest sentence: <s> and 11 words
    options = dict(k=100, method="lora", lora_r=16)
    assert plan.prediction == plan_predict.predict_teacher_pass(config, "bf16", plan.batch_size, 12, **options)
    assert plan.prediction.peak_bytes <= 20 * GB
    assert plan_predict.predict_teacher_pass(config, "bf16", plan.batch_size + 1, 12, **options).peak_bytes > 20 * GB
    assert plan.reason.startswith(f"batch size {plan.batch_size}, the largest that fits (cap 4096): predicted")
    assert plan_decide.plan_teacher_pass(run, **common).batch_size == 256  # the default cap
    fixed = plan_decide.plan_teacher_pass(run, batch_size=8, **common)
    assert fixed.batch_size == 8 and "fixed in config (distill.teacher_batch_size)" in fixed.reason
    lowered = plan_decide.plan_teacher_pass(run, batch_size=100_000, **common)
    assert lowered.batch_size == plan.batch_size and "lowered from 100000" in lowered.reason
    # A QLoRA teacher (LoRA on a model benchmarked in 4 bits too) is planned with its nf4 weights.
    qlora = plan_decide.plan_teacher_pass(_teacher_run("lora", "nf4", r=16), batch_size=1, **common)
    assert qlora.prediction.case == "teacher-topk" and qlora.prediction.weights_bytes < 6 * GB
    with pytest.raises(plan_decide.MemoryBudgetError, match=r"teacher pass of granite-3.3-8b-base\+lora .* over the "
                                                       r"16.00 GB budget. Lower benchmark.logits_chunk_tokens"):
        plan_decide.plan_teacher_pass(run, **{**common, "budget_bytes": 16 * GB})


def test_the_seed_studys_8b_teacher_pass_fits_20_gb():
    """granite-3.3-8b's LoRA teacher (bf16, r 16) over sst2's longest training sentence (about 72 tokens), top-100."""
    config = model_config_for("ibm-granite/granite-3.3-8b-base")
    options = dict(k=100, method="lora", lora_r=16)
    batch = plan_decide.largest_teacher_batch_size(config, "bf16", 20 * GB, 72, 256, **options)
    at = plan_predict.predict_teacher_pass(config, "bf16", batch, 72, **options)
    # Its weights and adapter (16.5 GB) leave 2.9 GB: the forward's layer outweighs the logits' chunk.
    assert batch == 200 and at.peak_bytes <= 20 * GB
    assert plan_predict.predict_teacher_pass(config, "bf16", batch + 1, 72, **options).peak_bytes > 20 * GB
    assert at.activations_bytes > 5 * at.logits_bytes
    # Full logits at the same batch would hold [B, L, V] in bf16 twice (logits_scaling): 5 times the chunk's phase.
    full = plan_predict.predict_teacher_pass(config, "bf16", batch, 72, logits_chunk_tokens=0, **options)
    assert full.logits_bytes == 2 * batch * 72 * 49159 * 2 > 5 * at.logits_bytes


# A 4-bit model whose unquantized tensors (a large vocabulary at a small width, one layer) dominate, as at the
# rehearsal's real widths cut to one layer: untied (TinyLlama, Qwen2.5-7B) and tied (Qwen2.5-0.5B, Granite).
QLORA_PROBE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=32000, max_position_embeddings=64, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2)


def _qlora_probe(meter, directory: str, batch: int, length: int) -> dict:
    """QLoRA as ftflow.train.trainer.train_peft runs it (4-bit load on the CPU, prepare_model_for_kbit_training, LoRA on
    every linear layer, AdamW with its state), then one step under the bf16 autocast the Trainer uses; the peak
    from before the load (the checkpoint is read inside from_pretrained or, mapped, later: both count here), for
    an untied and a tied output layer."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ftflow.models.loading import load_model

    def run(path: Path) -> None:
        model = load_model(str(path), "nf4", "cpu", trainable=True)
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, PeftLoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                                     target_modules="all-linear"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        for param in params:  # the state exists before the measured step, as from the second step on
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        del loss
        optimizer.step()

    def save(path: Path, **numbers) -> Path:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(**{**QLORA_PROBE, **numbers}),
                                         dtype=torch.bfloat16).save_pretrained(path)
        return path

    run(save(Path(directory) / "micro", hidden_size=64, vocab_size=256))  # one-time costs before any baseline
    peaks = {}
    for tied in (False, True):
        path = save(Path(directory) / f"tied-{tied}", tie_word_embeddings=tied)
        meter.start()
        run(path)
        peaks[str(tied)] = meter.peak()
    return peaks


def test_qlora_peak_at_a_large_vocabulary_is_what_the_plan_says(tmp_path):
    # The unquantized embedding and output layer are most of the peak: the 4-bit load must not keep the
    # checkpoint's pages of them mapped while prepare_model_for_kbit_training upcasts them (CPU), and the plan
    # must count the bf16 copy of the fp32 output layer that autocast saves for backward (any device).
    # Tolerance: 10%, as bench/rehearsal.py asks of every stage, and 3 MB of page rounding and Python objects.
    from tests.memory_probe import measure

    batch, length = 2, 8
    peaks = measure("tests.unit.plan.test_memory:_qlora_probe", directory=str(tmp_path), batch=batch, length=length)
    for tied in (False, True):
        plan = predict_training(LlamaConfig(**QLORA_PROBE, tie_word_embeddings=tied), "nf4", "qlora", batch, length,
                                lora_r=8, device="cpu").allocated_bytes
        assert abs(peaks[str(tied)] - plan) <= 0.1 * plan + 3e6, (tied, peaks[str(tied)], plan)
