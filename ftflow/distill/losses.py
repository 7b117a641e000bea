"""Sparse knowledge distillation's losses: plain maths on tensors, no I/O (shapes in each docstring).

The teacher's sparse view of its next-token distribution (:class:`ftflow.distill.store.TeacherTopK`) comes in
two variants with the same number of ids per position, so they cost the same storage:

* ``topk``: its k most likely ids, their log-probs and the exact mass of the
  rest (one tail bucket); loss :func:`kd_loss`. Biased: the student is never
  told how the tail is shaped.
* ``sampled``: k ids drawn from the teacher's distribution (with replacement)
  and their log-probs, as in random-sampling distillation (Anshumann et al.,
  ACL 2025, "Sparse Logit Sampling"); loss :func:`sampled_kd_loss`. At T = 1
  the gradient is an unbiased estimate of the full-distribution KL's.

Alignment convention (shared with :mod:`ftflow.tokens`): a sentence encoded with
``sentence_ids`` to ``n`` ids owns ``n`` stored rows, one per input position.
Row ``t`` holds the teacher's prediction made AT position ``t`` (of token
``t + 1``), exactly like the logits, so the top-k get the same shift as the
logits in the loss. The last row predicts past the sentence and is never a
target; it is kept so that rows and input ids line up one to one.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ftflow.distill.store import VARIANTS
from ftflow.tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)



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


