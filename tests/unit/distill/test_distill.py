"""Tests of ftflow.distill: the top-k KD loss, the teacher top-k store and the Trainer glue."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainingArguments

from ftflow.distill.trainer import DistillationCollator, DistillationTrainer
from ftflow.distill.store import TeacherTopK
from ftflow.distill.vocabulary import SharedVocabulary, check_distillable, check_same_tokenizer
from ftflow.distill.teacher import compute_teacher_topk, teacher_topk_for_student
from ftflow.distill.losses import kd_loss
from ftflow.train import trainer as training
from ftflow.config import DistillConfig
from ftflow.train.runner import distill_grid, run_job
from ftflow.tokens import IGNORE_INDEX, pad_batch, pad_token_id, sentence_ids
from tests.memory_probe import measure
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


def _teacher_tail(teacher_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] log of the teacher's mass outside topk_ids, summed directly."""
    log_probs = F.log_softmax(teacher_logits.float(), dim=-1)
    return torch.logsumexp(log_probs.scatter(-1, topk_ids, -math.inf), dim=-1)


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


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 5, 7, VOCAB])
@pytest.mark.parametrize("stored_tail", [True, False])
def test_kl_is_zero_when_student_equals_teacher(k, temperature, stored_tail):
    # Before the fix: 0.52 at T = 2 and 1.31 at T = 4 (teacher tempered on its top-k only).
    torch.manual_seed(1)
    labels = _labels([6, 4])
    logits = torch.randn(2, 6, VOCAB) * 3
    topk_ids, topk_lp = _teacher_topk(logits, k)
    tail = _teacher_tail(logits, topk_ids) if stored_tail else None

    result = kd_loss(logits, labels, topk_ids, topk_lp, alpha=1.0, temperature=temperature,
                     teacher_tail_logmass=tail)

    assert abs(result["kl"].item()) < 1e-6
    assert abs(result["loss"].item()) < 1e-6 * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
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
        # T = 2. The teacher's tail (0.25) is given the student's tail shape (uniform over ids 2, 3), which
        # here is the teacher's own, so this is the dense tempered KL: teacher sqrt(p) / sum =
        # (0.36940, 0.26120, 0.18470, 0.18470) against the uniform student. loss = 0.5 ln 4 + 0.5 * 4 * KL.
        # (The old kd_loss gave 0.14191: the teacher's tail kept its T = 1 mass.)
        (2.0, 0.043840314666364816, 0.7808278098926749),
        # T = 4: teacher p^(1/4) / sum = (0.30721, 0.25833, 0.21723, 0.21723); loss = 0.5 ln 4 + 0.5 * 16 * KL.
        (4.0, 0.010730715387659906, 0.7789929036612245),
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


@pytest.mark.parametrize(
    "temperature, expected_kl",
    [
        # T = 1: 0.4 ln(0.4/0.2) + 0.3 ln(0.3/0.1) + 0.3 ln(0.3/0.7), the tail as one bucket.
        (1.0, 0.35265320070825007),
        # T = 2: the teacher's tail 0.3 takes the student's tail shape (0.4, 0.2, 0.1) / 0.7 ->
        # p_hat = (0.4, 0.3, 0.17143, 0.08571, 0.04286); sqrt(p_hat) / sum = (0.30203, 0.26157, 0.19773,
        # 0.13981, 0.09886) against sqrt(q) / sum.
        (2.0, 0.09419728214186651),
        # T = 4: p_hat^(1/4) / sum = (0.25049, 0.23311, 0.20267, 0.17043, 0.14331).
        (4.0, 0.023708732408105164),
    ],
)
def test_hand_computed_tail_takes_the_students_shape(temperature, expected_kl):
    # V = 5, k = 2. Teacher: p = 0.4 and 0.3 on ids 0 and 1, tail mass 0.3 (its shape is not stored).
    # Student q = (0.2, 0.1, 0.4, 0.2, 0.1): its tail (ids 2..4) is not uniform.
    student = torch.log(torch.tensor([0.2, 0.1, 0.4, 0.2, 0.1])).expand(1, 2, 5).clone()
    labels = torch.tensor([[IGNORE_INDEX, 2]])
    topk_ids = torch.tensor([[[0, 1], [0, 1]]])
    topk_lp = torch.log(torch.tensor([0.4, 0.3])).expand(1, 2, 2).clone()
    tail = torch.full((1, 2), math.log(0.3))

    stored = kd_loss(student, labels, topk_ids, topk_lp, alpha=1.0, temperature=temperature,
                     teacher_tail_logmass=tail)
    derived = kd_loss(student, labels, topk_ids, topk_lp, alpha=1.0, temperature=temperature)

    assert stored["kl"].item() == pytest.approx(expected_kl, abs=1e-6)
    assert derived["kl"].item() == pytest.approx(expected_kl, abs=1e-6)
    assert stored["loss"].item() == pytest.approx(temperature**2 * expected_kl, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 5])
