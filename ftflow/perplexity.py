"""Perplexity, defined once (see ARCHITECTURE.md, "Perplexity, defined once").

Every sentence is scored on its own with the encoding convention of
:mod:`ftflow.tokens`: one start token (BOS, else EOS) is prepended, every real
token after it is predicted, pads are masked out and a cut at ``max_length`` is
counted. Three numbers come out of the same sums:

* corpus perplexity ``exp(total_nll / scored_tokens)``;
* the mean of per-sentence perplexities (what some tools call perplexity);
* bits per byte ``total_nll / (ln 2 * total_bytes)``, which does not depend on
  the tokenizer and so is the fair way to compare model families.

Batching is an implementation detail: the result does not depend on batch size
or padding side (to float32 rounding), which the unit tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ftflow.tokens import IGNORE_INDEX, pad_batch, pad_token_id, sentence_ids

_SCALAR_FIELDS = ("total_nll", "scored_tokens", "total_bytes", "n_sentences", "n_truncated")


@dataclass(frozen=True)
class PerplexityResult:
    """Sums of a scoring run, from which every reported metric is derived.

    Attributes:
        total_nll: sum of token negative log-likelihoods, in nats.
        scored_tokens: number of predicted tokens (start tokens and pads excluded).
        total_bytes: UTF-8 bytes of the scored text; for a truncated sentence,
            the bytes of the kept part, decoded.
        n_sentences: sentences scored.
        n_truncated: sentences cut at ``max_length``.
        sentence_nll: per-sentence NLL in nats, in input order (empty when read
            back from a dict written without per-sentence values).
        sentence_tokens: per-sentence scored tokens, in input order (idem).
        stored_mean_sentence_ppl: the mean sentence perplexity read back by
            :meth:`from_dict` when the per-sentence values were not written;
            ``None`` otherwise. Not part of equality.
    """

    total_nll: float
    scored_tokens: int
    total_bytes: int
    n_sentences: int
    n_truncated: int
    sentence_nll: tuple[float, ...] = ()
    sentence_tokens: tuple[int, ...] = ()
    stored_mean_sentence_ppl: float | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if self.n_sentences < 1:
            problems.append(f"n_sentences must be >= 1, got {self.n_sentences}")
        if self.scored_tokens < 1:
            problems.append(f"scored_tokens must be >= 1, got {self.scored_tokens}")
        if not 0 <= self.n_truncated <= self.n_sentences:
            problems.append(f"n_truncated must be in [0, n_sentences], got {self.n_truncated}")
        if len(self.sentence_nll) != len(self.sentence_tokens):
            problems.append(
                f"sentence_nll ({len(self.sentence_nll)}) and sentence_tokens "
                f"({len(self.sentence_tokens)}) differ in length"
            )
        elif self.sentence_nll and len(self.sentence_nll) != self.n_sentences:
            problems.append(f"{len(self.sentence_nll)} per-sentence values for {self.n_sentences} sentences")
        if problems:
            raise ValueError("Invalid PerplexityResult: " + "; ".join(problems))

    @property
    def nll_per_token(self) -> float:
        """Mean NLL per scored token, in nats."""
        return self.total_nll / self.scored_tokens

    @property
    def corpus_ppl(self) -> float:
        """``exp(total_nll / scored_tokens)``: the corpus perplexity ftflow reports."""
        return math.exp(self.nll_per_token)

    @property
    def mean_sentence_ppl(self) -> float:
        """Mean over sentences of ``exp(nll_i / tokens_i)``; dominated by short, hard sentences."""
        if self.sentence_nll:
            per_sentence = [math.exp(nll / n) for nll, n in zip(self.sentence_nll, self.sentence_tokens)]
            return math.fsum(per_sentence) / len(per_sentence)
        if self.stored_mean_sentence_ppl is not None:
            return self.stored_mean_sentence_ppl
        raise ValueError("mean_sentence_ppl needs per-sentence values, and none were stored")

    @property
    def bits_per_byte(self) -> float:
        """``total_nll / (ln 2 * total_bytes)``: tokenizer-independent, to compare families."""
        if self.total_bytes <= 0:
            raise ValueError("bits_per_byte is undefined: the scored text has no bytes")
        return self.total_nll / (math.log(2) * self.total_bytes)

    def to_dict(self, per_sentence: bool = False) -> dict[str, Any]:
        """A JSON-ready dict: the scalar sums and the derived metrics.

        Args:
            per_sentence: also write ``sentence_nll`` and ``sentence_tokens`` as lists.
        """
        out: dict[str, Any] = {name: getattr(self, name) for name in _SCALAR_FIELDS}
        out["corpus_ppl"] = self.corpus_ppl
        out["mean_sentence_ppl"] = self.mean_sentence_ppl
        out["bits_per_byte"] = self.bits_per_byte
        out["nll_per_token"] = self.nll_per_token
        if per_sentence:
            out["sentence_nll"] = list(self.sentence_nll)
            out["sentence_tokens"] = list(self.sentence_tokens)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerplexityResult:
        """Read back what :meth:`to_dict` wrote (derived metrics are recomputed, not trusted)."""
        missing = [name for name in _SCALAR_FIELDS if name not in data]
        if missing:
            raise ValueError(f"PerplexityResult dict is missing {missing}")
        sentence_nll = tuple(float(x) for x in data.get("sentence_nll", ()))
        sentence_tokens = tuple(int(x) for x in data.get("sentence_tokens", ()))
        stored_mean = None
        if not sentence_nll and data.get("mean_sentence_ppl") is not None:
            # Without per-sentence values the mean cannot be recomputed: keep the stored one.
            stored_mean = float(data["mean_sentence_ppl"])
        return cls(
            total_nll=float(data["total_nll"]),
            scored_tokens=int(data["scored_tokens"]),
            total_bytes=int(data["total_bytes"]),
            n_sentences=int(data["n_sentences"]),
            n_truncated=int(data["n_truncated"]),
            sentence_nll=sentence_nll,
            sentence_tokens=sentence_tokens,
            stored_mean_sentence_ppl=stored_mean,
        )


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of next-token NLL, pads and start tokens masked out.

    Only the scored positions are gathered before the float32 cast, so a bf16
    model never has a full float32 copy of its [B, L, V] logits made.

    Args:
        logits: [B, L, V] model outputs, any float dtype.
        labels: [B, L] token ids, ``IGNORE_INDEX`` where nothing is predicted.

    Returns:
        ``(nll, count)``: [B] float64 sums of NLL in nats, and [B] int64 numbers
        of scored tokens.
    """
    # Position t predicts token t + 1.
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    scored = shift_labels != IGNORE_INDEX
    # Boolean indexing drops pad positions entirely, so whatever a model puts in
    # its pad logits (even NaN with some attention kernels) cannot leak in.
    per_token = F.cross_entropy(shift_logits[scored].float(), shift_labels[scored], reduction="none")
    rows = scored.nonzero(as_tuple=True)[0]
    nll = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    nll.index_add_(0, rows, per_token.double())
    return nll, scored.sum(dim=1)


