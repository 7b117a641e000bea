"""Packed training batches: exact per-token losses, no attention across sentences, distillation rows aligned."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from ftflow.config import ConfigError, parse_config
from ftflow.distill.trainer import DistillationCollator
from ftflow.distill.teacher import compute_teacher_topk
from ftflow.distill.losses import kd_loss
from ftflow.tokens import (IGNORE_INDEX, pack_batch, pack_placements, packed_row_tokens, pad_batch, pad_token_id,
                           sentence_ids)
from ftflow.train.trainer import (PackCollator, PadCollator, TrainSettings, batching_for, collator_for, encode_dataset,
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


def test_pack_placements_fill_rows_first_fit_decreasing():
    lengths = [7, 5, 6, 10, 5, 5, 6, 12]  # the eight SENTENCES
    assert [len(ids) for ids in _ids(tiny_tokenizer(), SENTENCES)] == lengths
    # Rows of at most 12 tokens (the longest sentence): 5 rows of 12 instead of 8 padded ones.
    assert pack_placements(lengths, 12) == [(2, 0), (2, 7), (3, 0), (1, 0), (4, 0), (4, 5), (3, 6), (0, 0)]
    assert pack_placements(lengths, None) == [(0, 0), (0, 7), (0, 12), (0, 18), (0, 28), (0, 33), (0, 38), (0, 44)]
    assert pack_placements([3, 9], 4) == [(1, 0), (0, 0)]  # a row holds at least the longest sentence


def _layout(lengths, row_tokens) -> tuple[int, int]:
    """(rows, widest row) of a packed batch."""
    used = {}
    for (row, start), length in zip(pack_placements(lengths, row_tokens), lengths):
        used[row] = max(used.get(row, 0), start + length)
    return len(used), max(used.values())


def test_packed_row_tokens_fewest_computed_tokens_within_the_padded_attention():
    # Rows of the longest (10): [10] [6] [6] [5 5], 4 x 10 = 40 tokens. Rows of 11: [10] [6 5] [6 5], 3 x 11 = 33.
    # Rows of 16 would hold it in 2 x 16 = 32, but their attention (2 x 16^2 = 512) exceeds the padded 5 x 10^2.
    assert packed_row_tokens([10, 6, 6, 5, 5]) == 11
    assert _layout([10, 6, 6, 5, 5], 10) == (4, 10) and _layout([10, 6, 6, 5, 5], 11) == (3, 11)
    assert pack_placements([10, 6, 6, 5, 5], 11) == [(0, 0), (1, 0), (2, 0), (1, 6), (2, 6)]
    assert packed_row_tokens([3, 9]) == 12  # one row of 12 (attention 144 <= 2 x 81) instead of 2 x 9
    assert packed_row_tokens([4, 4, 4, 4]) == 4  # 2 x 8 is no fewer tokens and dearer attention
    assert packed_row_tokens([7, 5, 6, 10, 5, 5, 6, 12]) == 12  # nothing beats rows of the longest: kept
    assert packed_row_tokens([7]) == 7
    # Never more tokens or attention than the padded batch, never more tokens than rows of the longest.
    generator = torch.Generator().manual_seed(0)
    fewer = 0
    for _ in range(200):
        batch = int(torch.randint(2, 33, (1,), generator=generator))
        lengths = torch.randint(2, 129, (batch,), generator=generator).tolist()
        longest = max(lengths)
        rows, width = _layout(lengths, packed_row_tokens(lengths))
        longest_rows, longest_width = _layout(lengths, longest)
        assert rows * width <= longest_rows * longest_width <= batch * longest
        assert rows * width * width <= batch * longest * longest
        fewer += rows * width < longest_rows * longest_width
    assert fewer > 100  # the wider budget usually saves tokens


def test_pack_batch_restarts_positions_and_keeps_the_padded_targets():
    tokenizer = tiny_tokenizer()
    ids = _ids(tokenizer, SENTENCES[:2])  # "the cat sat on the mat", "a dog ran fast"
    one_row = PackCollator(0, one_row=True)([{"input_ids": row, "sentence_index": i} for i, row in enumerate(ids)])
    # No attention mask and no cache: transformers then finds the sentences from the position ids.
    assert sorted(one_row) == ["input_ids", "labels", "position_ids", "use_cache"] and one_row["use_cache"] is False
    assert one_row["input_ids"].tolist() == [[2, 4, 6, 9, 10, 4, 11, 2, 5, 7, 12, 13]]
    assert one_row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]]
    # The start token of each sentence is no target: the boundary never predicts sentence B from sentence A.
    assert one_row["labels"].tolist() == [[-100, 4, 6, 9, 10, 4, 11, -100, 5, 7, 12, 13]]
    # One row is transformers' own flattening collator's batch.
    reference = DataCollatorWithFlattening()([{"input_ids": row} for row in ids])
    assert all(torch.equal(one_row[k], reference[k]) for k in reference)
    # Rows: a shorter row ends with a pad segment whose positions restart, so nothing attends to it.
    rows = pack_batch(ids + [ids[1]], 0, 12)
    assert rows["input_ids"].tolist() == [[2, 4, 6, 9, 10, 4, 11, 2, 5, 7, 12, 13], [2, 5, 7, 12, 13, 0, 0, 0, 0, 0, 0, 0]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]
    assert rows["labels"].tolist() == [[-100, 4, 6, 9, 10, 4, 11, -100, 5, 7, 12, 13], [-100, 5, 7, 12, 13] + [-100] * 7]
    padded = pad_batch(ids + [ids[1]], pad_token_id(tokenizer))
    assert sorted(rows["labels"][rows["labels"] != IGNORE_INDEX].tolist()) == \
        sorted(padded["labels"][padded["labels"] != IGNORE_INDEX].tolist())
    assert isinstance(collator_for("padded", tokenizer), PadCollator)
    assert collator_for("length-grouped", tokenizer).batching == "length-grouped"
    assert collator_for("packed", tokenizer, one_row=True).one_row


def _sentence_losses(logits: torch.Tensor, ids: list[list[int]], placements) -> torch.Tensor:
    """Per-target NLL of every sentence, in batch order ([N]), from a packed batch's logits."""
    losses = []
    for row_ids, (row, start) in zip(ids, placements):
        window = logits[row:row + 1, start:start + len(row_ids)]
        losses.append(_token_losses(window, torch.tensor([row_ids])))
    return torch.cat(losses)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("with_bos", [True, False], ids=["bos", "eos-start"])