def test_top_k_kl_is_dense_kl_against_the_completed_teacher(k, temperature):
    # Independently of kd_loss's bucket arithmetic: fill the teacher's unknown tail with the student's
    # tail shape, temper both over the whole vocabulary and take the dense KL.
    torch.manual_seed(5)
    labels = _labels([6, 3])
    student = torch.randn(2, 6, VOCAB) * 2
    teacher = torch.randn(2, 6, VOCAB) * 2
    topk_ids, topk_lp = _teacher_topk(teacher, k)
    tail = _teacher_tail(teacher, topk_ids)

    student.requires_grad_(True)
    result = kd_loss(student, labels, topk_ids, topk_lp, alpha=1.0, temperature=temperature,
                     teacher_tail_logmass=tail)
    (grad,) = torch.autograd.grad(result["kl"], student)

    scored = _scored_logit_mask(labels)
    with torch.no_grad():  # the completed teacher is a fixed target
        q = F.softmax(student[scored], dim=-1)  # [N, V]
        ids, top_p, tail_p = topk_ids[scored], topk_lp[scored].exp(), tail[scored].exp()
        in_top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, ids, True)
        student_tail = torch.where(in_top, 0.0, q)
        completed = student_tail / student_tail.sum(-1, keepdim=True) * tail_p[:, None]
        completed = completed.scatter(-1, ids, top_p)
    dense = F.kl_div(F.log_softmax(student[scored] / temperature, dim=-1),
                     F.log_softmax(completed.log() / temperature, dim=-1), log_target=True,
                     reduction="none").sum(-1).mean()
    (dense_grad,) = torch.autograd.grad(dense, student)
    assert result["kl"].item() == pytest.approx(dense.item(), abs=1e-5)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_free_student_at_temperature_two_learns_the_teachers_probabilities():
    # Before the fix the student's top-k mass went to 0.986 against the teacher's 0.664: T moved the optimum.
    torch.manual_seed(6)
    teacher = torch.randn(1, 2, VOCAB) * 2
    topk_ids, topk_lp = _teacher_topk(teacher, 3)
    tail = _teacher_tail(teacher, topk_ids)
    labels = torch.tensor([[IGNORE_INDEX, 0]])
    student = torch.zeros(1, 2, VOCAB, requires_grad=True)
    optimizer = torch.optim.Adam([student], lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        kd_loss(student, labels, topk_ids, topk_lp, alpha=1.0, temperature=2.0,
                teacher_tail_logmass=tail)["loss"].backward()
        optimizer.step()

    learned = F.softmax(student.detach()[0, 0], dim=-1)[topk_ids[0, 0]]
    torch.testing.assert_close(learned, topk_lp[0, 0].exp(), rtol=0, atol=1e-4)
    assert learned.sum().item() == pytest.approx(topk_lp[0, 0].exp().sum().item(), abs=1e-4)


def test_gradient_is_zero_when_student_equals_teacher_at_temperature_three():
    torch.manual_seed(7)
    labels = _labels([5])
    logits = (torch.randn(1, 5, VOCAB) * 2).requires_grad_(True)
    topk_ids, topk_lp = _teacher_topk(logits.detach(), 4)

    kd_loss(logits, labels, topk_ids, topk_lp, alpha=1.0, temperature=3.0,
            teacher_tail_logmass=_teacher_tail(logits.detach(), topk_ids))["loss"].backward()

    assert logits.grad.abs().max().item() < 1e-6


def test_kl_over_a_shared_vocabulary_ignores_the_students_extra_rows():
    # A student with more embedding rows than the teacher (padding ids no token maps to): the KL is taken
    # over the shared first ids, CE over all of them.
    torch.manual_seed(8)
    labels = _labels([6, 4])
    teacher = torch.randn(2, 6, VOCAB)
    student = torch.randn(2, 6, VOCAB + 4)
    topk_ids, topk_lp = _teacher_topk(teacher, VOCAB)

    result = kd_loss(student, labels, topk_ids, topk_lp, alpha=0.5, temperature=2.0, vocab_size=VOCAB)
    narrow = kd_loss(student[..., :VOCAB], labels, topk_ids, topk_lp, alpha=0.5, temperature=2.0)
    wide = kd_loss(student, labels, topk_ids, topk_lp, alpha=0.5, temperature=2.0)

    assert result["kl"].item() == pytest.approx(narrow["kl"].item(), abs=1e-6)
    assert result["ce"].item() == wide["ce"].item()
    assert result["kl"].item() != pytest.approx(wide["kl"].item(), abs=1e-4)


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


def test_save_load_keeps_tail_tokenizer_and_vocabulary(tmp_path):
    tokenizer = tiny_tokenizer()
    topk = compute_teacher_topk(tiny_model(), tokenizer, SENTENCES[:3], k=3, max_length=8, progress=False,
                                teacher_name="granite-teacher")
    topk.save(tmp_path / "topk")

    loaded = TeacherTopK.load(tmp_path / "topk")

    assert loaded.tail_logmass.dtype == torch.float32 and torch.equal(loaded.tail_logmass, topk.tail_logmass)
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert (loaded.teacher_name, loaded.teacher_rows, loaded.vocab_size, loaded.vocabulary_note) == (
        "granite-teacher", 33, 33, None)


def test_load_refuses_an_older_format(tmp_path):
    _random_topk([2]).save(tmp_path)
    meta = json.loads((tmp_path / "teacher_topk.json").read_text())
    (tmp_path / "teacher_topk.json").write_text(json.dumps(dict(meta, format_version=1)))

    with pytest.raises(ValueError, match="have format 1, this ftflow reads format 3; recompute"):
        TeacherTopK.load(tmp_path)


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
        # The log-mass outside the top-5 is kept in float32; outside the top-2 it adds the float16 entries
        # 3..5, so it is good to their rounding (5e-4 in log = 0.05% of the mass).
        log_probs = F.log_softmax(logits.float(), dim=-1)
        for keep, tolerance in ((k, 1e-5), (2, 5e-4)):
            outside = torch.logsumexp(log_probs.scatter(-1, expected_ids[:, :keep], -math.inf), dim=-1)
            torch.testing.assert_close(topk.tail_for_sentence(i, keep), outside, rtol=0, atol=tolerance)
    assert topk.vocab_size == topk.teacher_rows == len(tokenizer) and topk.vocabulary_note is None
    assert topk.tokenizer is tokenizer


def _granite(vocab_size: int, seed: int = 0):
    """A tiny Granite with granite-3.3-8b's multipliers: its forward divides the logits by logits_scaling."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    return GraniteForCausalLM(GraniteConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
        logits_scaling=16.0)).eval()


def _teacher(architecture: str, adapter: str | None):
    """A tiny teacher as ftflow.models.loading.load_trained returns a run: the model, or the base with a PEFT adapter."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    vocab = len(tiny_tokenizer())
    model = _granite(vocab) if architecture == "granite" else tiny_model(architecture, vocab_size=vocab)
    if adapter == "lora":  # non-zero adapters (PEFT starts B at zero), so they change the logits
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    elif adapter == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    return model.eval()


@pytest.mark.parametrize("architecture, adapter", [("llama", None), ("qwen2", None), ("granite", None),
                                                   ("llama", "lora"), ("granite", "prefix")])
@pytest.mark.parametrize("variant", ["topk", "sampled"])
def test_teacher_pass_in_chunks_stores_what_the_full_logits_give(architecture, adapter, variant):
    """Chunks of 1 and 5 positions (sentences split across chunks) against the model's full [B, L, V] logits."""
    tokenizer, model = tiny_tokenizer(), _teacher(architecture, adapter)
    options = dict(k=5, max_length=16, batch_size=3, progress=False, variant=variant, seed=2, vocab_size=30)
    full = compute_teacher_topk(model, tokenizer, SENTENCES, logits_chunk_tokens=0, **options)
    for chunk in (1, 5):
        chunked = compute_teacher_topk(model, tokenizer, SENTENCES, logits_chunk_tokens=chunk, **options)
        assert torch.equal(chunked.offsets, full.offsets)
        # The same float32 log-softmax rows, up to the LM head's rounding on fewer rows (none seen here):
        # the same ids and float16 log-probs, and float32 tails within a few float32 steps.
        assert torch.equal(chunked.ids, full.ids)
        assert torch.equal(chunked.logprobs, full.logprobs)
        if variant == "topk":
            torch.testing.assert_close(chunked.tail_logmass, full.tail_logmass, rtol=0, atol=1e-6)
        else:
            assert chunked.tail_logmass is None and full.tail_logmass is None


def test_teacher_pass_never_holds_full_logits_nor_a_cache():
    """The head sees at most a chunk (or the batch's last positions, in the forward and its check) at a time."""
    tokenizer, model = tiny_tokenizer(), tiny_model("llama")
    head_rows, forward_options = [], []
    model.lm_head.register_forward_hook(
        lambda module, args, output: head_rows.append(output.shape[:-1].numel()))
    model.register_forward_pre_hook(lambda module, args, kwargs: forward_options.append(
        (kwargs.get("use_cache"), kwargs.get("logits_to_keep"))), with_kwargs=True)
    topk = compute_teacher_topk(model, tokenizer, SENTENCES, k=3, max_length=16, batch_size=4, progress=False,
                                logits_chunk_tokens=7)
    # 8 sentences in 2 batches of 4 sentences of up to 12 tokens: never 4 x 12 rows of logits at once.
    assert topk.positions > 40 and max(head_rows) <= 7
    assert forward_options == [(False, 1), (False, 1)]


PROBE_QWEN = dict(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                  bos_token_id=2, eos_token_id=3)


def _teacher_pass_probe(meter, batch: int, length: int, chunk: int, k: int) -> dict:
    """The teacher pass over one batch of full-length sentences, its peak above the weights (bf16, 32k vocabulary)."""
    import random

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.tiny import WORDS

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**PROBE_QWEN)).to(torch.bfloat16).eval()
    words = random.Random(0)
    sentences = [" ".join(words.choice(WORDS) for _ in range(length - 1)) for _ in range(batch)]
    options = dict(k=k, batch_size=batch, progress=False, logits_chunk_tokens=chunk)
    compute_teacher_topk(model, tiny_tokenizer(), sentences[:1], max_length=8, **options)  # one-time costs
    meter.start()
    compute_teacher_topk(model, tiny_tokenizer(), sentences, max_length=length, **options)
    return {"peak": meter.peak()}


