"""Sparse knowledge distillation: the losses, the stored teacher targets, and Trainer glue.

The teacher (its best fine-tuned run, of any method) is run once over the
training split and a sparse view of its next-token distribution is stored on
disk per position (:class:`TeacherTopK`), in one of two variants with the same
number of ids per position, so they cost the same storage:

* ``topk``: its k most likely ids, their log-probs and the exact mass of the
  rest (one tail bucket); loss :func:`kd_loss`. Biased: the student is never
  told how the tail is shaped.
* ``sampled``: k ids drawn from the teacher's distribution (with replacement)
  and their log-probs, as in random-sampling distillation (Anshumann et al.,
  ACL 2025, "Sparse Logit Sampling"); loss :func:`sampled_kd_loss`. At T = 1
  the gradient is an unbiased estimate of the full-distribution KL's.

Every
student epoch and every student config then reuses them: the student never
needs the teacher in memory. Teacher and student must share a tokenizer; this
is checked before the teacher pass (:func:`teacher_topk_for_student`) and
before every distillation run (:func:`check_store_for_student`).

Alignment convention (shared with :mod:`ftflow.tokens`): a sentence encoded with
``sentence_ids`` to ``n`` ids owns ``n`` stored rows, one per input position.
Row ``t`` holds the teacher's prediction made AT position ``t`` (of token
``t + 1``), exactly like the logits, so the top-k get the same shift as the
logits in the loss. The last row predicts past the sentence and is never a
target; it is kept so that rows and input ids line up one to one.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, _decoder_states, _output_head, _OutputHead
from ftflow.tokens import (IGNORE_INDEX, pack_batch, pack_placements, packed_row_tokens, pad_batch, pad_token_id,
                           sentence_ids, start_token_id)

logger = logging.getLogger(__name__)

TOPK_FILE = "teacher_topk.safetensors"
META_FILE = "teacher_topk.json"
TOKENIZER_DIR = "teacher_tokenizer"
# 2: adds the float32 tail mass, the teacher's tokenizer and the shared vocabulary size.
# 3: adds the variant (topk or sampled) and the sampling seed.
FORMAT_VERSION = 3
VARIANTS = ("topk", "sampled")
"""What a teacher store holds per position: its top-k ids, or k ids sampled from it."""


# --------------------------------------------------------------------------- loss


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    teacher_tail_logmass: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Cross-entropy plus top-k KL(teacher_T || student_T), mean over scored tokens.

    ``loss = (1 - alpha) * CE + alpha * T**2 * KL``.

    Positions follow the transformers causal-LM convention: the logits and the
    teacher top-k at position ``t`` predict ``labels[t + 1]``; the shift is
    done here. A position is scored when its shifted label is not
    ``IGNORE_INDEX``; nothing at any other position (pads, junk logits, junk
    top-k) reaches the loss, because those positions are dropped before any
    arithmetic.

    KL, "top-k plus one tail bucket". The teacher is known at temperature 1 on
    its top-k ids (log-probs ``log p_i``) and by the total mass ``m_p`` of the
    other V - k ids (its tail). Tempering ``p^(1/T)`` needs every tail
    probability, which is not stored, so the tail is treated like this:

    * **The teacher's tail is given the student's tail shape**: each tail id j
      gets ``m_p * q_j / m_q``, where ``q = softmax(student_logits)`` (T = 1,
      full vocabulary) and ``m_q`` is the student's mass on those ids. This
      completes the teacher to a full-vocabulary distribution ``p_hat``, which
      is the teacher itself wherever it is known.
    * Both are then tempered over the FULL vocabulary, ``softmax(log p_hat / T)``
      and ``softmax(student_logits / T)``, and ``KL(p_hat_T || q_T)`` is taken.
      Because ``p_hat`` and ``q`` are proportional on the tail, so are their
      tempered versions, and this dense KL equals the KL over k + 1 buckets
      (the k ids and the tail summed), which is what is computed:
      teacher bucket log-weights ``log p_i / T`` and ``log m_p / T + a`` with
      ``a = log sum_tail (q_j / m_q)^(1/T)``, renormalized; student buckets
      ``log q_T`` at the k ids and ``log sum_tail q_T``.

    Consequences, for every T and k: KL = 0 when the student equals the
    teacher (then ``p_hat`` is the teacher); with k = V the tail is empty and
    the KL is exactly the dense ``KL(softmax(t / T) || softmax(s / T))``; and
    a free student's optimum is the teacher's own top-k probabilities and tail
    mass (tempering is one-to-one), so T changes the gradient's weighting, not
    the target. The teacher side (``a`` included) is a constant of the
    step: gradients flow only through the student's tempered distribution, as
    in dense distillation against a fixed target.

    Why this treatment: the student side is exactly the student tempered over
    the whole vocabulary, and the stored teacher data stay temperature-free,
    so one teacher pass serves every T of the grid. (Storing the teacher's
    tempered normalizer per T would be exact for the teacher but would rerun
    the teacher pass whenever a temperature is added; tempering the tail as
    if uniform, or as one token, for both would swap the student's own
    tempered tail for an assumed one.)

    Memory: besides the logits, the [N, V] float32 tensors kept for backward
    are the log-softmax and, at T != 1, its tempered copy (no more than a
    dense KL needs); the tail's sums run on transient copies.

    CE uses the raw logits (temperature 1). When no position is scored the
    three results are zeros still attached to the graph, so a batch of empty
    sentences does not crash a training step.

    Args:
        student_logits: [B, L, V] student logits (any float dtype; computed in float32).
        labels: [B, L] long, ``IGNORE_INDEX`` at non-targets (unshifted).
        topk_ids: [B, L, k] integer, the teacher's top-k token ids at each position (distinct per row).
        topk_logprobs: [B, L, k] float, the teacher's log-probs (temperature 1,
            normalized over the vocabulary) at those ids.
        alpha: weight of the KL term in [0, 1].
        temperature: softening temperature T > 0 applied to both distributions.
        teacher_tail_logmass: [B, L] float, ``log m_p``, the log of the
            teacher's mass outside ``topk_ids`` (``-inf`` for none), as
            :func:`compute_teacher_topk` stores it. None derives it as
            ``log(1 - sum exp(topk_logprobs))``, which float16-stored
            log-probs make imprecise when the tail is small.
        vocab_size: the vocabulary the KL is taken over: the student's first
            ``vocab_size`` logits, the range shared with the teacher (see
            :func:`check_distillable`); None uses all V. CE always uses all V.

    Returns:
        ``{"loss", "ce", "kl"}``, float32 scalars.
    """
    _check_kd_inputs(student_logits, labels, topk_ids, topk_logprobs, alpha, temperature, teacher_tail_logmass,
                     vocab_size)
    kl_vocab = student_logits.shape[-1] if vocab_size is None else vocab_size

    # Position t predicts labels[t + 1]: drop the last position / first label,
    # then keep only scored positions so pads cannot leak into any sum.
    shifted_labels = labels[:, 1:]
    scored = shifted_labels != IGNORE_INDEX
    logits = student_logits[:, :-1][scored].float()  # [N, V]
    targets = shifted_labels[scored]  # [N]
    teacher_ids = topk_ids[:, :-1][scored].long()  # [N, k]
    teacher_lp = topk_logprobs[:, :-1][scored].float()  # [N, k]

    if targets.numel() == 0:
        zero = student_logits.sum() * 0.0
        return {"loss": zero.float(), "ce": zero.float(), "kl": zero.float()}
    if int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= kl_vocab:
        raise ValueError(
            f"teacher top-k ids fall outside the student's vocabulary [0, {kl_vocab}): "
            f"min {int(teacher_ids.min())}, max {int(teacher_ids.max())}; teacher and student must share a vocabulary"
        )
    if teacher_tail_logmass is None:
        # 1 - M via expm1 keeps what precision there is when M is close to 1; M >= 1 means no tail.
        teacher_tail = -torch.expm1(torch.logsumexp(teacher_lp, dim=-1))  # [N]
        teacher_log_tail = torch.where(teacher_tail > 0, teacher_tail.clamp(min=torch.finfo(torch.float32).tiny).log(),
                                       torch.full_like(teacher_tail, -math.inf))
    else:
        teacher_log_tail = teacher_tail_logmass[:, :-1][scored].float()  # [N]

    # One log-softmax serves CE and, at T = 1 over the whole vocabulary, the KL: [N, V] float32 tensors
    # are the largest in the step (a 150k vocabulary makes each one 0.6 MB per scored token).
    log_q1 = F.log_softmax(logits, dim=-1)  # [N, V]
    ce = F.nll_loss(log_q1, targets)
    if kl_vocab != logits.shape[-1]:
        log_q1 = F.log_softmax(logits[:, :kl_vocab], dim=-1)
    log_qt = log_q1 if temperature == 1.0 else F.log_softmax(log_q1 / temperature, dim=-1)  # [N, V'] student at T

    student_top = log_qt.gather(-1, teacher_ids)  # [N, k]
    # The tail summed directly (not as 1 - top-k mass) stays exact however little mass it has.
    student_tail = _TailLogSumExp.apply(log_qt, teacher_ids)  # [N], -inf when k = V'
    with torch.no_grad():
        # a = log sum_tail (q_j / m_q)^(1/T): the tail's tempered weight per unit of T = 1 mass.
        if temperature == 1.0:
            shape = torch.zeros_like(student_tail)
        else:
            tail_lp = log_q1.scatter(-1, teacher_ids, -math.inf)  # [N, V'], freed below
            log_mq = torch.logsumexp(tail_lp, dim=-1, keepdim=True)  # [N, 1]
            shape = torch.logsumexp(tail_lp.sub_(log_mq).div_(temperature), dim=-1)  # [N]
            del tail_lp
        has_tail = torch.isfinite(student_tail) & torch.isfinite(teacher_log_tail)
        teacher_tail_weight = torch.where(has_tail, teacher_log_tail / temperature + shape,
                                          torch.full_like(shape, -math.inf))
        teacher_buckets = F.log_softmax(torch.cat([teacher_lp / temperature, teacher_tail_weight[:, None]], dim=-1),
                                        dim=-1)  # [N, k + 1]
        teacher_probs = teacher_buckets.exp()
    student_buckets = torch.cat([student_top, student_tail[:, None]], dim=-1)  # [N, k + 1]
    # An empty bucket (p = 0) contributes 0, whatever the student puts there.
    terms = torch.where(teacher_probs > 0, teacher_probs * (teacher_buckets - student_buckets),
                        torch.zeros_like(teacher_probs))
    kl = terms.sum(dim=-1).mean()

    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def sampled_kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_logprobs: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Cross-entropy plus random-sampling KD (Anshumann et al., ACL 2025), mean over scored tokens.

    ``loss = (1 - alpha) * CE + alpha * T**2 * KL(pi || student_T)``.

    At each position the store holds ``k`` ids drawn with replacement from
    the teacher's distribution ``p`` (temperature 1) and their log-probs
    ``log p(x_i)``. They define a sparse target ``pi`` over the drawn ids:
    draw i weighs ``w_i`` (repeated draws add up), with

    * T = 1: ``w_i = 1 / k``, so ``pi`` is the empirical distribution of the
      draws and ``E[pi] = p`` exactly. The loss's gradient with respect to
      the student's logits is ``softmax(s) - pi``, whose expectation is
      ``softmax(s) - p``: the gradient of the full-vocabulary KL(p || q). This
      is the method's point: an unbiased estimate of full distillation from
      ``k`` stored ids, where the top-k's tail bucket is biased.
    * T != 1: self-normalized importance weights for the tempered teacher
      ``p_T ∝ p^(1/T)`` with proposal ``p``: ``w_i ∝ p(x_i)^(1/T - 1)``,
      normalized over the k draws. Consistent (the bias vanishes as k grows),
      not exactly unbiased; the stored data stay temperature-free, so one
      teacher pass serves every T of the grid.

    The student side is the student tempered over the full (shared)
    vocabulary, ``log_softmax(s / T)``, read at the drawn ids: probability
    the student puts on ids never drawn is penalized through the
    normalization, as in dense distillation. ``KL(pi || q_T) =
    sum_u pi_u (log pi_u - log q_T(u))`` over the distinct drawn ids ``u``;
    it is 0 only when the student equals ``pi``, so (unlike the top-k loss)
    it is not 0 for a student equal to the teacher: the stored sample is a
    noisy target whose gradient is right on average.

    Positions follow :func:`kd_loss`: the logits and the draws at position
    ``t`` predict ``labels[t + 1]``; only scored positions reach any sum.

    Args:
        student_logits: [B, L, V] student logits (computed in float32).
        labels: [B, L] long, ``IGNORE_INDEX`` at non-targets (unshifted).
        sample_ids: [B, L, k] integer, ids drawn from the teacher at each position (repeats allowed).
        sample_logprobs: [B, L, k] float, the teacher's log-probs (T = 1) at those ids.
        alpha: weight of the KL term in [0, 1].
        temperature: softening temperature T > 0.
        vocab_size: the KL's vocabulary (the student's first ``vocab_size``
            logits, shared with the teacher); None uses all V. CE uses all V.

    Returns:
        ``{"loss", "ce", "kl"}``, float32 scalars.
    """
    _check_kd_inputs(student_logits, labels, sample_ids, sample_logprobs, alpha, temperature, None, vocab_size)
    kl_vocab = student_logits.shape[-1] if vocab_size is None else vocab_size
    shifted_labels = labels[:, 1:]
    scored = shifted_labels != IGNORE_INDEX
    logits = student_logits[:, :-1][scored].float()  # [N, V]
    targets = shifted_labels[scored]  # [N]
    drawn = sample_ids[:, :-1][scored].long()  # [N, k]
    drawn_lp = sample_logprobs[:, :-1][scored].float()  # [N, k]
    if targets.numel() == 0:
        zero = student_logits.sum() * 0.0
        return {"loss": zero.float(), "ce": zero.float(), "kl": zero.float()}
    if int(drawn.min()) < 0 or int(drawn.max()) >= kl_vocab:
        raise ValueError(
            f"sampled teacher ids fall outside the student's vocabulary [0, {kl_vocab}): min {int(drawn.min())}, "
            f"max {int(drawn.max())}; teacher and student must share a vocabulary"
        )
    log_q1 = F.log_softmax(logits, dim=-1)  # [N, V]
    ce = F.nll_loss(log_q1, targets)
    if kl_vocab != logits.shape[-1]:
        log_q1 = F.log_softmax(logits[:, :kl_vocab], dim=-1)
    log_qt = log_q1 if temperature == 1.0 else F.log_softmax(log_q1 / temperature, dim=-1)  # [N, V']
    student_at_draws = log_qt.gather(-1, drawn)  # [N, k]
    with torch.no_grad():
        if temperature == 1.0:
            weights = torch.full_like(drawn_lp, 1.0 / drawn_lp.shape[-1])
        else:
            weights = torch.softmax(drawn_lp * (1.0 / temperature - 1.0), dim=-1)  # [N, k]
        # pi at each draw's id: the weights of every draw of that id ([N, k, k] is small: k ids a position).
        same = drawn[:, :, None] == drawn[:, None, :]
        target_at_draws = (same * weights[:, None, :]).sum(-1)  # [N, k]
        entropy_part = (weights * target_at_draws.log()).sum(-1)  # [N]: sum_u pi_u log pi_u
    kl = (entropy_part - (weights * student_at_draws).sum(-1)).mean()
    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def distillation_loss(variant: str, student_logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                      logprobs: torch.Tensor, *, alpha: float, temperature: float,
                      teacher_tail_logmass: torch.Tensor | None = None,
                      vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The loss of a store's ``variant``: :func:`kd_loss` (``topk``) or :func:`sampled_kd_loss` (``sampled``)."""
    if variant == "topk":
        return kd_loss(student_logits, labels, ids, logprobs, alpha=alpha, temperature=temperature,
                       teacher_tail_logmass=teacher_tail_logmass, vocab_size=vocab_size)
    if variant == "sampled":
        return sampled_kd_loss(student_logits, labels, ids, logprobs, alpha=alpha, temperature=temperature,
                               vocab_size=vocab_size)
    raise ValueError(f"distillation variant must be one of {VARIANTS}, got {variant!r}")


