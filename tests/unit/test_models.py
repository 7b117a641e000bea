import pytest
import torch

from ftflow.models import ModelLoadError, count_parameters, load_model, load_tokenizer, resolve_device
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