def test_teacher_pass_peak_above_the_weights_is_what_the_plan_says():
    # 4 sentences of 128 tokens, chunks of 64 positions: 16 MB of logits at a time, where the model's full
    # logits and one sentence's float32 copies held 66 MB. Tolerance: 10%, and 2 MB of page rounding,
    # the CPU kernels' scratch and Python objects.
    from transformers import Qwen2Config

    from ftflow.plan.predict import predict_teacher_pass

    batch, length, chunk, k = 4, 128, 64, 8
    measured = measure("tests.unit.distill.test_distill:_teacher_pass_probe", batch=batch, length=length, chunk=chunk,
                       k=k)["peak"]
    plan = predict_teacher_pass(Qwen2Config(**PROBE_QWEN), "bf16", batch, length, k=k, logits_chunk_tokens=chunk,
                                device="cpu")
    planned = plan.allocated_bytes - plan.weights_bytes
    assert abs(measured - planned) <= 0.1 * planned + 2e6, (measured, planned)


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
    assert "teacher_tail_logmass" not in batch  # this store has no tail: kd_loss derives it


def test_collator_attaches_the_tail_outside_the_used_k():
    tokenizer = tiny_tokenizer()
    topk = compute_teacher_topk(tiny_model(), tokenizer, SENTENCES[:3], k=4, max_length=16, progress=False)
    items = [{"input_ids": sentence_ids(tokenizer, s, 16)[0], "sentence_index": i} for i, s in enumerate(SENTENCES[:3])]

    batch = DistillationCollator(pad_token_id(tokenizer), topk, k=2)(items)

    assert batch["teacher_tail_logmass"].shape == batch["input_ids"].shape
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["teacher_tail_logmass"][row, :n], topk.tail_for_sentence(row, 2))
        assert torch.isfinite(batch["teacher_tail_logmass"][row, n:]).all()


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


