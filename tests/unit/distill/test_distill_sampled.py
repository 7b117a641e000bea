"""Tests of random-sampling distillation (ftflow.distill.losses.sampled_kd_loss and the sampled teacher store)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ftflow.distill.losses import distillation_loss, sampled_kd_loss
from ftflow.distill.store import TeacherTopK
from ftflow.distill.teacher import compute_teacher_topk
from ftflow.distill.trainer import DistillationCollator, DistillationTrainer
from ftflow.tokens import IGNORE_INDEX, pad_token_id, sentence_ids
from tests.tiny import SENTENCES, tiny_model, tiny_tokenizer


def _one_position(student_logits: list[float], ids: list[int], logprobs: list[float]):
    """A batch of one sentence with one scored position: logits [1, 2, V], labels [1, 2], draws [1, 2, k]."""
    vocab, k = len(student_logits), len(ids)
    logits = torch.zeros(1, 2, vocab)
    logits[0, 0] = torch.tensor(student_logits)
    labels = torch.tensor([[IGNORE_INDEX, 0]])
    draw_ids = torch.zeros(1, 2, k, dtype=torch.long)
    draw_ids[0, 0] = torch.tensor(ids)
    draw_lp = torch.zeros(1, 2, k)
    draw_lp[0, 0] = torch.tensor(logprobs)
    return logits, labels, draw_ids, draw_lp


def test_hand_computed_kl_against_the_empirical_distribution_of_the_draws():
    # Draws 0, 0, 1 at T = 1: pi = (2/3, 1/3, 0); a uniform student: KL = 2/3 ln 2.
    logits, labels, ids, lp = _one_position([0.0, 0.0, 0.0], [0, 0, 1], [-1.0, -1.0, -2.0])
    result = sampled_kd_loss(logits, labels, ids, lp, alpha=1.0, temperature=1.0)
    # float32 log-softmax and sums: a few float32 ulps of 0.46 (3e-8 each), whatever the kernels.
    assert result["kl"].item() == pytest.approx(2 / 3 * math.log(2), abs=1e-6)
    assert result["loss"].item() == pytest.approx(2 / 3 * math.log(2), abs=1e-6)
    assert result["ce"].item() == pytest.approx(math.log(3), abs=1e-7)


def test_hand_computed_self_normalized_weights_at_temperature_two():
    # p(x) = 0.5 and 0.25: weights p^(1/2 - 1) = sqrt(2), 2, normalized 0.41421, 0.58579; uniform student.
    logits, labels, ids, lp = _one_position([0.0, 0.0, 0.0], [0, 1], [math.log(0.5), math.log(0.25)])
    result = sampled_kd_loss(logits, labels, ids, lp, alpha=1.0, temperature=2.0)
    weights = [math.sqrt(2) / (math.sqrt(2) + 2), 2 / (math.sqrt(2) + 2)]
    kl = sum(w * math.log(w / (1 / 3)) for w in weights)  # against the uniform student: 0.420257
    assert result["kl"].item() == pytest.approx(kl, abs=1e-6)  # float32: a few ulps
    assert result["loss"].item() == pytest.approx(4 * kl, abs=4e-6)  # T^2 KL


def test_alpha_zero_is_exactly_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    ids = torch.randint(0, 7, (2, 5, 4))
    result = sampled_kd_loss(logits, labels, ids, torch.full((2, 5, 4), -1.0), alpha=0.0, temperature=2.0)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert result["loss"].item() == expected.item()


def test_gradient_is_unbiased_for_the_full_distribution_kl_at_temperature_one():
    # Every ordered pair of draws from p, weighted by its probability: the expected gradient of the sampled
    # loss is exactly the gradient of the dense KL(p || softmax(s)).
    p = torch.tensor([0.6, 0.3, 0.1])
    student = torch.tensor([0.2, -0.5, 1.0])
    expected_grad = torch.zeros(3)
    for draws in itertools.product(range(3), repeat=2):
        logits, labels, ids, lp = _one_position(student.tolist(), list(draws), p[list(draws)].log().tolist())
        logits.requires_grad_(True)
        sampled_kd_loss(logits, labels, ids, lp, alpha=1.0, temperature=1.0)["loss"].backward()
        expected_grad += p[list(draws)].prod() * logits.grad[0, 0]
    dense = student.clone().requires_grad_(True)
    F.kl_div(F.log_softmax(dense, -1), p, reduction="sum").backward()
    torch.testing.assert_close(expected_grad, dense.grad, rtol=0, atol=1e-6)
    # ...while the top-2 with its tail bucket is biased: its gradient is another vector.
    from ftflow.distill.losses import kd_loss

    logits, labels, ids, lp = _one_position(student.tolist(), [0, 1], p[[0, 1]].log().tolist())
    logits.requires_grad_(True)
    kd_loss(logits, labels, ids, lp, alpha=1.0, temperature=1.0,
            teacher_tail_logmass=torch.tensor([[math.log(0.1), 0.0]]))["loss"].backward()
    torch.testing.assert_close(logits.grad[0, 0], dense.grad, rtol=0, atol=1e-6)  # k = V - 1: the bucket is exact
    logits, labels, ids, lp = _one_position([0.2, -0.5, 1.0, 0.0], [0], [math.log(0.6)])
    logits.requires_grad_(True)
    kd_loss(logits, labels, ids, lp, alpha=1.0, temperature=1.0,
            teacher_tail_logmass=torch.tensor([[math.log(0.4), 0.0]]))["loss"].backward()
    dense4 = torch.tensor([0.2, -0.5, 1.0, 0.0], requires_grad=True)
    F.kl_div(F.log_softmax(dense4, -1), torch.tensor([0.6, 0.3, 0.1, 0.0]), reduction="sum").backward()
    assert (logits.grad[0, 0] - dense4.grad).abs().max().item() > 0.05  # the tail's shape is the student's


def test_distillation_loss_picks_the_variant_and_refuses_others():
    logits, labels, ids, lp = _one_position([0.0, 0.0, 0.0], [0, 0, 1], [-1.0, -1.0, -2.0])
    assert distillation_loss("sampled", logits, labels, ids, lp, alpha=1.0, temperature=1.0)["kl"].item() == (
        pytest.approx(2 / 3 * math.log(2), abs=1e-6))
    with pytest.raises(ValueError, match="variant must be one of"):
        distillation_loss("dense", logits, labels, ids, lp, alpha=1.0, temperature=1.0)


def test_sampled_store_draws_from_the_teacher_the_same_whatever_the_batching(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", seed=0)
    sentences = SENTENCES[:5]
    one = compute_teacher_topk(model, tokenizer, sentences, k=6, max_length=16, batch_size=1, progress=False,
                               variant="sampled", seed=3)
    many = compute_teacher_topk(model, tokenizer, sentences, k=6, max_length=16, batch_size=4, progress=False,
                                variant="sampled", seed=3)
    assert torch.equal(one.ids, many.ids) and one.tail_logmass is None and one.variant == "sampled"
    other_seed = compute_teacher_topk(model, tokenizer, sentences, k=6, max_length=16, progress=False,
                                      variant="sampled", seed=4)
    assert not torch.equal(one.ids, other_seed.ids)
    # Each draw's stored log-prob is the teacher's at that id.
    ids, _ = sentence_ids(tokenizer, sentences[0], 16)
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    drawn, drawn_lp = one.for_sentence(0)
    torch.testing.assert_close(drawn_lp.float(), log_probs.gather(-1, drawn.long()), rtol=2e-3, atol=2e-3)
    # Saved and loaded, the variant and seed come back; the collator attaches no tail.
    one.save(tmp_path / "s")
    loaded = TeacherTopK.load(tmp_path / "s")
    assert (loaded.variant, loaded.sample_seed, loaded.tail_logmass) == ("sampled", 3, None)
    batch = DistillationCollator(pad_token_id(tokenizer), loaded, k=4)(
        [{"input_ids": sentence_ids(tokenizer, s, 16)[0], "sentence_index": i} for i, s in enumerate(sentences)])
    assert batch["topk_ids"].shape[-1] == 4 and "teacher_tail_logmass" not in batch


def test_many_draws_follow_the_teachers_probabilities():
    log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    from ftflow.distill.teacher import _draw

    ids = _draw(log_probs, 20000, seed=0, sentence_index=0)
    frequencies = torch.bincount(ids[0], minlength=4).double() / 20000
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64),
                               rtol=0, atol=0.01)


def test_trainer_with_the_sampled_variant_lowers_its_loss(tmp_path):
    from transformers import TrainingArguments

    tokenizer = tiny_tokenizer()
    sentences = SENTENCES[:4]
    store = compute_teacher_topk(tiny_model("llama", seed=0, hidden_size=48), tokenizer, sentences, k=8,
                                 max_length=16, progress=False, variant="sampled")
    dataset = [{"input_ids": sentence_ids(tokenizer, s, 16)[0], "sentence_index": i} for i, s in enumerate(sentences)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                             use_cpu=True, remove_unused_columns=False, save_strategy="no", seed=0)
    trainer = DistillationTrainer(model=tiny_model("llama", seed=1), args=args, train_dataset=dataset,
                                  data_collator=DistillationCollator(pad_token_id(tokenizer), store), alpha=0.5,
                                  temperature=1.0, variant="sampled")
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and logs[-1]["loss"] < logs[0]["loss"]
    assert logs[0]["loss"] == pytest.approx(0.5 * logs[0]["ce"] + 0.5 * logs[0]["kl"], rel=1e-5)
    with pytest.raises(ValueError, match="variant must be one of"):
        DistillationTrainer(model=tiny_model("llama", seed=1), args=args, alpha=0.5, temperature=1.0, variant="x")


def test_draws_do_not_depend_on_the_row_chunking(monkeypatch):
    from ftflow.distill import teacher as distill_teacher

    log_probs = F.log_softmax(torch.randn(7, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    whole = distill_teacher._draw(log_probs, 12, seed=1, sentence_index=2)
    monkeypatch.setattr(distill_teacher, "DRAW_CHUNK_ELEMENTS", 100)  # two rows a chunk
    assert torch.equal(distill_teacher._draw(log_probs, 12, seed=1, sentence_index=2), whole)
