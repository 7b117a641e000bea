import pytest
import torch

from ftflow.models.loading import ModelLoadError, count_parameters, load_model, load_tokenizer, resolve_device
from ftflow.perplexity import score_sentences
from tests.tiny import SENTENCES, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved like a hub checkpoint (weights, config, tokenizer in one folder)."""
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model("llama", hidden_size=64).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_precisions_load_through_one_path(checkpoint):
    fp32 = load_model(checkpoint, "fp32", "cpu")
    bf16 = load_model(checkpoint, "bf16", "cpu")
    assert next(fp32.parameters()).dtype == torch.float32 and not fp32.training
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert count_parameters(fp32) == count_parameters(bf16) == sum(p.numel() for p in fp32.parameters())


def test_nf4_loads_scores_and_counts_unpacked_parameters(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    fp32 = load_model(checkpoint, "fp32", "cpu")
    nf4 = load_model(checkpoint, "nf4", "cpu")
    assert any("4bit" in type(m).__name__ for m in nf4.modules())
    assert count_parameters(nf4) == count_parameters(fp32)
    exact = score_sentences(fp32, tokenizer, SENTENCES, progress=False).corpus_ppl
    quantized = score_sentences(nf4, tokenizer, SENTENCES, progress=False).corpus_ppl
    assert quantized == pytest.approx(exact, rel=0.05)  # 4-bit weights: close, not equal


def test_missing_model_error_names_it(tmp_path):
    with pytest.raises(ModelLoadError, match="(?s)no-such-org/no-such-model.*must reach the hub"):
        load_model("no-such-org/no-such-model", "fp32", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=f"directory {tmp_path / 'empty'}"):
        load_tokenizer(str(tmp_path / "empty"))


def test_cuda_request_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_weights_load_straight_onto_the_gpu_and_stay_where_they_load_on_the_cpu(checkpoint, monkeypatch):
    """On CUDA the weights go to the GPU as they are read (no host copy of the model); the CPU path is unchanged."""
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        calls.append(kwargs)
        if "device_map" in kwargs:
            # No GPU here: what matters is where transformers was told to put the weights, and that nothing
            # moves the model afterwards (a move to "cuda" would fail on this machine).
            kwargs = {k: v for k, v in kwargs.items() if k != "device_map"}
        return original(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    cpu = load_model(checkpoint, "bf16", "cpu")
    assert "device_map" not in calls[-1] and next(cpu.parameters()).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    load_model(checkpoint, "bf16", "cuda")
    assert calls[-1]["device_map"] == {"": 0} and calls[-1]["dtype"] == torch.bfloat16


def _linear4bit_layers(model):
    from bitsandbytes.nn import Linear4bit

    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def test_nf4_scores_alike_whatever_the_cpu_reports(checkpoint, monkeypatch):
    """A CPU with AVX512-BF16 would switch bitsandbytes to its packed layout: ftflow keeps the reference one."""
    import bitsandbytes.nn.modules as bnb_modules

    tokenizer = load_tokenizer(checkpoint)
    plain = load_model(checkpoint, "nf4", "cpu")
    expected = score_sentences(plain, tokenizer, SENTENCES, progress=False).total_nll
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # what such a CPU reports
    model = load_model(checkpoint, "nf4", "cpu")
    layers = _linear4bit_layers(model)
    # 2 layers x (q, k, v, o, gate, up, down); the lm_head stays unquantized.
    assert len(layers) == 14
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    assert score_sentences(model, tokenizer, SENTENCES, progress=False).total_nll == expected
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)


def test_a_packed_4bit_model_is_unpacked_to_the_same_weights(checkpoint):
    """Both CPU layouts: the packed one (as bitsandbytes' AVX512-BF16 path leaves a layer) converts back exactly."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu

    from ftflow.models.loading import use_reference_4bit_layout

    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint, "nf4", "cpu")
    expected = score_sentences(model, tokenizer, SENTENCES, progress=False).total_nll
    layers = _linear4bit_layers(model)
    before = [layer.weight.data.clone() for layer in layers]
    for layer in layers:  # what Linear4bit.forward does on such a CPU, in eval mode without grad
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    assert any(layer.weight.data.shape != old.shape for layer, old in zip(layers, before))
    assert use_reference_4bit_layout(model) == 14
    assert all(torch.equal(layer.weight.data, old) for layer, old in zip(layers, before))
    assert not any(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    # Packing rounds the block scales (absmax) to bf16 and the way back quantizes them again, so the
    # weights are equal but the scales only close: why ftflow stops the packing rather than undoing it.
    assert score_sentences(model, tokenizer, SENTENCES, progress=False).total_nll == pytest.approx(expected, rel=1e-5)


def test_a_packed_4bit_model_saves_the_reference_layout(checkpoint, tmp_path):
    """Saving a 4-bit model whose layers were packed writes the reference layout, which reloads to the same NLL."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu

    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint, "nf4", "cpu")
    expected = score_sentences(model, tokenizer, SENTENCES, progress=False).total_nll
    for layer in _linear4bit_layers(model):
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = load_model(str(tmp_path / "saved"), "nf4", "cpu")
    assert score_sentences(reloaded, tokenizer, SENTENCES, progress=False).total_nll == pytest.approx(expected, rel=1e-5)