def _bpe_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc"])}
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_check_same_tokenizer_compares_merges_and_special_ids():
    check_same_tokenizer(_bpe_tokenizer([("a", "b")]), _bpe_tokenizer([("a", "b")]), "t", "s")

    # Same vocabulary, other merges: "abc" would be "ab c" for one and "a bc" for the other.
    with pytest.raises(ValueError, match=r"merges differ \(1 vs 1 merges; first difference at merge #0: "
                                         r"\('a', 'b'\) vs \('b', 'c'\)\)"):
        check_same_tokenizer(_bpe_tokenizer([("a", "b")]), _bpe_tokenizer([("b", "c")]), "t", "s")

    other_eos = _bpe_tokenizer([("a", "b")])
    other_eos.eos_token = "<pad>"
    with pytest.raises(ValueError, match=r"eos_token_id differs \(3 vs 0\)"):
        check_same_tokenizer(_bpe_tokenizer([("a", "b")]), other_eos, "t", "s")


def test_check_same_tokenizer_compares_how_text_is_split():
    splits_on_spaces_only = tiny_tokenizer()
    splits_on_spaces_only.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # "mat," is one unknown word for it, "mat" and "," for the tiny tokenizer.
    with pytest.raises(ValueError, match=r"the same text is encoded differently \('the cat sat on the mat, and the "
                                         r"dog ran fast.': \[4, 6, 9, 10, 4, 11, 1, 20, 4, 7, 12, 13\] vs "
                                         r"\[4, 6, 9, 10, 4, 1, 20, 4, 7, 12, 1\]\)"):
        check_same_tokenizer(tiny_tokenizer(), splits_on_spaces_only, "t", "s")

    # Another normalizer that changes nothing these tokenizers can encode is not a difference.
    nfc = tiny_tokenizer()
    nfc.backend_tokenizer.normalizer = normalizers.NFC()
    check_same_tokenizer(tiny_tokenizer(), nfc, "t", "s")


