"""QLoRA reports the same perplexity on every CPU: with and without AVX512-BF16's packed 4-bit layout."""

from __future__ import annotations

import pytest

from ftflow.config import LoraConfig, QLoraConfig
from ftflow.models.loading import load_tokenizer, load_trained
from ftflow.perplexity import score_sentences
from ftflow.train.runner import lora_grid, qlora_like, run_job
from tests.tiny import SENTENCES, saved_base

TRAIN, VALIDATION, TEST = SENTENCES * 2, SENTENCES[:5], SENTENCES[5:]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A tiny Llama with real models' widths (64, key/value 32), as the pipeline's benchmarked model dict."""
    return saved_base(tmp_path_factory.mktemp("base"), hidden_size=64)


@pytest.mark.slow
def test_qlora_perplexity_does_not_depend_on_the_cpus_4bit_path(base, tmp_path, monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # train where the packed path would be taken
    best = lora_grid(LoraConfig(r=4, learning_rate=1e-2, epochs=1, batch_size=4), base)[0]
    job = qlora_like(best, base, QLoraConfig(double_quant=True, compute_dtype="fp32"))
    out = tmp_path / "out"
    out.mkdir()
    run = run_job(job, train_sentences=TRAIN, validation_sentences=VALIDATION, test_sentences=TEST,
                  work_dir=tmp_path / "work", out_dir=out, card_facts={}, seed=0, max_length=32, device="cpu",
                  eval_batch_size=4, progress=False, checkpoint_steps=4)
    run = dict(run, dir=str(out), files={"model": "model"})
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)  # score again where it is not
    model = load_trained(run, "cpu")
    again = score_sentences(model, load_tokenizer(base["path"]), TEST, batch_size=3, max_length=32, progress=False)
    assert again.corpus_ppl == pytest.approx(run["test"]["corpus_ppl"], rel=1e-9)