def _text_bytes(tokenizer, text: str, ids: Sequence[int], truncated: bool) -> int:
    """UTF-8 bytes of the part of ``text`` that was scored (``ids`` minus the start token)."""
    if not truncated:
        return len(text.encode("utf-8"))
    kept = tokenizer.decode(list(ids[1:]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return len(kept.encode("utf-8"))


def _encode_all(tokenizer, sentences: Sequence[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Encode every sentence with :func:`sentence_ids`; refuse sentences with no tokens."""
    encoded: list[list[int]] = []
    truncated: list[bool] = []
    for index, text in enumerate(sentences):
        ids, was_cut = sentence_ids(tokenizer, text, max_length)
        if len(ids) < 2:
            raise ValueError(
                f"Sentence {index} ({text!r}) encodes to no tokens, so there is nothing to predict. "
                "Drop blank lines (and whitespace-only lines) before scoring."
            )
        encoded.append(ids)
        truncated.append(was_cut)
    return encoded, truncated


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs must go: the device of the model's first parameter (CPU if it has none)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def score_sentences(
    model: torch.nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    padding_side: Literal["right", "left"] = "right",
    progress: bool = True,
    desc: str | None = None,
) -> PerplexityResult:
    """Score each sentence independently and sum its token NLL.

    Sentences are sorted by length (longest first) so that each batch holds
    similar lengths and little compute goes to pads; the per-sentence results
    are put back in input order. The model is put in eval mode for the call
    and its training flag is restored afterwards.

    Args:
        model: a causal LM (transformers, PEFT-wrapped, any dtype) whose output
            has ``.logits`` of shape [B, L, V].
        tokenizer: the model's tokenizer.
        sentences: the texts, none blank.
        batch_size: sentences per forward pass.
        max_length: the most tokens kept per sentence, start token included.
        padding_side: where pads go; does not change the result.
        progress: show a tqdm bar over sentences.
        desc: label of the progress bar.

    Returns:
        The sums and per-sentence values; see :class:`PerplexityResult`.

    Raises:
        ValueError: an empty sentence list, a sentence with no tokens, or a bad argument.
    """
    problems = []
    if len(sentences) == 0:
        problems.append("no sentences to score (the list is empty)")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        problems.append(f"max_length must be >= 2 (a start token and one target), got {max_length}")
    if padding_side not in ("right", "left"):
        problems.append(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if problems:
        raise ValueError("score_sentences: " + "; ".join(problems))

    encoded, truncated = _encode_all(tokenizer, sentences, max_length)
    # Longest first: the slowest batch runs first (a memory problem shows at once)
    # and each batch pads to a length close to its members'.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    pad_id = pad_token_id(tokenizer)
    device = _model_device(model)

    sentence_nll = [0.0] * len(encoded)
    sentence_tokens = [0] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(
            total=len(encoded), desc=desc or "perplexity", unit="sent", disable=not progress
        ) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = pad_batch([encoded[i] for i in rows], pad_id, padding_side)
                labels = batch.pop("labels").to(device)
                # Labels are not passed: the model's own loss would average over
                # the batch, and we need per-sentence sums in float32.
                # No KV cache: each sentence is scored in one pass, a cache would only cost memory.
                outputs = model(**{name: tensor.to(device) for name, tensor in batch.items()}, use_cache=False)
                nll, count = token_nll(outputs.logits, labels)
                for row, value, n in zip(rows, nll.tolist(), count.tolist()):
                    sentence_nll[row] = value
                    sentence_tokens[row] = n
                bar.update(len(rows))
    finally:
        model.train(was_training)

    total_bytes = sum(
        _text_bytes(tokenizer, text, ids, cut) for text, ids, cut in zip(sentences, encoded, truncated)
    )
    return PerplexityResult(
        total_nll=math.fsum(sentence_nll),
        scored_tokens=sum(sentence_tokens),
        total_bytes=total_bytes,
        n_sentences=len(encoded),
        n_truncated=sum(truncated),
        sentence_nll=tuple(sentence_nll),
        sentence_tokens=tuple(sentence_tokens),
    )
