"""Top-k knowledge distillation: the loss, the stored teacher top-k, and Trainer glue.

The teacher (a LoRA-tuned model) is run once over the training split and its
top-k log-probs per position are stored on disk (:class:`TeacherTopK`). Every
student epoch and every student config then reuses them: the student never
needs the teacher in memory.

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

from ftflow.tokens import IGNORE_INDEX, pad_batch, pad_token_id, sentence_ids, start_token_id

logger = logging.getLogger(__name__)

TOPK_FILE = "teacher_topk.safetensors"
META_FILE = "teacher_topk.json"
FORMAT_VERSION = 1

# Smallest probability mass whose log is taken in the tail bucket: keeps
# log(1 - Q) finite when the student puts (nearly) all its mass on the top-k.
_TAIL_EPS = 1e-12


# --------------------------------------------------------------------------- loss


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Cross-entropy plus top-k KL(teacher || student), mean over scored tokens.

    ``loss = (1 - alpha) * CE + alpha * T**2 * KL``.

    Positions follow the transformers causal-LM convention: the logits and the
    teacher top-k at position ``t`` predict ``labels[t + 1]``; the shift is
    done here. A position is scored when its shifted label is not
    ``IGNORE_INDEX``; nothing at any other position (pads, junk logits, junk
    top-k) reaches the loss, because those positions are dropped before any
    arithmetic.

    KL, "top-k with a tail bucket". The teacher is known only on its top-k
    ids; let ``M = sum_k exp(topk_logprobs)`` be its mass there (<= 1).

    * Teacher at temperature T on the top-k:
      ``log p_T = log_softmax_over_k(topk_logprobs / T) + log M`` (the top-k
      keep their total mass M; exact at T = 1).
    * Student: ``log q_T = log_softmax(student_logits / T)`` over the FULL
      vocabulary, gathered at ``topk_ids``; ``Q = sum_k q_T``.
    * ``KL = sum_k p_T (log p_T - log q_T) + (1 - M) (log(1 - M) - log(1 - Q))``,
      the last term comparing the "everything else" buckets. It is 0 when
      M = 1; ``(1 - M) log(1 - M)`` is taken as 0 when 1 - M <= 0 (possible
      after float16 storage rounds M up), and ``1 - Q`` is clamped to 1e-12.

    Consequences: KL = 0 when the student equals the teacher at T = 1 for any
    k; with k = V the KL is the dense KL(teacher_T || student_T).

    CE uses the raw logits (temperature 1). When no position is scored the
    three results are zeros still attached to the graph, so a batch of empty
    sentences does not crash a training step.

    Args:
        student_logits: [B, L, V] student logits (any float dtype; computed in float32).
        labels: [B, L] long, ``IGNORE_INDEX`` at non-targets (unshifted).
        topk_ids: [B, L, k] integer, the teacher's top-k token ids at each position.
        topk_logprobs: [B, L, k] float, the teacher's log-probs (temperature 1,
            normalized over the full vocabulary) at those ids.
        alpha: weight of the KL term in [0, 1].
        temperature: softening temperature T > 0 applied to both distributions.

    Returns:
        ``{"loss", "ce", "kl"}``, float32 scalars.
    """
    _check_kd_inputs(student_logits, labels, topk_ids, topk_logprobs, alpha, temperature)
    vocab_size = student_logits.shape[-1]

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
    if int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= vocab_size:
        raise ValueError(
            f"teacher top-k ids fall outside the student's vocabulary [0, {vocab_size}): "
            f"min {int(teacher_ids.min())}, max {int(teacher_ids.max())}; teacher and student must share a vocabulary"
        )

    ce = F.cross_entropy(logits, targets)

    # Teacher on its top-k at temperature T, keeping the top-k's mass M.
    teacher_log_mass = torch.logsumexp(teacher_lp, dim=-1, keepdim=True)  # log M, [N, 1]
    teacher_log_p = F.log_softmax(teacher_lp / temperature, dim=-1) + teacher_log_mass  # [N, k]
    # Student normalized over the FULL vocabulary, then read at the teacher's ids.
    student_log_q = F.log_softmax(logits / temperature, dim=-1).gather(-1, teacher_ids)  # [N, k]
    student_log_mass = torch.logsumexp(student_log_q, dim=-1)  # log Q, [N]

    top_kl = (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum(dim=-1)  # [N]
    # 1 - exp(x) via expm1 keeps the tail accurate when the mass is close to 1.
    teacher_tail = (-torch.expm1(teacher_log_mass.squeeze(-1))).clamp(min=0.0)  # 1 - M
    student_tail = (-torch.expm1(student_log_mass)).clamp(min=_TAIL_EPS)  # 1 - Q
    tail_kl = torch.where(
        teacher_tail > 0,
        teacher_tail * (teacher_tail.clamp(min=_TAIL_EPS).log() - student_tail.log()),
        torch.zeros_like(teacher_tail),
    )
    kl = (top_kl + tail_kl).mean()

    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def _check_kd_inputs(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    alpha: float,
    temperature: float,
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
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        problems.append(f"temperature must be > 0, got {temperature}")
    if problems:
        raise ValueError("kd_loss: " + "; ".join(problems))


# ------------------------------------------------------------- teacher top-k store


@dataclass
class TeacherTopK:
    """The teacher's top-k log-probs for a list of sentences, ragged and stored flat.

    Sentence ``i`` owns rows ``offsets[i]:offsets[i + 1]``, one per input
    position (see the module docstring for the alignment). Each row is sorted
    by descending log-prob, so keeping its first ``k'`` columns is the top-k'.

    Attributes:
        ids: [P, k] int32 token ids, P = total positions over all sentences.
        logprobs: [P, k] float16 log-probs (temperature 1, full-vocabulary normalized).
        offsets: [N + 1] int64 row offsets, N = number of sentences.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self) -> None:
        problems = []
        if self.ids.dim() != 2 or self.ids.dtype != torch.int32:
            problems.append(f"ids must be a 2-D int32 tensor, got {self.ids.dtype} {tuple(self.ids.shape)}")
        if self.logprobs.dtype != torch.float16 or tuple(self.logprobs.shape) != tuple(self.ids.shape):
            problems.append(
                f"logprobs must be float16 with the shape of ids {tuple(self.ids.shape)}, "
                f"got {self.logprobs.dtype} {tuple(self.logprobs.shape)}"
            )
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

    def save(self, directory: Path) -> None:
        """Write ``teacher_topk.safetensors`` and ``teacher_topk.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"ids": self.ids.contiguous(), "logprobs": self.logprobs.contiguous(), "offsets": self.offsets.contiguous()},
            str(directory / TOPK_FILE),
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "k": self.k,
            "n_sentences": self.n_sentences,
            "positions": self.positions,
            "ids_dtype": "int32",
            "logprobs_dtype": "float16",
            "offsets_dtype": "int64",
            "alignment": "one row per input id; row t is the prediction made at position t (of token t+1); "
                         "rows sorted by descending log-prob",
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
        tensors = load_file(str(directory / TOPK_FILE))
        topk = cls(ids=tensors["ids"], logprobs=tensors["logprobs"], offsets=tensors["offsets"])
        found = {"format_version": FORMAT_VERSION, "k": topk.k, "n_sentences": topk.n_sentences,
                 "positions": topk.positions}
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
) -> TeacherTopK:
    """Run the teacher once over ``sentences`` and keep its top-k log-probs per position.

    Sentences are encoded with ``sentence_ids`` (as the student will be
    trained), grouped into length-sorted batches so little compute goes to
    pads, and right-padded with ``pad_batch``. Log-softmax is taken in float32
    over the full vocabulary; the top-k are sorted descending.

    Args:
        model: the teacher causal LM (a PEFT-wrapped model works too). Put in
            eval mode for the call (dropout would make the targets random) and
            restored afterwards.
        tokenizer: the tokenizer shared by teacher and student.
        sentences: the N training sentences, in dataset order.
        k: log-probs kept per position (1 <= k <= vocabulary size).
        max_length: tokens kept per sentence, start token included.
        batch_size: sentences per forward pass.
        progress: show a tqdm bar.

    Returns:
        A :class:`TeacherTopK` with ``len(sentence_ids(...))`` rows per sentence.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = [sentence_ids(tokenizer, text, max_length) for text in sentences]
    truncated = sum(cut for _, cut in encoded)
    if truncated:
        logger.warning("teacher top-k: %d of %d sentences cut to max_length=%d tokens", truncated, len(encoded), max_length)
    all_ids = [ids for ids, _ in encoded]
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device

    per_sentence: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(all_ids)
    # Longest first: the biggest batch runs first, so an out-of-memory shows at once.
    order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]), reverse=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(all_ids), desc="teacher top-k", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                batch_indices = order[start:start + batch_size]
                batch = pad_batch([all_ids[i] for i in batch_indices], pad_id, padding_side="right")
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    position_ids=batch["position_ids"].to(device),
                ).logits
                vocab_size = logits.shape[-1]
                if k > vocab_size:
                    raise ValueError(f"k={k} exceeds the teacher's vocabulary size {vocab_size}")
                for row, index in enumerate(batch_indices):
                    # One row at a time: a float32 copy of [B, L, V] would dwarf the model.
                    n = len(all_ids[index])
                    log_probs = F.log_softmax(logits[row, :n].float(), dim=-1)
                    values, ids = torch.topk(log_probs, k, dim=-1, sorted=True)
                    # -inf (a masked vocabulary slot) would not survive float16 arithmetic as a finite number.
                    values = values.clamp(min=torch.finfo(torch.float16).min)
                    per_sentence[index] = (ids.to("cpu", torch.int32), values.to("cpu", torch.float16))
                bar.update(len(batch_indices))
    finally:
        model.train(was_training)

    lengths = torch.tensor([len(ids) for ids in all_ids], dtype=torch.int64)
    offsets = torch.zeros(len(all_ids) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    if per_sentence:
        ids = torch.cat([pair[0] for pair in per_sentence])
        logprobs = torch.cat([pair[1] for pair in per_sentence])
    else:
        ids = torch.zeros((0, k), dtype=torch.int32)
        logprobs = torch.zeros((0, k), dtype=torch.float16)
    return TeacherTopK(ids=ids, logprobs=logprobs, offsets=offsets)


# ---------------------------------------------------------------- Trainer glue


class DistillationCollator:
    """Batch ``{"input_ids", "sentence_index"}`` items with their teacher top-k.

    The Trainer must keep the ``sentence_index`` column: use
    ``remove_unused_columns=False``. Items with no ``sentence_index`` at all
    (e.g. a validation split, which has no teacher top-k) give a plain
    ``pad_batch`` batch; :class:`DistillationTrainer` scores those with plain
    cross-entropy in evaluation and refuses them in training.

    Args:
        pad_id: id written into pad slots (``ftflow.tokens.pad_token_id``).
        topk: the stored teacher top-k of the training sentences.
        k: entries per position to use (<= stored k); None uses all.
    """

    def __init__(self, pad_id: int, topk: TeacherTopK, k: int | None = None) -> None:
        self.pad_id = pad_id
        self.topk = topk
        self.k = topk._check_k(k)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a batch (right side) and attach the aligned teacher top-k.

        Returns:
            ``pad_batch``'s ``input_ids``, ``attention_mask``, ``position_ids``,
            ``labels`` ([B, L] long) plus, when the items have a
            ``sentence_index``, ``topk_ids`` [B, L, k] long and
            ``topk_logprobs`` [B, L, k] float32. Pad rows hold id 0 and
            log(1/k): finite, and never read because their labels are ignored.
        """
        if any("input_ids" not in item for item in items):
            raise ValueError("DistillationCollator: every item needs 'input_ids'")
        batch_ids = [list(item["input_ids"]) for item in items]
        batch = pad_batch(batch_ids, self.pad_id, padding_side="right")
        with_index = sum("sentence_index" in item for item in items)
        if with_index == 0:
            return batch  # an evaluation split without teacher top-k
        if with_index != len(items):
            raise ValueError(
                f"DistillationCollator: {len(items) - with_index} of {len(items)} items lack 'sentence_index' "
                "(with the transformers Trainer, set remove_unused_columns=False)"
            )
        batch_size, length = batch["input_ids"].shape
        topk_ids = torch.zeros((batch_size, length, self.k), dtype=torch.long)
        topk_logprobs = torch.full((batch_size, length, self.k), -math.log(self.k), dtype=torch.float32)
        for row, (item, ids) in enumerate(zip(items, batch_ids)):
            index = int(item["sentence_index"])
            stored_rows = self.topk.rows(index)
            if stored_rows != len(ids):
                raise ValueError(
                    f"sentence {index} has {len(ids)} input ids but its teacher top-k have {stored_rows} rows: "
                    "the teacher top-k were computed for other data, another tokenizer or another max_length. "
                    "Recompute them with the student's training sentences, tokenizer and max_length."
                )
            sentence_topk_ids, sentence_topk_logprobs = self.topk.for_sentence(index, self.k)
            topk_ids[row, :len(ids)] = sentence_topk_ids.long()
            topk_logprobs[row, :len(ids)] = sentence_topk_logprobs.float()
        batch["topk_ids"] = topk_ids
        batch["topk_logprobs"] = topk_logprobs
        return batch


