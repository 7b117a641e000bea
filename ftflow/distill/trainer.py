"""Trainer glue for distillation: the collator that lines stored teacher targets up with the tokens, and
the Trainer whose loss mixes cross-entropy with a distillation loss (:mod:`ftflow.distill.losses`)."""


from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import transformers

from ftflow.distill.losses import distillation_loss
from ftflow.distill.store import VARIANTS, TeacherTopK
from ftflow.tokens import IGNORE_INDEX, pack_batch, pack_placements, packed_row_tokens, pad_batch

# ---------------------------------------------------------------- Trainer glue


class DistillationCollator:
    """Batch ``{"input_ids", "sentence_index"}`` items with their teacher top-k.

    The Trainer must keep the ``sentence_index`` column: use
    ``remove_unused_columns=False``. Items with no ``sentence_index`` at all
    (e.g. a validation split, which has no teacher top-k) give a plain
    batch; :class:`DistillationTrainer` scores those with plain
    cross-entropy in evaluation and refuses them in training.

    Packed (``packed=True``, see :func:`ftflow.train.trainer.batching_for`): the
    sentences are packed into rows (:func:`ftflow.tokens.pack_batch`, as
    :class:`ftflow.train.trainer.PackCollator` does) and each sentence's teacher
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
            # The row budget ftflow.train.trainer.PackCollator packs with.
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