@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one-row"])
def test_packed_batch_gives_each_token_its_loss_alone(architecture, with_bos, one_row):
    tokenizer = tiny_tokenizer(with_bos=with_bos)
    model = tiny_model(architecture, hidden_size=64)
    ids = _ids(tokenizer, SENTENCES)
    packed = PackCollator(pad_token_id(tokenizer), one_row=one_row)([{"input_ids": row} for row in ids])
    placements = pack_placements([len(row) for row in ids], None if one_row else max(len(row) for row in ids))
    with torch.no_grad():
        together = _sentence_losses(model(**packed).logits, ids, placements)
        alone = torch.cat([_token_losses(model(input_ids=torch.tensor([row])).logits, torch.tensor([row]))
                           for row in ids])
        padded_loss = model(**pad_batch(ids, pad_token_id(tokenizer))).loss
        packed_loss = model(**packed).loss
    assert packed["input_ids"].shape == ((1, 56) if one_row else (5, 12))
    assert together.shape == (56 - 8,)
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    # The loss stays the mean over the batch's target tokens, the padded batch's loss.
    assert packed_loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)
    assert packed_loss.item() == pytest.approx(alone.mean().item(), abs=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_rows_wider_than_the_longest_sentence_keep_each_token_its_loss_alone(architecture):
    tokenizer = tiny_tokenizer()
    model = tiny_model(architecture, hidden_size=64)
    ids = _ids(tokenizer, [SENTENCES[i] for i in (3, 2, 6, 1, 4)])
    lengths = [len(row) for row in ids]
    assert lengths == [10, 6, 6, 5, 5] and packed_row_tokens(lengths) == 11
    packed = PackCollator(pad_token_id(tokenizer))([{"input_ids": row} for row in ids])
    assert packed["input_ids"].shape == (3, 11)  # [10 +pad] [6 5] [6 5]: 33 tokens, not 4 rows of 10
    assert packed["position_ids"].tolist() == [list(range(10)) + [0], list(range(6)) + list(range(5)),
                                               list(range(6)) + list(range(5))]
    with torch.no_grad():
        together = _sentence_losses(model(**packed).logits, ids, pack_placements(lengths, 11))
        alone = torch.cat([_token_losses(model(input_ids=torch.tensor([row])).logits, torch.tensor([row]))
                           for row in ids])
        padded_loss = model(**pad_batch(ids, pad_token_id(tokenizer))).loss
        packed_loss = model(**packed).loss
    assert together.shape == (32 - 5,)
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)