class DistillationTrainer(transformers.Trainer):
    """A transformers Trainer whose loss is :func:`kd_loss` against stored teacher top-k.

    Batches come from :class:`DistillationCollator`. Training batches must
    carry ``topk_ids``/``topk_logprobs``. Evaluation batches may carry them
    (the eval loss is then the same distillation loss) or not (the eval loss
    is then the student's plain cross-entropy: an eval dataset of items
    without ``sentence_index``, such as a validation split with no teacher
    top-k, which is what best-epoch selection should use).

    The loss is a mean over the scored tokens of each micro-batch; with
    gradient accumulation the Trainer averages micro-batches
    (``loss_is_scaled_for_ga = False``). The running means of ``ce`` and
    ``kl`` are added to each training log.

    Args:
        alpha: weight of the KL term in [0, 1].
        temperature: softening temperature T > 0.
        *args, **kwargs: passed to ``transformers.Trainer``.
    """

    # kd_loss is a per-micro-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, alpha: float, temperature: float, **kwargs) -> None:
        problems = []
        if not 0.0 <= alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if problems:
            raise ValueError("DistillationTrainer: " + "; ".join(problems))
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.temperature = temperature
        self._kd_sums: dict[str, torch.Tensor] = {}
        self._kd_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one batch (plain CE for eval batches without top-k)."""
        inputs = dict(inputs)  # prediction_step keeps using its dict: do not pop from it
        topk_ids = inputs.pop("topk_ids", None)
        topk_logprobs = inputs.pop("topk_logprobs", None)
        labels = inputs.pop("labels")
        model_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
        if topk_ids is None or topk_logprobs is None:
            if model.training:
                raise ValueError(
                    "DistillationTrainer: a training batch has no topk_ids/topk_logprobs; use DistillationCollator "
                    "as the data_collator, items with a 'sentence_index', and remove_unused_columns=False"
                )
            outputs = model(**model_inputs, labels=labels)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        outputs = model(**model_inputs)
        losses = kd_loss(outputs.logits, labels, topk_ids, topk_logprobs,
                         alpha=self.alpha, temperature=self.temperature)
        if model.training:
            for key in ("ce", "kl"):
                self._kd_sums[key] = self._kd_sums.get(key, 0.0) + losses[key].detach()
            self._kd_steps += 1
        return (losses["loss"], outputs) if return_outputs else losses["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the running means of ce and kl to training logs."""
        if "loss" in logs and self._kd_steps:
            for key, total in self._kd_sums.items():
                logs[key] = float(total) / self._kd_steps
            self._kd_sums, self._kd_steps = {}, 0
        super().log(logs, start_time)


def check_same_tokenizer(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Raise ValueError unless teacher and student share one vocabulary.

    Compares ``get_vocab()`` and the BOS/EOS/UNK ids plus ftflow's start token.
    The pad id is not compared: pads are never targets, so two tokenizers that
    pad differently still distill correctly.
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


def _start_or_none(tokenizer) -> int | None:
    try:
        return start_token_id(tokenizer)
    except ValueError:
        return None