def test_qwen_embedding_sizes_over_one_tokenizer_compare_the_shared_ids():
    # Qwen2.5 7B has 152,064 embedding rows, 0.5B and 3B 151,936, all with one tokenizer.
    tokenizer = tiny_tokenizer()

    shared = check_distillable(tokenizer, tiny_tokenizer(), 152064, 151936, "qwen2.5-7b", "qwen2.5-3b")

    assert shared == SharedVocabulary(
        size=151936,
        note="teacher 'qwen2.5-7b' has 152064 embedding rows and student 'qwen2.5-3b' 151936, with one tokenizer "
             "of 33 ids: the distillation compares the first 151936 ids and the teacher's logits for ids "
             "151936..152063 (padding rows no token maps to) are left out and the rest renormalized")
    assert check_distillable(tokenizer, tiny_tokenizer(), 151936, 151936, "a", "b") == SharedVocabulary(151936)


def test_an_embedding_smaller_than_the_tokenizer_is_refused():
    with pytest.raises(ValueError) as error:
        check_distillable(tiny_tokenizer(), tiny_tokenizer(), 64, 32, "teacher-x", "student-y")
    assert str(error.value) == (
        "Cannot distill teacher 'teacher-x' (64 embedding rows) into student 'student-y' (32 rows): their "
        "tokenizer makes ids up to 32, beyond the 32 rows of 'student-y', so that model cannot score every "
        "token. Pick a student from the teacher's family whose embedding covers the whole tokenizer.")


def _checkpoint(path, tokenizer, vocab_size: int, seed: int = 0) -> dict:
    """A tiny Llama saved like a zoo model; returns its model dict."""
    tiny_model("llama", vocab_size=vocab_size, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"name": path.name, "path": str(path), "family": "tiny", "precision": "fp32", "trust_remote_code": False}


def _full_run(model: dict) -> dict:
    """A finished full fine-tuning run of ``model`` (its checkpoint is the model itself)."""
    path = Path(model["path"])
    return {"name": f"{model['name']}+full[]", "method": "full", "precision": "fp32", "base_model": model,
            "dir": str(path.parent), "files": {"model": path.name}}


