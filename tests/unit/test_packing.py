"""Packed training batches: exact per-token losses, no attention across sentences, distillation rows aligned."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from ftflow.config import ConfigError, parse_config
from ftflow.distill import DistillationCollator, compute_teacher_topk, kd_loss
from ftflow.tokens import IGNORE_INDEX, pad_batch, pad_token_id, sentence_ids
from ftflow.training import (PackCollator, PadCollator, TrainSettings, batching_for, collator_for, encode_dataset,
                             fit, train_full, train_prefix)
from tests.tiny import SENTENCES, tiny_model, tiny_tokenizer

ARCHITECTURES = ("llama", "granite", "qwen2")


def _ids(tokenizer, sentences=SENTENCES[:4], max_length=32) -> list[list[int]]:
    return [sentence_ids(tokenizer, s, max_length)[0] for s in sentences]


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-target NLL in order ([N]): position t predicts labels[t + 1]."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    return -logprobs[scored].gather(-1, targets[scored][:, None])[:, 0]


def test_batching_per_method_and_setting():
    assert [batching_for("auto", m) for m in ("lora", "qlora", "full", "distill", "prefix")] == [
        "packed", "packed", "packed", "packed", "length-grouped"]
    assert batching_for("auto", "lora", trust_remote_code=True) == "padded"  # remote code may ignore the positions
    assert batching_for("on", "lora", trust_remote_code=True) == "packed"
    assert [batching_for("off", m) for m in ("lora", "prefix", "distill")] == ["padded"] * 3
    with pytest.raises(ValueError, match="prefix tuning cannot be packed"):
        batching_for("on", "prefix")
    with pytest.raises(ValueError, match="packing must be auto, on or off, got 'yes'"):
        batching_for("yes", "lora")
    with pytest.raises(ValueError, match="unknown method 'adapter'"):
        batching_for("auto", "adapter")


def test_config_packing_defaults_to_auto_and_refuses_on_with_prefix_tuning(tmp_path):
    raw = {"data": {"synthetic": {}}, "models": [{"name": "m", "path": "org/m", "family": "f"}]}
    assert parse_config(raw, tmp_path).training.packing == "auto"
    assert parse_config({**raw, "training": {"packing": "off"}}, tmp_path).training.packing == "off"
    assert parse_config({**raw, "training": {"packing": "on"}, "prefix": {"enabled": False}},
                        tmp_path).training.packing == "on"
    with pytest.raises(ConfigError, match="training.packing: on cannot apply to prefix tuning"):
        parse_config({**raw, "training": {"packing": "on"}}, tmp_path)


def test_pack_collator_concatenates_sentences_with_restarting_positions_and_the_padded_targets():
    tokenizer = tiny_tokenizer()
    ids = _ids(tokenizer, SENTENCES[:2])  # "the cat sat on the mat", "a dog ran fast"
    batch = PackCollator()([{"input_ids": row, "sentence_index": i} for i, row in enumerate(ids)])
    # No attention mask and no cache: transformers then finds the sentences from the position ids.
    assert sorted(batch) == ["input_ids", "labels", "position_ids", "use_cache"] and batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[2, 4, 6, 9, 10, 4, 11, 2, 5, 7, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]]
    # The start token of each sentence is no target: the boundary never predicts sentence B from sentence A.
    assert batch["labels"].tolist() == [[-100, 4, 6, 9, 10, 4, 11, -100, 5, 7, 12, 13]]
    padded = pad_batch(ids, pad_token_id(tokenizer))
    assert batch["labels"][batch["labels"] != IGNORE_INDEX].tolist() == \
        padded["labels"][padded["labels"] != IGNORE_INDEX].tolist()
    # The same batch as transformers' own flattening collator.
    reference = DataCollatorWithFlattening()([{"input_ids": row} for row in ids])
    assert all(torch.equal(batch[k], reference[k]) for k in reference)
    assert isinstance(collator_for("padded", tokenizer), PadCollator)
    assert collator_for("length-grouped", tokenizer).batching == "length-grouped"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("with_bos", [True, False], ids=["bos", "eos-start"])
def test_packed_batch_gives_each_token_its_loss_alone(architecture, with_bos):
    tokenizer = tiny_tokenizer(with_bos=with_bos)
    model = tiny_model(architecture, hidden_size=64)
    ids = _ids(tokenizer)
    packed = PackCollator()([{"input_ids": row} for row in ids])
    with torch.no_grad():
        together = _token_losses(model(**packed).logits, packed["labels"])
        alone = torch.cat([_token_losses(model(input_ids=torch.tensor([row])).logits, torch.tensor([row]))
                           for row in ids])
        padded = pad_batch(ids, pad_token_id(tokenizer))
        padded_loss = model(**padded).loss
        packed_loss = model(**packed).loss
    assert together.shape == (sum(len(row) - 1 for row in ids),) == (24,)
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    # The loss stays the mean over the batch's target tokens, the padded batch's loss.
    assert packed_loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)
    assert packed_loss.item() == pytest.approx(alone.mean().item(), abs=1e-5)


def test_packed_loss_value_on_tiny_llama():
    tokenizer = tiny_tokenizer()
    ids = _ids(tokenizer)
    with torch.no_grad():
        loss = tiny_model("llama", hidden_size=64)(**PackCollator()([{"input_ids": row} for row in ids])).loss
    assert loss.item() == pytest.approx(3.505284, abs=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_no_attention_crosses_sentences_in_a_packed_row(architecture):
    tokenizer = tiny_tokenizer()
    model = tiny_model(architecture, hidden_size=64)
    first, second = _ids(tokenizer, SENTENCES[:2])
    changed_first = [first[0]] + [tokenizer.convert_tokens_to_ids("dull")] * (len(first) - 1)
    collate = PackCollator()

    def second_logits(a: list[int], attend_across: bool = False) -> torch.Tensor:
        batch = collate([{"input_ids": a}, {"input_ids": second}])
        extra = {"attention_mask": torch.ones_like(batch["input_ids"])} if attend_across else {}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           **extra).logits
        return logits[0, len(a):]

    assert torch.allclose(second_logits(first), second_logits(changed_first), atol=1e-6, rtol=0)
    # The check can fail: with a full attention mask the second sentence does see the first.
    assert (second_logits(first, True) - second_logits(changed_first, True)).abs().max() > 1e-3


@pytest.mark.parametrize("with_tail", [True, False], ids=["stored-tail", "derived-tail"])
def test_packed_distillation_loss_equals_the_padded_one(with_tail):
    tokenizer = tiny_tokenizer()
    sentences = SENTENCES[:5]
    topk = compute_teacher_topk(tiny_model("llama", seed=0, hidden_size=64), tokenizer, sentences, k=4,
                                max_length=16, progress=False)
    if not with_tail:
        topk.tail_logmass = None
    items = [{"input_ids": sentence_ids(tokenizer, s, 16)[0], "sentence_index": i} for i, s in enumerate(sentences)]
    items = [items[3], items[0], items[4], items[1]]  # not in store order
    student = tiny_model("llama", seed=1, hidden_size=64)
    losses = {}
    for packed in (False, True):
        batch = DistillationCollator(pad_token_id(tokenizer), topk, k=3, packed=packed)(items)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "use_cache") if k in batch}
        with torch.no_grad():
            logits = student(**inputs).logits
        losses[packed] = kd_loss(logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], alpha=0.5,
                                 temperature=2.0, teacher_tail_logmass=batch.get("teacher_tail_logmass"))
    packed_batch = DistillationCollator(pad_token_id(tokenizer), topk, k=3, packed=True)(items)
    n_tokens = sum(len(item["input_ids"]) for item in items)
    assert packed_batch["topk_ids"].shape == (1, n_tokens, 3)
    # The row of the packed batch at sentence 0's first token is that sentence's first stored row.
    offset = len(items[0]["input_ids"])
    assert torch.equal(packed_batch["topk_ids"][0, offset], topk.for_sentence(0, 3)[0][0].long())
    assert ("teacher_tail_logmass" in packed_batch) == with_tail
    for key in ("loss", "ce", "kl"):
        assert losses[True][key].item() == pytest.approx(losses[False][key].item(), abs=1e-5)


def _settings(epochs: int = 2, **extra) -> TrainSettings:
    return TrainSettings(epochs=epochs, learning_rate=1e-3, batch_size=4, max_length=32, seed=0, device="cpu",
                         eval_batch_size=4, progress=False, checkpoint_steps=100, **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama", hidden_size=64).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_packed_full_finetuning_trains_like_the_padded_one_and_says_so(base, tmp_path):
    tokenizer = tiny_tokenizer()
    train = SENTENCES * 2  # 16 sentences, batch 4: 4 steps per epoch
    results = {}
    for packing in ("auto", "off"):
        results[packing] = train_full(str(base), tokenizer, encode_dataset(tokenizer, train, 32), SENTENCES[:4],
                                      settings=_settings(packing=packing), work_dir=tmp_path / packing / "work",
                                      model_dir=tmp_path / packing / "model")
    assert results["auto"]["batching"] == "packed" and results["off"]["batching"] == "padded"
    packed = [e["validation"]["corpus_ppl"] for e in results["auto"]["history"]]
    padded = [e["validation"]["corpus_ppl"] for e in results["off"]["history"]]
    # The same sentences per step and the same per-token mean: the same training, to float rounding.
    assert packed == pytest.approx(padded, rel=1e-4)
    assert padded == pytest.approx([23.910574, 21.672910], abs=1e-5)


def test_prefix_tuning_trains_on_length_grouped_batches(base, tmp_path):
    tokenizer = tiny_tokenizer()
    result = train_prefix(str(base), tokenizer, SENTENCES * 2, SENTENCES[:4], num_virtual_tokens=2,
                          settings=_settings(epochs=1), work_dir=tmp_path / "work", adapter_dir=tmp_path / "adapter")
    assert result["batching"] == "length-grouped"
    assert result["history"][-1]["step"] == 4


def test_fit_refuses_a_collator_of_another_batching(base, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(ValueError, match="the collator forms padded batches but the run's batching is packed"):
        fit(model, tokenizer, encode_dataset(tokenizer, SENTENCES, 32), SENTENCES[:2], _settings(), tmp_path,
            lambda m: None, collator=PadCollator(pad_token_id(tokenizer)), batching="packed")