class _TailLogSumExp(torch.autograd.Function):
    """``logsumexp`` of each row of ``log_probs`` outside ``ids``: the log-mass of the tail.

    Same values and gradient as ``logsumexp(log_probs.scatter(-1, ids, -inf))``,
    but keeps for backward only ``log_probs`` (which the log-softmax that made
    it keeps anyway) and ``ids``, instead of another [N, V] float32 copy.
    """

    @staticmethod
    def forward(ctx, log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.logsumexp(log_probs.scatter(-1, ids, -math.inf), dim=-1)  # [N]
        ctx.save_for_backward(log_probs, ids, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        log_probs, ids, out = ctx.saved_tensors
        # d out / d x_j = exp(x_j - out) on the tail, 0 on the ids (and everywhere when the tail is empty).
        finite_out = torch.where(torch.isfinite(out), out, torch.zeros_like(out))
        grad = torch.exp(log_probs - finite_out[:, None]).scatter_(-1, ids, 0.0)
        grad = torch.where(torch.isfinite(out)[:, None], grad, torch.zeros_like(grad))
        return grad.mul_(grad_out[:, None]), None


def _check_kd_inputs(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    alpha: float,
    temperature: float,
    teacher_tail_logmass: torch.Tensor | None,
    vocab_size: int | None,
) -> None:
    """Collect every shape/value problem of kd_loss's inputs and raise them at once."""
    problems = []
    if student_logits.dim() != 3:
        problems.append(f"student_logits must be [B, L, V], got shape {tuple(student_logits.shape)}")
    else:
        batch_length = tuple(student_logits.shape[:2])
        if tuple(labels.shape) != batch_length:
            problems.append(f"labels shape {tuple(labels.shape)} != logits' [B, L] {batch_length}")
        if topk_ids.dim() != 3 or tuple(topk_ids.shape[:2]) != batch_length:
            problems.append(f"topk_ids must be [B, L, k] with [B, L] = {batch_length}, got {tuple(topk_ids.shape)}")
        if tuple(topk_logprobs.shape) != tuple(topk_ids.shape):
            problems.append(f"topk_logprobs shape {tuple(topk_logprobs.shape)} != topk_ids {tuple(topk_ids.shape)}")
        if topk_ids.dim() == 3 and topk_ids.shape[-1] < 1:
            problems.append("k must be at least 1")
        if teacher_tail_logmass is not None and tuple(teacher_tail_logmass.shape) != batch_length:
            problems.append(f"teacher_tail_logmass shape {tuple(teacher_tail_logmass.shape)} != logits' [B, L] "
                            f"{batch_length}")
        if vocab_size is not None and not 1 <= vocab_size <= student_logits.shape[-1]:
            problems.append(f"vocab_size must be in [1, {student_logits.shape[-1]}] (the student's logits), "
                            f"got {vocab_size}")
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        problems.append(f"temperature must be > 0, got {temperature}")
    if problems:
        raise ValueError("kd_loss: " + "; ".join(problems))


# ------------------------------------------------------------- teacher top-k store


@dataclass
class TeacherTopK:
    """The teacher's sparse targets for a list of sentences, ragged and stored flat.

    Sentence ``i`` owns rows ``offsets[i]:offsets[i + 1]``, one per input
    position (see the module docstring for the alignment). ``variant``
    ``topk``: each row holds the top-k sorted by descending log-prob, so
    keeping its first ``k'`` columns is the top-k'. ``sampled``: each row
    holds k independent draws from the teacher, in draw order, so its first
    ``k'`` columns are a sample of k' draws; no tail is stored.

    Besides the top-k, each row keeps the log of the teacher's exact mass
    outside them (float32, one number per position): ``1 - sum p_topk`` from
    float16 log-probs loses the tail when it is small, and :func:`kd_loss`
    tempers that tail. The teacher's tokenizer travels with the store, so a
    distillation run can check that its student shares it.

    Attributes:
        ids: [P, k] int32 token ids, P = total positions over all sentences.
        logprobs: [P, k] float16 log-probs (temperature 1, normalized over the
            ``vocab_size`` ids).
        offsets: [N + 1] int64 row offsets, N = number of sentences.
        tail_logmass: [P] float32 log of the mass outside the stored top-k
            (``-inf`` when k covers the vocabulary); None when unknown
            (:meth:`tail_for_sentence` then derives it from the top-k).
        tokenizer: the teacher's tokenizer (required to save and to distill).
        teacher_name: the teacher's name, for messages and the manifest.
        teacher_rows: rows of the teacher's embedding (its logits' width).
        vocab_size: ids the log-probs are normalized over: the range shared
            with the student (``<= teacher_rows``; see :func:`check_distillable`).
        vocabulary_note: why the teacher's logits were cut to ``vocab_size``, or None.
        variant: ``topk`` or ``sampled`` (:data:`VARIANTS`).
        sample_seed: the seed of the draws (``sampled`` only).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    offsets: torch.Tensor
    tail_logmass: torch.Tensor | None = None
    tokenizer: Any = None
    teacher_name: str | None = None
    teacher_rows: int | None = None
    vocab_size: int | None = None
    vocabulary_note: str | None = None
    variant: str = "topk"
    sample_seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        elif self.variant == "sampled" and self.tail_logmass is not None:
            problems.append("a sampled store has no tail mass (tail_logmass must be None)")
        if self.ids.dim() != 2 or self.ids.dtype != torch.int32:
            problems.append(f"ids must be a 2-D int32 tensor, got {self.ids.dtype} {tuple(self.ids.shape)}")
        if self.logprobs.dtype != torch.float16 or tuple(self.logprobs.shape) != tuple(self.ids.shape):
            problems.append(
                f"logprobs must be float16 with the shape of ids {tuple(self.ids.shape)}, "
                f"got {self.logprobs.dtype} {tuple(self.logprobs.shape)}"
            )
        if self.tail_logmass is not None and (self.tail_logmass.dtype != torch.float32
                                              or tuple(self.tail_logmass.shape) != tuple(self.ids.shape[:1])):
            problems.append(f"tail_logmass must be float32 of shape [P] = {tuple(self.ids.shape[:1])}, got "
                            f"{self.tail_logmass.dtype} {tuple(self.tail_logmass.shape)}")
        if self.offsets.dim() != 1 or self.offsets.dtype != torch.int64 or self.offsets.numel() < 1:
            problems.append(f"offsets must be a non-empty 1-D int64 tensor, got {self.offsets.dtype} "
                            f"{tuple(self.offsets.shape)}")
        elif self.ids.dim() == 2:
            if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.ids.shape[0]:
                problems.append(f"offsets must run from 0 to the number of rows {self.ids.shape[0]}, got "
                                f"{int(self.offsets[0])}..{int(self.offsets[-1])}")
            if bool((self.offsets[1:] < self.offsets[:-1]).any()):
                problems.append("offsets must be non-decreasing")
        if problems:
            raise ValueError("TeacherTopK: " + "; ".join(problems))

    @property
    def k(self) -> int:
        """Log-probs stored per position."""
        return int(self.ids.shape[1])

    @property
    def n_sentences(self) -> int:
        """Number of sentences N."""
        return int(self.offsets.numel() - 1)

    @property
    def positions(self) -> int:
        """Total rows P over all sentences."""
        return int(self.ids.shape[0])

    def rows(self, i: int) -> int:
        """Number of stored rows (= input ids) of sentence ``i``."""
        self._check_index(i)
        return int(self.offsets[i + 1] - self.offsets[i])

    def for_sentence(self, i: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of sentence ``i``, optionally cut to its best ``k`` entries.

        Args:
            i: sentence index in [0, N).
            k: keep this many entries per row (<= stored k); None keeps all.

        Returns:
            ``(ids, logprobs)``: [n_i, k] int32 and [n_i, k] float16 views.
        """
        self._check_index(i)
        k = self._check_k(k)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[start:end, :k], self.logprobs[start:end, :k]

    def tail_for_sentence(self, i: int, k: int | None = None) -> torch.Tensor | None:
        """Log of the teacher's mass outside the best ``k`` entries, at each row of sentence ``i``.

        The mass outside the top-k' is the stored tail plus entries k'..k:
        summed, never subtracted from 1, so it keeps its precision.

        Returns:
            [n_i] float32 (``-inf`` where nothing is left), or None when the
            store has no tail (:func:`kd_loss` then derives it from the top-k).
        """
        self._check_index(i)
        k = self._check_k(k)
        if self.tail_logmass is None:
            return None
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        tail = self.tail_logmass[start:end]
        if k == self.k:
            return tail
        dropped = torch.logsumexp(self.logprobs[start:end, k:].float(), dim=-1)
        return torch.logaddexp(tail, dropped)

    def save(self, directory: Path) -> None:
        """Write the tensors, a JSON meta and (when known) the teacher's tokenizer into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"ids": self.ids.contiguous(), "logprobs": self.logprobs.contiguous(),
                   "offsets": self.offsets.contiguous()}
        if self.tail_logmass is not None:
            tensors["tail_logmass"] = self.tail_logmass.contiguous()
        save_file(tensors, str(directory / TOPK_FILE))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        meta = {
            "format_version": FORMAT_VERSION,
            "k": self.k,
            "n_sentences": self.n_sentences,
            "positions": self.positions,
            "ids_dtype": "int32",
            "logprobs_dtype": "float16",
            "offsets_dtype": "int64",
            "tail_logmass": ("float32, log of the teacher's mass outside the stored top-k at each row"
                             if self.tail_logmass is not None else None),
            "alignment": "one row per input id; row t is the prediction made at position t (of token t+1); "
                         + ("rows sorted by descending log-prob" if self.variant == "topk"
                            else "rows hold independent draws from the teacher, in draw order"),
            "variant": self.variant,
            "sample_seed": self.sample_seed,
            "teacher": self.teacher_name,
            "teacher_tokenizer": TOKENIZER_DIR if self.tokenizer is not None else None,
            "teacher_rows": self.teacher_rows,
            "vocab_size": self.vocab_size,
            "vocabulary_note": self.vocabulary_note,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TeacherTopK":
        """Read what :meth:`save` wrote, checking the tensors against the JSON meta."""
        directory = Path(directory)
        missing = [name for name in (TOPK_FILE, META_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"teacher top-k directory {directory} lacks {missing}; recompute the teacher top-k")
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"teacher top-k in {directory} have format {meta.get('format_version')}, this ftflow "
                             f"reads format {FORMAT_VERSION}; recompute the teacher top-k")
        tensors = load_file(str(directory / TOPK_FILE))
        tokenizer = None
        if meta.get("teacher_tokenizer"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory / meta["teacher_tokenizer"]))
        topk = cls(ids=tensors["ids"], logprobs=tensors["logprobs"], offsets=tensors["offsets"],
                   tail_logmass=tensors.get("tail_logmass"), tokenizer=tokenizer, teacher_name=meta.get("teacher"),
                   teacher_rows=meta.get("teacher_rows"), vocab_size=meta.get("vocab_size"),
                   vocabulary_note=meta.get("vocabulary_note"), variant=meta["variant"],
                   sample_seed=meta.get("sample_seed"))
        found = {"k": topk.k, "n_sentences": topk.n_sentences, "positions": topk.positions}
        mismatched = {key: (meta.get(key), value) for key, value in found.items() if meta.get(key) != value}
        if mismatched:
            raise ValueError(f"teacher top-k in {directory} do not match their meta (meta, tensors): {mismatched}")
        return topk

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.n_sentences:
            raise IndexError(f"sentence index {i} out of range for {self.n_sentences} sentences")

    def _check_k(self, k: int | None) -> int:
        if k is None:
            return self.k
        if not 1 <= k <= self.k:
            raise ValueError(f"k must be in [1, {self.k}] (the stored top-k), got {k}")
        return k


def compute_teacher_topk(
    model,
    tokenizer,
    sentences: Sequence[str],
    *,
    k: int,
    max_length: int,
    batch_size: int = 8,
    progress: bool = True,
    vocab_size: int | None = None,
    teacher_name: str | None = None,
    vocabulary_note: str | None = None,
    variant: str = "topk",
    seed: int = 0,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
) -> TeacherTopK:
    """Run the teacher once over ``sentences`` and keep k ids and log-probs per position.

    Sentences are encoded with ``sentence_ids`` (as the student will be
    trained), grouped into length-sorted batches so little compute goes to
    pads, and right-padded with ``pad_batch``. Log-softmax is taken in float32
    over the first ``vocab_size`` logits. ``topk``: the top-k, sorted
    descending, and the exact log-mass of the other ids (float32).
    ``sampled``: k ids drawn with replacement from the teacher's distribution
    (inverse CDF on float64 cumulative probabilities, with uniforms from a CPU
    generator seeded by ``seed`` and the sentence's index, so the draws do not
    depend on the batching or the device), and their log-probs.

    Memory: the [B, L, V] logits are never made. As perplexity scoring does
    (:func:`ftflow.perplexity.batch_nll`), the forward runs without a KV cache
    and with ``logits_to_keep=1`` while a hook keeps the decoder's last hidden
    state; the LM head (and the forward's own logit scaling, e.g. Granite's
    ``logits_scaling``) is applied to ``logits_chunk_tokens`` positions at a
    time, each chunk's log-softmax, top-k (or draws) and tail taken before the
    next and its results moved to the CPU. The results are the full-logits
    path's, up to the LM head's float rounding on other row counts
    (:func:`ftflow.memory.predict_teacher_pass` predicts the peak).

    This does not check a student: :func:`teacher_topk_for_student` does,
    before it calls this.

    Args:
        model: the teacher causal LM (a PEFT-wrapped model works too). Put in
            eval mode for the call (dropout would make the targets random) and
            restored afterwards.
        tokenizer: the tokenizer shared by teacher and student.
        sentences: the N training sentences, in dataset order.
        k: log-probs kept per position (1 <= k <= vocab_size).
        max_length: tokens kept per sentence, start token included.
        batch_size: sentences per forward pass.
        progress: show a tqdm bar.
        vocab_size: normalize over the first ``vocab_size`` ids only (the
            range shared with a student whose embedding has fewer rows); None
            uses every row of the teacher's output embedding.
        teacher_name: recorded in the store; defaults to the tokenizer's name_or_path.
        vocabulary_note: why ``vocab_size`` cuts the teacher's logits, recorded in the store.
        variant: ``topk`` or ``sampled`` (:data:`VARIANTS`).
        seed: seed of the draws (``sampled``).
        logits_chunk_tokens: positions whose logits exist at once; 0 takes the
            model's full [B, L, V] logits (as does a model without a separable
            LM head, see :func:`ftflow.perplexity.batch_nll`).

    Returns:
        A :class:`TeacherTopK` with ``len(sentence_ids(...))`` rows per sentence.

    Raises:
        ftflow.perplexity.LogitsMismatchError: the model's forward transforms its logits in a way the chunks
            would not reproduce (set ``logits_chunk_tokens`` to 0).
    """
    problems = []
    if k < 1:
        problems.append(f"k must be at least 1, got {k}")
    if variant not in VARIANTS:
        problems.append(f"variant must be one of {VARIANTS}, got {variant!r}")
    if batch_size < 1:
        problems.append(f"batch_size must be at least 1, got {batch_size}")
    if logits_chunk_tokens < 0:
        problems.append(f"logits_chunk_tokens must be >= 0 (0: full logits), got {logits_chunk_tokens}")
    if problems:
        raise ValueError("compute_teacher_topk: " + "; ".join(problems))
    teacher_rows = output_rows(model)
    if vocab_size is None:
        vocab_size = teacher_rows
    if not 1 <= vocab_size <= teacher_rows:
        raise ValueError(f"vocab_size must be in [1, {teacher_rows}] (the teacher's output rows), got {vocab_size}")
    if k > vocab_size and variant == "topk":
        raise ValueError(f"k={k} exceeds the teacher's vocabulary size {vocab_size}")
    encoded = [sentence_ids(tokenizer, text, max_length) for text in sentences]
    truncated = sum(cut for _, cut in encoded)
    if truncated:
        logger.warning("teacher top-k: %d of %d sentences cut to max_length=%d tokens", truncated, len(encoded), max_length)
    all_ids = [ids for ids, _ in encoded]
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    parts = _output_head(model) if logits_chunk_tokens > 0 else None

    # Per sentence, its rows' (ids, log-probs, tail) in pieces (a sentence may span two chunks), on the CPU.
    per_sentence: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in all_ids]
    draws = _SentenceUniforms(k, seed)
    # Longest first: the biggest batch runs first, so an out-of-memory shows at once.
    order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]), reverse=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(all_ids), desc="teacher top-k", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                batch_indices = order[start:start + batch_size]
                batch = pad_batch([all_ids[i] for i in batch_indices], pad_id, padding_side="right")
                inputs = {name: batch[name].to(device) for name in ("input_ids", "attention_mask", "position_ids")}
                lengths = [len(all_ids[i]) for i in batch_indices]
                for log_probs, segments in _teacher_log_probs(model, parts, inputs, lengths, vocab_size,
                                                              logits_chunk_tokens):
                    if variant == "sampled":
                        uniforms = torch.cat([draws.rows(batch_indices[row], lengths[row], first, count)
                                              for row, first, count in segments]).to(log_probs.device)
                        ids = _draw_with(log_probs, uniforms)
                        values, tail = log_probs.gather(-1, ids), torch.zeros(ids.shape[0])
                    else:
                        values, ids = torch.topk(log_probs, k, dim=-1, sorted=True)
                        # Summed over the other ids, not 1 - top-k mass: exact however small the tail is.
                        tail = torch.logsumexp(log_probs.scatter_(-1, ids, -math.inf), dim=-1)  # [c]
                    del log_probs
                    # -inf (a masked vocabulary slot) would not survive float16 arithmetic as a finite number.
                    values = values.clamp(min=torch.finfo(torch.float16).min)
                    ids, values, tail = ids.to("cpu", torch.int32), values.to("cpu", torch.float16), tail.to(
                        "cpu", torch.float32)
                    offset = 0
                    for row, _, count in segments:
                        piece = slice(offset, offset + count)
                        per_sentence[batch_indices[row]].append((ids[piece], values[piece], tail[piece]))
                        offset += count
                bar.update(len(batch_indices))
    finally:
        model.train(was_training)

    lengths = torch.tensor([len(ids) for ids in all_ids], dtype=torch.int64)
    offsets = torch.zeros(len(all_ids) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    pieces = [piece for sentence in per_sentence for piece in sentence]
    if pieces:
        ids, logprobs, tails = (torch.cat([piece[j] for piece in pieces]) for j in range(3))
    else:
        ids = torch.zeros((0, k), dtype=torch.int32)
        logprobs = torch.zeros((0, k), dtype=torch.float16)
        tails = torch.zeros((0,), dtype=torch.float32)
    return TeacherTopK(ids=ids, logprobs=logprobs, offsets=offsets,
                       tail_logmass=tails if variant == "topk" else None, tokenizer=tokenizer,
                       teacher_name=teacher_name or getattr(tokenizer, "name_or_path", None),
                       teacher_rows=teacher_rows, vocab_size=vocab_size, vocabulary_note=vocabulary_note,
                       variant=variant, sample_seed=seed if variant == "sampled" else None)


def _teacher_log_probs(model, parts: _OutputHead | None, inputs: dict[str, torch.Tensor], lengths: Sequence[int],
                       vocab_size: int, logits_chunk_tokens: int):
    """The teacher's float32 log-softmax over its first ``vocab_size`` logits at every real position of a batch.

    Yields ``(log_probs, segments)``: [c, vocab_size] rows, and which positions they are, in order, as
    ``(row, first position, count)`` triples summing to c. With ``parts`` (chunked): the decoder's hidden states
    of the real positions, row after row, ``logits_chunk_tokens`` at a time through the LM head. Without: the
    forward's full [B, L, V] logits, one row at a time (a float32 copy of all of them would dwarf the model).
    """
    if parts is None:
        logits = model(**inputs, use_cache=False).logits  # [B, L, V]
        _check_width(logits, vocab_size)
        for row, n in enumerate(lengths):
            yield F.log_softmax(logits[row, :n, :vocab_size].float(), dim=-1), [(row, 0, n)]
        return
    hidden = _decoder_states(model, parts, inputs)  # [B, L, H]
    # Right-padded: each row's first n positions are real; boolean indexing takes them row after row.
    states = hidden[inputs["attention_mask"].bool()]  # [P, H]
    del hidden
    for start in range(0, states.shape[0], logits_chunk_tokens):
        end = min(start + logits_chunk_tokens, states.shape[0])
        logits = parts.transform(parts.head(states[start:end]))  # [c, V] in the model's dtype
        _check_width(logits, vocab_size)
        # Rebound to its float32 copy, the head's own-dtype output is freed before the log-softmax allocates.
        logits = logits[:, :vocab_size].float()
        log_probs = F.log_softmax(logits, dim=-1)
        del logits
        yield log_probs, _segments(lengths, start, end)
        del log_probs  # before the next chunk's logits exist (the caller has dropped its reference too)


def _segments(lengths: Sequence[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """Positions ``start:end`` of rows of ``lengths`` laid end to end, as ``(row, first position, count)``."""
    segments, row_start = [], 0
    for row, n in enumerate(lengths):
        first, last = max(start, row_start), min(end, row_start + n)
        if first < last:
            segments.append((row, first - row_start, last - first))
        row_start += n
    return segments


def _check_width(logits: torch.Tensor, vocab_size: int) -> None:
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"the teacher's logits have {logits.shape[-1]} columns, fewer than its vocab_size {vocab_size}")


class _SentenceUniforms:
    """Each sentence's [n, k] float64 uniforms for its draws, from a CPU generator seeded by (seed, sentence index).

    A sentence's uniforms are made once, whatever rows of it a chunk needs, and dropped after its last row.
    """

    def __init__(self, k: int, seed: int) -> None:
        self.k, self.seed = k, seed
        self.current: tuple[int, torch.Tensor] | None = None

    def rows(self, sentence_index: int, n: int, first: int, count: int) -> torch.Tensor:
        if self.current is None or self.current[0] != sentence_index:
            self.current = (sentence_index, _sentence_uniforms(n, self.k, self.seed, sentence_index))
        part = self.current[1][first:first + count]
        if first + count == n:
            self.current = None
        return part


def _sentence_uniforms(rows: int, k: int, seed: int, sentence_index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sentence_index)
    return torch.rand((rows, k), generator=generator, dtype=torch.float64)


def _draw(log_probs: torch.Tensor, k: int, seed: int, sentence_index: int) -> torch.Tensor:
    """[n, k] long: k ids per row drawn with replacement from ``softmax`` rows of one sentence's ``log_probs`` [n, V].

    The uniforms come from a CPU generator (seed, sentence index), so a sentence's draws are the same whatever
    the batch or the device (:func:`_draw_with` draws them).
    """
    uniforms = _sentence_uniforms(log_probs.shape[0], k, seed, sentence_index).to(log_probs.device)
    return _draw_with(log_probs, uniforms)


def _draw_with(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[n, k] long: the inverse CDF of each row of ``softmax(log_probs)`` [n, V] at its float64 ``uniforms`` [n, k].

    The cumulative sum runs in float64, so a 150k vocabulary's last ids keep their mass, over chunks of rows
    of at most :data:`DRAW_CHUNK_ELEMENTS` (256 MB), so a chunk of 1024 positions at a 150k vocabulary never
    holds a 1.2 GB float64 copy. Each row's result depends on that row alone.
    """
    rows, vocab = log_probs.shape
    ids = torch.empty(uniforms.shape, dtype=torch.long, device=log_probs.device)
    step = max(1, DRAW_CHUNK_ELEMENTS // vocab)
    for start in range(0, rows, step):
        cdf = log_probs[start:start + step].double().exp_().cumsum_(-1)  # [chunk, V]
        cdf.div_(cdf[:, -1:].clone())
        ids[start:start + step] = torch.searchsorted(cdf, uniforms[start:start + step], right=True)
        del cdf
    return ids.clamp_(max=vocab - 1)


DRAW_CHUNK_ELEMENTS = 1 << 25
"""Elements of the float64 cumulative sums :func:`_draw_with` holds at once (256 MB)."""


def output_rows(model) -> int:
    """Rows of a causal LM's output embedding: the width of its logits."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


# ---------------------------------------------------------------- Trainer glue


class DistillationCollator:
    """Batch ``{"input_ids", "sentence_index"}`` items with their teacher top-k.

    The Trainer must keep the ``sentence_index`` column: use
    ``remove_unused_columns=False``. Items with no ``sentence_index`` at all
    (e.g. a validation split, which has no teacher top-k) give a plain
    batch; :class:`DistillationTrainer` scores those with plain
    cross-entropy in evaluation and refuses them in training.

    Packed (``packed=True``, see :func:`ftflow.training.batching_for`): the
    sentences are packed into rows (:func:`ftflow.tokens.pack_batch`, as
    :class:`ftflow.training.PackCollator` does) and each sentence's teacher
    top-k rows are written at the same columns, so position t of a row holds
    the teacher's top-k of the token at t. A sentence's last position (whose
    next label is the next sentence's start token or a pad, ``IGNORE_INDEX``)
    and the pad segments are never read, as at pads.

    Args:
        pad_id: id written into pad slots (``ftflow.tokens.pad_token_id``).
        topk: the stored teacher top-k of the training sentences.
        k: entries per position to use (<= stored k); None uses all.
        packed: pack the batch instead of right-padding it.
        one_row: packed only: every sentence in one row (flash attention's varlen path).
    """

    def __init__(self, pad_id: int, topk: TeacherTopK, k: int | None = None, packed: bool = False,
                 one_row: bool = False) -> None:
        self.pad_id = pad_id
        self.topk = topk
        self.k = topk._check_k(k)
        self.packed = packed
        self.one_row = one_row
        self.batching = "packed" if packed else "padded"

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad (right side) or pack a batch and attach the aligned teacher top-k.

        Returns:
            Padded: ``pad_batch``'s ``input_ids``, ``attention_mask``,
            ``position_ids``, ``labels`` ([B, L] long) plus, when the items
            have a ``sentence_index``, ``topk_ids`` [B, L, k] long,
            ``topk_logprobs`` [B, L, k] float32 and, when the store has it,
            ``teacher_tail_logmass`` [B, L] float32 (the log-mass outside
            these k). Pad rows hold id 0, log(1/k) and log(1/2): finite, and
            never read because their labels are ignored. Packed: the same keys
            with B the packed rows and L the longest row's tokens, no
            ``attention_mask`` and ``use_cache`` False (:func:`ftflow.tokens.pack_batch`).
        """
        if any("input_ids" not in item for item in items):
            raise ValueError("DistillationCollator: every item needs 'input_ids'")
        batch_ids = [list(item["input_ids"]) for item in items]
        lengths = [len(ids) for ids in batch_ids]
        if self.packed:
            # The row budget ftflow.training.PackCollator packs with.
            row_tokens = None if self.one_row else packed_row_tokens(lengths)
            batch = pack_batch(batch_ids, self.pad_id, row_tokens)
            placements = pack_placements(lengths, row_tokens)
        else:
            batch = pad_batch(batch_ids, self.pad_id, padding_side="right")
            placements = [(row, 0) for row in range(len(batch_ids))]
        with_index = sum("sentence_index" in item for item in items)
        if with_index == 0:
            return batch  # an evaluation split without teacher top-k
        if with_index != len(items):
            raise ValueError(
                f"DistillationCollator: {len(items) - with_index} of {len(items)} items lack 'sentence_index' "
                "(with the transformers Trainer, set remove_unused_columns=False)"
            )
        with_tail = self.topk.tail_logmass is not None
        sentences = []  # per item: (topk ids [n, k], topk logprobs [n, k], tail [n] or None)
        for item, ids in zip(items, batch_ids):
            index = int(item["sentence_index"])
            stored_rows = self.topk.rows(index)
            if stored_rows != len(ids):
                raise ValueError(
                    f"sentence {index} has {len(ids)} input ids but its teacher top-k have {stored_rows} rows: "
                    "the teacher top-k were computed for other data, another tokenizer or another max_length. "
                    "Recompute them with the student's training sentences, tokenizer and max_length."
                )
            sentence_topk_ids, sentence_topk_logprobs = self.topk.for_sentence(index, self.k)
            tail = self.topk.tail_for_sentence(index, self.k) if with_tail else None
            sentences.append((sentence_topk_ids.long(), sentence_topk_logprobs.float(), tail))
        batch_size, length = batch["input_ids"].shape
        topk_ids = torch.zeros((batch_size, length, self.k), dtype=torch.long)
        topk_logprobs = torch.full((batch_size, length, self.k), -math.log(self.k), dtype=torch.float32)
        tail_logmass = torch.full((batch_size, length), -math.log(2.0), dtype=torch.float32)
        for (row, start), n, (sentence_topk_ids, sentence_topk_logprobs, tail) in zip(placements, lengths, sentences):
            topk_ids[row, start:start + n] = sentence_topk_ids
            topk_logprobs[row, start:start + n] = sentence_topk_logprobs
            if with_tail:
                tail_logmass[row, start:start + n] = tail
        batch["topk_ids"] = topk_ids
        batch["topk_logprobs"] = topk_logprobs
        if with_tail:
            batch["teacher_tail_logmass"] = tail_logmass
        return batch


class DistillationTrainer(transformers.Trainer):
    """A transformers Trainer whose loss is :func:`kd_loss` (or :func:`sampled_kd_loss`) against a teacher store.

    Batches come from :class:`DistillationCollator`. Training batches must
    carry ``topk_ids``/``topk_logprobs``. Evaluation batches may carry them
    (the eval loss is then the same distillation loss) or not (the eval loss
    is then the student's plain cross-entropy: an eval dataset of items
    without ``sentence_index``, such as a validation split with no teacher
    top-k, which is what best-epoch selection should use).

    The loss is a mean over the scored tokens of the whole optimizer step:
    with gradient accumulation the Trainer counts the step's target tokens
    (``num_items_in_batch``) and each micro-batch's mean is weighted by its
    share of them, as the model's own loss does, so micro-batches give the
    full batch's loss and gradient (without that count, e.g. a model whose
    forward takes no loss kwargs, the Trainer averages micro-batches). The
    running means of ``ce`` and ``kl`` are added to each training log.

    Args:
        alpha: weight of the KL term in [0, 1].
        temperature: softening temperature T > 0.
        vocab_size: the KL's vocabulary, the range shared with the teacher
            (``TeacherTopK.vocab_size``); None: all of the student's logits.
        variant: the store's variant (``topk`` or ``sampled``), which picks the loss.
        *args, **kwargs: passed to ``transformers.Trainer``.
    """

    def __init__(self, *args, alpha: float, temperature: float, vocab_size: int | None = None,
                 variant: str = "topk", **kwargs) -> None:
        problems = []
        if variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not 0.0 <= alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if problems:
            raise ValueError("DistillationTrainer: " + "; ".join(problems))
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.temperature = temperature
        self.vocab_size = vocab_size
        self.variant = variant
        self._kd_sums: dict[str, torch.Tensor] = {}
        self._kd_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one batch (plain CE for eval batches without top-k)."""
        inputs = dict(inputs)  # prediction_step keeps using its dict: do not pop from it
        topk_ids = inputs.pop("topk_ids", None)
        topk_logprobs = inputs.pop("topk_logprobs", None)
        tail_logmass = inputs.pop("teacher_tail_logmass", None)
        labels = inputs.pop("labels")
        model_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids", "use_cache")
                        if key in inputs}
        if topk_ids is None or topk_logprobs is None:
            if model.training:
                raise ValueError(
                    "DistillationTrainer: a training batch has no topk_ids/topk_logprobs; use DistillationCollator "
                    "as the data_collator, items with a 'sentence_index', and remove_unused_columns=False"
                )
            outputs = model(**model_inputs, labels=labels)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        outputs = model(**model_inputs)
        losses = distillation_loss(self.variant, outputs.logits, labels, topk_ids, topk_logprobs, alpha=self.alpha,
                                   temperature=self.temperature, teacher_tail_logmass=tail_logmass,
                                   vocab_size=self.vocab_size)
        if model.training:
            for key in ("ce", "kl"):
                self._kd_sums[key] = self._kd_sums.get(key, 0.0) + losses[key].detach()
            self._kd_steps += 1
        loss = losses["loss"]
        accumulating = self.args.gradient_accumulation_steps > 1
        if num_items_in_batch is not None and self.model_accepts_loss_kwargs and accumulating:
            # The step's mean over its target tokens (the Trainer then does not divide by the accumulation steps;
            # with one micro-batch per step this is the batch mean itself, left as kd_loss computed it).
            scored = labels[..., 1:].ne(IGNORE_INDEX).sum()
            loss = loss * scored / num_items_in_batch
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the running means of ce and kl to training logs."""
        if "loss" in logs and self._kd_steps:
            for key, total in self._kd_sums.items():
                logs[key] = float(total) / self._kd_steps
            self._kd_sums, self._kd_steps = {}, 0
        super().log(logs, start_time)


# ---------------------------------------------------------------- teacher and student


@dataclass(frozen=True)
class SharedVocabulary:
    """What teacher and student share: the ids their probabilities are compared over.

    Attributes:
        size: the first ``size`` ids (both embeddings have at least these rows).
        note: why the teacher's or the student's logits are cut to ``size``; None when nothing is cut.
    """

    size: int
    note: str | None = None


# Text whose encoding teacher and student must agree on: words, punctuation, digits, spacing, accents,
# other scripts, an emoji (byte fallback).
_PROBE_TEXTS = (
    "the cat sat on the mat, and the dog ran fast.",
    "The quick brown fox jumps over the lazy dog: 3.14159, 1,234,567 and 2026-12-03!",
    "  two  spaces,\ttab and\nnewline; naïve café, Ünïcödé «quotes» — 日本語 한국어 😀",
)


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Raise ValueError unless teacher and student tokenize text identically.

    Compares the vocabulary (``get_vocab()``, added tokens included), for
    fast tokenizers the backend's model type, BPE merges and added tokens
    (and which are special), the encoding of a few probe texts (so that
    normalizers and pre-tokenizers agree in effect), then the BOS, EOS and
    UNK ids and ftflow's start token. The pad id is not compared: pads
    are never targets and each model is padded with its own tokenizer's id,
    so two tokenizers that pad differently still distill correctly.
    """
    problems = []
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
        only_student = sorted(set(student_vocab) - set(teacher_vocab))
        moved = sorted(t for t in set(teacher_vocab) & set(student_vocab) if teacher_vocab[t] != student_vocab[t])
        problems.append(
            f"vocabularies differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens; "
            f"only in teacher e.g. {only_teacher[:5]}, only in student e.g. {only_student[:5]}, "
            f"different ids e.g. {moved[:5]})"
        )
    problems += _backend_differences(teacher_tokenizer, student_tokenizer)
    # Normalizer and pre-tokenizer settings are compared by their effect: files written by different
    # versions of `tokenizers` can spell the same rules differently.
    for text in _PROBE_TEXTS:
        teacher_ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        student_ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if teacher_ids != student_ids:
            problems.append(f"the same text is encoded differently ({text!r}: {teacher_ids[:12]} vs "
                            f"{student_ids[:12]})")
            break
    for name in ("bos_token_id", "eos_token_id", "unk_token_id"):
        teacher_id, student_id = getattr(teacher_tokenizer, name, None), getattr(student_tokenizer, name, None)
        if teacher_id != student_id:
            problems.append(f"{name} differs ({teacher_id} vs {student_id})")
    teacher_start, student_start = _start_or_none(teacher_tokenizer), _start_or_none(student_tokenizer)
    if teacher_start != student_start:
        problems.append(f"start token id differs ({teacher_start} vs {student_start})")
    if problems:
        raise ValueError(
            f"Cannot distill teacher {teacher_name!r} into student {student_name!r}: distillation compares "
            "the two models' probabilities token by token, so it needs a shared vocabulary, but "
            + "; ".join(problems)
            + ". Pick a student from the teacher's family (same tokenizer)."
        )


def check_distillable(teacher_tokenizer, student_tokenizer, teacher_rows: int, student_rows: int,
                      teacher_name: str, student_name: str) -> SharedVocabulary:
    """Check that a teacher can be distilled into a student; say over which ids.

    The tokenizers must be the same (:func:`check_same_tokenizer`). The
    embeddings may have different numbers of rows: Qwen2.5 0.5B and 3B have
    151,936 and 7B 152,064 with one tokenizer of 151,665 ids, the extra rows
    being padding no token maps to. Then both distributions are taken over
    the first ``min(rows)`` ids, which hold every id the tokenizer makes, and
    the returned note says so; a tokenizer with ids beyond the smaller
    embedding is refused.

    Args:
        teacher_tokenizer: the teacher's tokenizer.
        student_tokenizer: the student's tokenizer.
        teacher_rows: rows of the teacher's (output) embedding, its logits' width.
        student_rows: the same for the student.
        teacher_name: the teacher, for messages.
        student_name: the student, for messages.

    Returns:
        The :class:`SharedVocabulary`.

    Raises:
        ValueError: the tokenizers differ, or the tokenizer's ids do not fit
            in the smaller embedding; the message names both models.
    """
    check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name, student_name)
    ids_used = max(len(teacher_tokenizer), max(teacher_tokenizer.get_vocab().values(), default=-1) + 1)
    shared = min(teacher_rows, student_rows)
    if ids_used > shared:
        smaller = teacher_name if teacher_rows <= student_rows else student_name
        raise ValueError(
            f"Cannot distill teacher {teacher_name!r} ({teacher_rows} embedding rows) into student "
            f"{student_name!r} ({student_rows} rows): their tokenizer makes ids up to {ids_used - 1}, beyond the "
            f"{shared} rows of {smaller!r}, so that model cannot score every token. Pick a student from the "
            "teacher's family whose embedding covers the whole tokenizer."
        )
    if teacher_rows == student_rows:
        return SharedVocabulary(size=shared)
    note = (f"teacher {teacher_name!r} has {teacher_rows} embedding rows and student {student_name!r} "
            f"{student_rows}, with one tokenizer of {ids_used} ids: the distillation compares the first {shared} "
            f"ids and the {'teacher' if teacher_rows > shared else 'student'}'s logits for ids {shared}.."
            f"{max(teacher_rows, student_rows) - 1} (padding rows no token maps to) are left out and the rest "
            "renormalized")
    logger.warning("%s", note)
    return SharedVocabulary(size=shared, note=note)


def embedding_rows(path: str, trust_remote_code: bool = False) -> int:
    """Rows of a model's vocabulary embedding, read from its config (no weights loaded)."""
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def teacher_topk_for_student(
    teacher_run: dict,
    student: dict,
    sentences: Sequence[str],
    *,
    k: int,
    max_length: int,
    device: str,
    batch_size: int = 8,
    progress: bool = True,
    variant: str = "topk",
    seed: int = 0,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
) -> TeacherTopK:
    """The teacher's targets for distilling into ``student``, checked before the teacher is even loaded.

    The tokenizers and embedding sizes are compared first
    (:func:`check_distillable`, from the tokenizer files and configs only);
    then the trained teacher is loaded and :func:`compute_teacher_topk` runs
    over the shared vocabulary.

    Args:
        teacher_run: a training run's result (``name``, ``method``, ``base_model``, ...), as
            :func:`ftflow.methods.load_trained` takes it.
        student: the student model (``name``, ``path``, ``trust_remote_code``).
        sentences: the training sentences, in dataset order.
        k, max_length, batch_size, progress, variant, seed, logits_chunk_tokens: as for
            :func:`compute_teacher_topk`.
        device: where the teacher runs.

    Returns:
        The :class:`TeacherTopK`, with the teacher's tokenizer and the shared vocabulary recorded.
    """
    from ftflow.device import free_memory
    from ftflow.methods import load_trained
    from ftflow.models import load_tokenizer

    base = teacher_run["base_model"]
    teacher_tokenizer = load_tokenizer(base["path"], base["trust_remote_code"])
    student_tokenizer = load_tokenizer(student["path"], student["trust_remote_code"])
    shared = check_distillable(teacher_tokenizer, student_tokenizer,
                               embedding_rows(base["path"], base["trust_remote_code"]),
                               embedding_rows(student["path"], student["trust_remote_code"]),
                               teacher_run["name"], student["name"])
    model = load_trained(teacher_run, device)
    try:
        return compute_teacher_topk(model, teacher_tokenizer, sentences, k=k, max_length=max_length,
                                    batch_size=batch_size, progress=progress, vocab_size=shared.size,
                                    teacher_name=teacher_run["name"], vocabulary_note=shared.note,
                                    variant=variant, seed=seed, logits_chunk_tokens=logits_chunk_tokens)
    finally:
        del model
        free_memory(device)  # the teacher is gone before the student's run loads


def check_store_for_student(store: TeacherTopK, student_tokenizer, student_rows: int, student_name: str,
                            directory: Path | str = "") -> SharedVocabulary:
    """Check, before a distillation run, that stored teacher top-k fit this student.

    Raises:
        ValueError: the store does not record the teacher's tokenizer, the
            tokenizers differ (:func:`check_distillable`), or the store was
            computed over another vocabulary range than this pair shares.
    """
    teacher_name = store.teacher_name or "the teacher"
    if store.tokenizer is None or store.teacher_rows is None or store.vocab_size is None:
        raise ValueError(f"the teacher top-k {str(directory)!r} do not record the teacher's tokenizer and vocabulary, "
                         f"so student {student_name!r} cannot be checked against them; recompute them "
                         "(ftflow.distill.teacher_topk_for_student)")
    shared = check_distillable(store.tokenizer, student_tokenizer, store.teacher_rows, student_rows,
                               teacher_name, student_name)
    if shared.size != store.vocab_size:
        raise ValueError(f"the teacher top-k {str(directory)!r} are normalized over {store.vocab_size} ids, but "
                         f"teacher {teacher_name!r} and student {student_name!r} share {shared.size}; recompute them "
                         "for this student")
    return shared


def _backend_differences(teacher_tokenizer, student_tokenizer) -> list[str]:
    """How two fast tokenizers' backends (model type, merges, added tokens) differ."""
    teacher, student = _backend_json(teacher_tokenizer), _backend_json(student_tokenizer)
    if teacher is None or student is None:
        return [] if teacher is None and student is None else ["one tokenizer is fast and the other is not"]
    problems = []
    teacher_model, student_model = teacher.get("model") or {}, student.get("model") or {}
    if teacher_model.get("type") != student_model.get("type"):
        problems.append(f"tokenizer models differ ({teacher_model.get('type')} vs {student_model.get('type')})")
    teacher_merges, student_merges = _merges(teacher_model), _merges(student_model)
    if teacher_merges != student_merges:
        first = next((i for i, (a, b) in enumerate(zip(teacher_merges, student_merges)) if a != b),
                     min(len(teacher_merges), len(student_merges)))
        problems.append(
            f"merges differ ({len(teacher_merges)} vs {len(student_merges)} merges; first difference at merge "
            f"#{first}: {_at(teacher_merges, first)} vs {_at(student_merges, first)})")
    teacher_added, student_added = _added_tokens(teacher), _added_tokens(student)
    if teacher_added != student_added:
        differing = sorted(teacher_added.symmetric_difference(student_added))[:5]
        problems.append(f"added tokens differ (id, token, special) e.g. {differing}")
    return problems


def _backend_json(tokenizer) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _merges(model: dict) -> list[tuple[str, ...]]:
    # tokenizers writes merges as "a b" strings (older files) or ["a", "b"] pairs.
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def _at(merges: list, i: int):
    return merges[i] if i < len(merges) else "(none)"


def _added_tokens(backend: dict) -> set[tuple[int, str, bool]]:
    return {(t["id"], t["content"], bool(t.get("special"))) for t in backend.get("added_tokens") or []}


def _start_or_none(tokenizer) -> int | None:
    try:
        return start_token_id(tokenizer)
    except ValueError:
        return None