def test_packed_loss_is_the_mean_of_every_sentence_scored_alone():
    tokenizer = tiny_tokenizer()
    ids = _ids(tokenizer)
    model = tiny_model("llama", hidden_size=64)
    with torch.no_grad():
        loss = model(**PackCollator(0)([{"input_ids": row} for row in ids])).loss
        alone = torch.cat([_token_losses(model(input_ids=torch.tensor([row])).logits, torch.tensor([row]))
                           for row in ids])
    # The reference from first principles: the mean over every target token, each sentence run on its own.
    # Same maths, different matrix shapes: equal to fp32 summation-order rounding (kernels differ in it).
    assert alone.numel() == sum(len(row) - 1 for row in ids)
    assert loss.item() == pytest.approx(alone.mean().item(), rel=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_no_attention_crosses_sentences_in_a_packed_row(architecture):
    tokenizer = tiny_tokenizer()
    model = tiny_model(architecture, hidden_size=64)
    first, second = _ids(tokenizer, SENTENCES[:2])
    changed_first = [first[0]] + [tokenizer.convert_tokens_to_ids("dull")] * (len(first) - 1)

    def second_logits(a: list[int], attend_across: bool = False) -> torch.Tensor:
        batch = pack_batch([a, second], 0, len(a) + len(second))  # one row
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
    for packed in ("padded", "rows", "one-row"):
        batch = DistillationCollator(pad_token_id(tokenizer), topk, k=3, packed=packed != "padded",
                                     one_row=packed == "one-row")(items)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "use_cache") if k in batch}
        with torch.no_grad():
            logits = student(**inputs).logits
        losses[packed] = kd_loss(logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], alpha=0.5,
                                 temperature=2.0, teacher_tail_logmass=batch.get("teacher_tail_logmass"))
    lengths = [len(item["input_ids"]) for item in items]
    assert lengths == [10, 7, 5, 5]
    packed_batch = DistillationCollator(pad_token_id(tokenizer), topk, k=3, packed=True)(items)
    # Rows of at most 10 tokens: [sentence 3], [sentence 0], [sentences 4 and 1].
    assert pack_placements(lengths, 10) == [(0, 0), (1, 0), (2, 0), (2, 5)]
    assert packed_batch["topk_ids"].shape == (3, 10, 3)
    # Sentence 1's rows of teacher top-k sit where its tokens are.
    assert torch.equal(packed_batch["topk_ids"][2, 5:10], topk.for_sentence(1, 3)[0].long())
    assert torch.equal(packed_batch["topk_logprobs"][2, 5:10], topk.for_sentence(1, 3)[1].float())
    assert ("teacher_tail_logmass" in packed_batch) == with_tail
    for packed in ("rows", "one-row"):
        for key in ("loss", "ce", "kl"):
            assert losses[packed][key].item() == pytest.approx(losses["padded"][key].item(), abs=1e-5)


def test_packed_distillation_rows_follow_a_budget_wider_than_the_longest_sentence():
    tokenizer = tiny_tokenizer()
    sentences = [SENTENCES[i] for i in (3, 2, 6, 1, 4)]
    topk = compute_teacher_topk(tiny_model("llama", seed=0, hidden_size=64), tokenizer, sentences, k=4,
                                max_length=16, progress=False)
    items = [{"input_ids": sentence_ids(tokenizer, s, 16)[0], "sentence_index": i} for i, s in enumerate(sentences)]
    batch = DistillationCollator(pad_token_id(tokenizer), topk, k=3, packed=True)(items)
    plain = PackCollator(pad_token_id(tokenizer))(items)
    assert all(torch.equal(batch[key], plain[key]) for key in ("input_ids", "position_ids", "labels"))
    # Rows of 11: [sentence 0] [1, 3] [2, 4]; sentence 3 (5 tokens) sits in row 1 from column 6.
    assert batch["topk_ids"].shape == (3, 11, 3)
    assert torch.equal(batch["topk_ids"][1, 6:11], topk.for_sentence(3, 3)[0].long())
    assert torch.equal(batch["topk_logprobs"][2, 6:11], topk.for_sentence(4, 3)[1].float())


def _settings(epochs: int = 2, **extra) -> TrainSettings:
    return TrainSettings(epochs=epochs, learning_rate=1e-3, batch_size=4, max_length=32, seed=0, device="cpu",
                         eval_batch_size=4, progress=False, checkpoint_steps=100, **extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_model("llama", hidden_size=64).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow
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
    # And it learns: the second epoch beats the first (by 9% on one machine; any kernel path learns).
    assert padded[1] < padded[0]


@pytest.mark.slow
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
    model.config._attn_implementation = "flash_attention_2"  # its varlen path takes one packed row only
    with pytest.raises(ValueError, match="flash attention, which takes packed sentences in one row only"):
        fit(model, tokenizer, encode_dataset(tokenizer, SENTENCES, 32), SENTENCES[:2], _settings(), tmp_path,
            lambda m: None, collator=PackCollator(pad_token_id(tokenizer)), batching="packed")
