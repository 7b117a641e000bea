"""Tests of ftflow.distill: the top-k KD loss, the teacher top-k store and the Trainer glue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainingArguments

from ftflow.distill import (
    DistillationCollator,
    DistillationTrainer,
    TeacherTopK,
    check_same_tokenizer,
    compute_teacher_topk,
    kd_loss,
)
from ftflow.tokens import IGNORE_INDEX, pad_batch, pad_token_id, sentence_ids
from tests.tiny import SENTENCES, tiny_model, tiny_tokenizer

VOCAB = 12


# ---------------------------------------------------------------- helpers


def _labels(lengths: list[int], vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """[B, L] labels as pad_batch makes them, from random ids of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    batch = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    return pad_batch(batch, pad_id=0)["labels"]


def _teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the teacher's full-vocabulary log-softmax: [B, L, k] ids and log-probs."""
    values, ids = torch.topk(F.log_softmax(teacher_logits.float(), dim=-1), k, dim=-1)
    return ids, values


def _scored_logit_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] True where the logits at t predict a scored labels[t + 1]."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


# ---------------------------------------------------------------- kd_loss


def test_alpha_zero_is_exactly_cross_entropy():
    torch.manual_seed(0)
    labels = _labels([5, 3, 7])
    student = torch.randn(3, 7, VOCAB)
    topk_ids, topk_lp = _teacher_topk(torch.randn(3, 7, VOCAB), 4)

    result = kd_loss(student, labels, topk_ids, topk_lp, alpha=0.0, temperature=2.0)

    expected = F.cross_entropy(student[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    assert result["loss"].item() == expected.item()
    assert result["ce"].item() == expected.item()


@pytest.mark.parametrize("k", [1, 3, 7, VOCAB])
def test_kl_is_zero_when_student_equals_teacher(k):
    torch.manual_seed(1)
    labels = _labels([6, 4])
    logits = torch.randn(2, 6, VOCAB) * 3
    topk_ids, topk_lp = _teacher_topk(logits, k)

    result = kd_loss(logits, labels, topk_ids, topk_lp, alpha=1.0, temperature=1.0)

    assert abs(result["kl"].item()) < 1e-6
    assert abs(result["loss"].item()) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_k_equals_dense_kl(temperature):
    torch.manual_seed(2)
    labels = _labels([6, 4, 5])
    student = torch.randn(3, 6, VOCAB) * 2
    teacher = torch.randn(3, 6, VOCAB) * 2
    topk_ids, topk_lp = _teacher_topk(teacher, VOCAB)

    result = kd_loss(student, labels, topk_ids, topk_lp, alpha=1.0, temperature=temperature)

    scored = _scored_logit_mask(labels)
    dense = F.kl_div(
        F.log_softmax(student[scored] / temperature, dim=-1),
        F.log_softmax(teacher[scored] / temperature, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(-1).mean()
    assert result["kl"].item() == pytest.approx(dense.item(), abs=1e-5)
    assert result["loss"].item() == pytest.approx(temperature**2 * dense.item(), abs=1e-5 * temperature**2)


def test_pads_contribute_nothing():
    torch.manual_seed(3)
    labels = _labels([7, 2, 5])
    student = torch.randn(3, 7, VOCAB)
    topk_ids, topk_lp = _teacher_topk(torch.randn(3, 7, VOCAB), 3)
    before = kd_loss(student, labels, topk_ids, topk_lp, alpha=0.5, temperature=2.0)

    unscored = ~_scored_logit_mask(labels)
    junk_student = student.clone()
    junk_student[unscored] = torch.randn(int(unscored.sum()), VOCAB) * 1e4
    junk_ids = topk_ids.clone()
    junk_ids[unscored] = 0
    junk_lp = topk_lp.clone()
    junk_lp[unscored] = 123.0  # not even a log-prob
    after = kd_loss(junk_student, labels, junk_ids, junk_lp, alpha=0.5, temperature=2.0)

    for key in ("loss", "ce", "kl"):
        assert after[key].item() == before[key].item()


@pytest.mark.parametrize(
    "temperature, expected_kl, expected_loss",
    [
        # T = 1: top part 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.25) = 0.5 ln 2;
        # tail (1 - M)(ln(1 - M) - ln(1 - Q)) = 0.25 (ln 0.25 - ln 0.5) = -0.25 ln 2; KL = 0.25 ln 2.
        # loss = 0.5 * ln 4 + 0.5 * 1 * 0.25 ln 2.
        (1.0, 0.17328679513998632, 0.7797905781299385),
        # T = 2: teacher top-2 ~ sqrt(p) = (0.7071, 0.5), renormalized to M = 0.75 ->
        # (0.43934, 0.31066); student stays uniform (0.25 each), Q = 0.5.
        # KL = 0.43934 ln(0.43934/0.25) + 0.31066 ln(0.31066/0.25) + 0.25 ln(0.25/0.5).
        # loss = 0.5 * ln 4 + 0.5 * 4 * KL.
        (2.0, 0.1419058127156926, 0.9769588059913306),
    ],
)
def test_hand_computed_case(temperature, expected_kl, expected_loss):
    # V = 4, k = 2, one scored position. Teacher p = (0.5, 0.25, 0.125, 0.125); top-2 = ids (0, 1),
    # M = 0.75. Student logits all 0 -> q = 0.25 everywhere; target id 2 -> CE = ln 4.
    student = torch.zeros(1, 2, 4)
    labels = torch.tensor([[IGNORE_INDEX, 2]])
    topk_ids = torch.tensor([[[0, 1], [0, 1]]])
    topk_lp = torch.tensor([[[math.log(0.5), math.log(0.25)], [0.0, 0.0]]])

    result = kd_loss(student, labels, topk_ids, topk_lp, alpha=0.5, temperature=temperature)

    assert result["ce"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert result["kl"].item() == pytest.approx(expected_kl, abs=1e-6)
    assert result["loss"].item() == pytest.approx(expected_loss, abs=1e-6)


def test_float16_mass_above_one_and_concentrated_student_stay_finite():
    # Float16 storage can round the teacher's top-k mass above 1, and a student can put all its
    # mass on the top-k (1 - Q = 0): the tail bucket must stay finite and the gradient usable.
    torch.manual_seed(4)
    labels = _labels([5, 5])
    teacher = torch.randn(2, 5, VOCAB)
    topk_ids, topk_lp = _teacher_topk(teacher, VOCAB)
    topk_lp = topk_lp.half().float() + 1e-3  # sum of exp > 1
    student = torch.full((2, 5, VOCAB), -1e4)
    student.scatter_(-1, topk_ids[..., :2], 0.0)
    student.requires_grad_(True)

    result = kd_loss(student, labels, topk_ids[..., :2], topk_lp[..., :2], alpha=0.7, temperature=1.5)
    result["loss"].backward()

    assert torch.isfinite(result["loss"]) and result["kl"].item() >= 0
    assert torch.isfinite(student.grad).all()


def test_kd_loss_reports_bad_inputs_at_once():
    labels = _labels([3])
    with pytest.raises(ValueError, match="labels shape.*alpha must be in.*temperature must be"):
        kd_loss(torch.zeros(1, 3, VOCAB), labels[:, :2], torch.zeros(1, 3, 2, dtype=torch.long),
                torch.zeros(1, 3, 2), alpha=1.5, temperature=0.0)


# ---------------------------------------------------------------- TeacherTopK


def _random_topk(lengths: list[int], k: int = 4, seed: int = 0) -> TeacherTopK:
    generator = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    values, ids = torch.topk(torch.randn(rows, 20, generator=generator).log_softmax(-1), k, dim=-1)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    return TeacherTopK(ids=ids.to(torch.int32), logprobs=values.half(), offsets=offsets)


def test_save_load_round_trip_is_exact(tmp_path):
    topk = _random_topk([3, 5, 1, 4])
    topk.save(tmp_path / "topk")

    loaded = TeacherTopK.load(tmp_path / "topk")

    assert loaded.ids.dtype == torch.int32 and loaded.logprobs.dtype == torch.float16
    assert torch.equal(loaded.ids, topk.ids)
    assert torch.equal(loaded.logprobs, topk.logprobs)
    assert torch.equal(loaded.offsets, topk.offsets)
    assert (loaded.k, loaded.n_sentences, loaded.positions) == (4, 4, 13)


def test_for_sentence_slices_rows_and_best_k():
    topk = _random_topk([3, 5, 1, 4])

    ids, logprobs = topk.for_sentence(1, k=2)

    assert torch.equal(ids, topk.ids[3:8, :2])
    assert torch.equal(logprobs, topk.logprobs[3:8, :2])
    assert (logprobs[:, 0] >= logprobs[:, 1]).all()  # sorted: the slice keeps the best
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        topk.for_sentence(0, k=5)
    with pytest.raises(IndexError):
        topk.for_sentence(4)


def test_load_rejects_tensors_that_disagree_with_meta(tmp_path):
    _random_topk([2, 2]).save(tmp_path)
    _random_topk([2, 2, 2]).save(tmp_path / "other")
    (tmp_path / "teacher_topk.safetensors").write_bytes((tmp_path / "other" / "teacher_topk.safetensors").read_bytes())

    with pytest.raises(ValueError, match="do not match their meta"):
        TeacherTopK.load(tmp_path)


# ------------------------------------------------------- compute_teacher_topk


def test_compute_teacher_topk_matches_per_sentence_forward():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", seed=0)
    model.train()  # the function must run in eval mode and then restore this
    max_length, k = 8, 5  # the longest sentence is cut: truncation must not break alignment

    topk = compute_teacher_topk(model, tokenizer, SENTENCES, k=k, max_length=max_length, batch_size=3,
                                progress=False)

    assert model.training
    assert topk.ids.dtype == torch.int32 and topk.logprobs.dtype == torch.float16
    model.eval()
    for i, text in enumerate(SENTENCES):
        ids, _ = sentence_ids(tokenizer, text, max_length)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        expected_lp, expected_ids = torch.topk(F.log_softmax(logits.float(), dim=-1), k, dim=-1)
        got_ids, got_lp = topk.for_sentence(i)
        assert got_ids.shape == (len(ids), k)
        assert torch.equal(got_ids.long(), expected_ids)
        torch.testing.assert_close(got_lp.float(), expected_lp, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- collator


def test_collator_aligns_rows_and_pads_safely():
    tokenizer = tiny_tokenizer()
    topk = _random_topk([len(sentence_ids(tokenizer, s, 16)[0]) for s in SENTENCES[:3]], k=4)
    items = [{"input_ids": sentence_ids(tokenizer, s, 16)[0], "sentence_index": i} for i, s in enumerate(SENTENCES[:3])]

    batch = DistillationCollator(pad_token_id(tokenizer), topk, k=2)(items)

    assert batch["topk_ids"].dtype == torch.long and batch["topk_logprobs"].dtype == torch.float32
    assert batch["topk_ids"].shape == (*batch["input_ids"].shape, 2)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids, logprobs = topk.for_sentence(row, 2)
        assert torch.equal(batch["topk_ids"][row, :n], ids.long())
        assert torch.equal(batch["topk_logprobs"][row, :n], logprobs.float())
        assert torch.isfinite(batch["topk_logprobs"][row, n:]).all()
    expected = pad_batch([item["input_ids"] for item in items], pad_token_id(tokenizer))
    for key, value in expected.items():
        assert torch.equal(batch[key], value)


def test_collator_rejects_top_k_of_other_data():
    tokenizer = tiny_tokenizer()
    topk = compute_teacher_topk(tiny_model(), tokenizer, SENTENCES, k=3, max_length=6, progress=False)
    # The student data uses a longer max_length: the longest sentences no longer match their rows.
    items = [{"input_ids": sentence_ids(tokenizer, s, 32)[0], "sentence_index": i} for i, s in enumerate(SENTENCES)]

    with pytest.raises(ValueError, match="computed for other data, another tokenizer or another max_length"):
        DistillationCollator(pad_token_id(tokenizer), topk, k=None)(items)


# ---------------------------------------------------------------- tokenizer check


def _other_vocab_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", "le", "chat", "chien"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_check_same_tokenizer():
    check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer(), "teacher-8b", "student-2b")

    with pytest.raises(ValueError) as error:
        check_same_tokenizer(tiny_tokenizer(), _other_vocab_tokenizer(), "granite-8b", "qwen-1.5b")
    message = str(error.value)
    for fragment in ("granite-8b", "qwen-1.5b", "shared vocabulary", "vocabularies differ", "teacher's family"):
        assert fragment in message

    with pytest.raises(ValueError, match="bos_token_id differs"):
        check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer(with_bos=False), "t", "s")


# ---------------------------------------------------------------- Trainer


def _trainer(tmp_path, alpha: float, temperature: float = 2.0, steps: int = 3):
    tokenizer = tiny_tokenizer()
    sentences = SENTENCES[:4]
    topk = compute_teacher_topk(tiny_model("llama", seed=0, hidden_size=48), tokenizer, sentences, k=4,
                                max_length=16, progress=False)
    dataset = [{"input_ids": sentence_ids(tokenizer, s, 16)[0], "sentence_index": i} for i, s in enumerate(sentences)]
    student = tiny_model("llama", seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,  # the whole dataset: every step sees the same batch
        per_device_eval_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        seed=0,
    )
    collator = DistillationCollator(pad_token_id(tokenizer), topk, k=None)
    trainer = DistillationTrainer(model=student, args=args, data_collator=collator, train_dataset=dataset,
                                  alpha=alpha, temperature=temperature)
    return trainer, collator, dataset


def test_trainer_distills_and_evaluates(tmp_path):
    trainer, collator, dataset = _trainer(tmp_path, alpha=0.5)
    before = [p.detach().clone() for p in trainer.model.parameters()]

    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["loss"] == pytest.approx(0.5 * first["ce"] + 0.5 * 4 * first["kl"], rel=1e-5)

    # Eval with the same collator scores the same distillation loss.
    metrics = trainer.evaluate(eval_dataset=dataset)
    batch = collator(dataset)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"]).logits
    expected = kd_loss(logits, batch["labels"], batch["topk_ids"], batch["topk_logprobs"], alpha=0.5, temperature=2.0)
    assert metrics["eval_loss"] == pytest.approx(expected["loss"].item(), rel=1e-5)

    # A validation split without teacher top-k is scored with plain cross-entropy.
    plain = trainer.evaluate(eval_dataset=[{"input_ids": item["input_ids"]} for item in dataset])
    assert plain["eval_loss"] == pytest.approx(expected["ce"].item(), rel=1e-5)


def test_trainer_alpha_zero_first_step_is_plain_cross_entropy(tmp_path):
    trainer, collator, dataset = _trainer(tmp_path, alpha=0.0, steps=1)
    batch = collator(dataset)
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], labels=batch["labels"]).loss.item()

    trainer.train()

    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


def test_trainer_refuses_training_batches_without_top_k(tmp_path):
    trainer, _, dataset = _trainer(tmp_path, alpha=0.5, steps=1)
    trainer.train_dataset = [{"input_ids": item["input_ids"]} for item in dataset]

    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()