def test_teacher_pass_refuses_another_tokenizer_before_loading_the_teacher(tmp_path, monkeypatch):
    teacher = _checkpoint(tmp_path / "granite-8b", tiny_tokenizer(), 64)
    student = _checkpoint(tmp_path / "qwen-1.5b", _other_vocab_tokenizer(), 64)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the tokenizers were checked")

    monkeypatch.setattr("ftflow.models.loading.load_trained", no_teacher)
    with pytest.raises(ValueError) as error:
        teacher_topk_for_student(_full_run(teacher), student, SENTENCES, k=4, max_length=16, device="cpu",
                                 progress=False)
    for fragment in ("'granite-8b+full[]'", "'qwen-1.5b'", "vocabularies differ", "teacher's family"):
        assert fragment in str(error.value)


def test_teacher_pass_over_a_larger_teacher_embedding_uses_the_shared_ids(tmp_path):
    teacher = _checkpoint(tmp_path / "teacher", tiny_tokenizer(), 128)
    student = _checkpoint(tmp_path / "student", tiny_tokenizer(), 64, seed=1)

    topk = teacher_topk_for_student(_full_run(teacher), student, SENTENCES[:2], k=4, max_length=16, device="cpu",
                                    progress=False)

    assert (topk.teacher_rows, topk.vocab_size) == (128, 64)
    assert topk.vocabulary_note.startswith("teacher 'teacher+full[]' has 128 embedding rows and student 'student' 64")
    ids, _ = sentence_ids(tiny_tokenizer(), SENTENCES[0], 16)
    model = tiny_model("llama", vocab_size=128)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    expected_lp, expected_ids = torch.topk(F.log_softmax(logits[:, :64], dim=-1), 4, dim=-1)
    got_ids, got_lp = topk.for_sentence(0)
    assert torch.equal(got_ids.long(), expected_ids)
    torch.testing.assert_close(got_lp.float(), expected_lp, rtol=2e-3, atol=2e-3)


def test_distillation_run_refuses_a_student_with_another_tokenizer_before_training(tmp_path, monkeypatch):
    teacher_tokenizer = tiny_tokenizer()
    store = compute_teacher_topk(tiny_model(), teacher_tokenizer, SENTENCES, k=4, max_length=16, progress=False,
                                 teacher_name="granite-8b+lora[r8]")
    store.save(tmp_path / "topk")
    student = _checkpoint(tmp_path / "qwen-1.5b", _other_vocab_tokenizer(), 64)
    (job,) = distill_grid(DistillConfig(top_k=4), student)

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the tokenizers were checked")

    monkeypatch.setattr(training, "train_full", no_training)
    run = dict(train_sentences=SENTENCES, validation_sentences=SENTENCES[:2], test_sentences=SENTENCES[:2], seed=0,
               max_length=16, device="cpu", eval_batch_size=4, work_dir=tmp_path / "work", out_dir=tmp_path / "out",
               progress=False)
    with pytest.raises(ValueError) as error:
        run_job(job, teacher_topk_dir=tmp_path / "topk", **run)
    for fragment in ("'granite-8b+lora[r8]'", "'qwen-1.5b'", "vocabularies differ", "teacher's family"):
        assert fragment in str(error.value)

    # A store that does not record the teacher's tokenizer cannot be checked, so it is refused too.
    TeacherTopK(ids=store.ids, logprobs=store.logprobs, offsets=store.offsets).save(tmp_path / "bare")
    with pytest.raises(ValueError, match="do not record the teacher's tokenizer"):
        run_job(job, teacher_topk_dir=tmp_path / "bare", **run)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_trainer_alpha_zero_first_step_is_plain_cross_entropy(tmp_path):
    trainer, collator, dataset = _trainer(tmp_path, alpha=0.0, steps=1)
    batch = collator(dataset)
    with torch.no_grad():
        expected = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], labels=batch["labels"]).loss.item()

    trainer.train()

    first = next(log for log in trainer.state.log_history if "loss" in log)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_trainer_refuses_training_batches_without_top_k(tmp_path):
    trainer, _, dataset = _trainer(tmp_path, alpha=0.5, steps=1)
    trainer.train_dataset = [{"input_ids": item["input_ids"]} for item in dataset]

    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()
