"""Perplexity, defined once (see docs/ARCHITECTURE.md, "Perplexity, defined once").

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

Memory: the [B, L, V] logits of every position are never made. The model's
forward runs with ``logits_to_keep=1`` while a hook keeps its decoder's last
hidden state; the LM head is then applied to the scored positions only, in
chunks of ``logits_chunk_tokens`` rows, each chunk's log-softmax taken in
float32 and dropped before the next. The logits' peak is bounded by the chunk
(``chunk x V x 8`` bytes, see :data:`CHUNK_BYTES_PER_LOGIT`), not by
``B x L x V``; the NLL is the full-logits one (to float32 rounding).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ftflow.device import free_memory, tf32
from ftflow.tokens import IGNORE_INDEX, pad_batch, pad_token_id, sentence_ids

log = logging.getLogger(__name__)

_SCALAR_FIELDS = ("total_nll", "scored_tokens", "total_bytes", "n_sentences", "n_truncated")

DEFAULT_LOGITS_CHUNK_TOKENS = 1024
"""Scored positions whose logits exist at once (``benchmark.logits_chunk_tokens``).
At 1024 tokens and Qwen2.5's 151,936-token vocabulary a chunk holds 1.2 GB
(:data:`CHUNK_BYTES_PER_LOGIT`); larger chunks are no faster once the LM head's
matrix product is large enough to run at full speed."""

CHUNK_BYTES_PER_LOGIT = 8
"""Bytes per logit element alive while one chunk is scored, whatever the model's
dtype ``d``: the float32 logits (the head's ``d``-byte output is released when
the cast returns; in float32 the cast is the tensor itself) and the float32
log-softmax ``cross_entropy`` makes from them. The cast's own moment holds
``d + 4`` bytes, never more than 8."""


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
        sentence_bytes: per-sentence UTF-8 bytes of the scored text, in input order
            (idem; empty also from a dict written before they were kept). With the
            per-sentence NLL they give bits per byte on any resample of the sentences
            (:mod:`ftflow.study.uncertainty`).
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
    sentence_bytes: tuple[int, ...] = ()
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
        if self.sentence_bytes and len(self.sentence_bytes) != self.n_sentences:
            problems.append(f"{len(self.sentence_bytes)} per-sentence byte counts for {self.n_sentences} sentences")
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
            per_sentence: also write ``sentence_nll``, ``sentence_tokens`` and ``sentence_bytes`` as lists.
        """
        out: dict[str, Any] = {name: getattr(self, name) for name in _SCALAR_FIELDS}
        out["corpus_ppl"] = self.corpus_ppl
        out["mean_sentence_ppl"] = self.mean_sentence_ppl
        out["bits_per_byte"] = self.bits_per_byte
        out["nll_per_token"] = self.nll_per_token
        if per_sentence:
            out["sentence_nll"] = list(self.sentence_nll)
            out["sentence_tokens"] = list(self.sentence_tokens)
            out["sentence_bytes"] = list(self.sentence_bytes)
        return out

    def per_sentence(self, sentences: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """The per-sentence values as JSON lists, what a stage keeps per split in ``per_sentence.json``.

        Args:
            sentences: the scored texts, in order; their fingerprint is kept too
                (``sentences_sha256``), so that two models' values are only ever
                paired over the same sentences (:mod:`ftflow.study.uncertainty`).

        Returns:
            ``{"nll": [n] nats, "tokens": [n], "bytes": [n], "sentences_sha256": hex}``.
        """
        out: dict[str, Any] = {"nll": list(self.sentence_nll), "tokens": list(self.sentence_tokens),
                               "bytes": list(self.sentence_bytes)}
        if sentences is not None:
            out["sentences_sha256"] = sentences_fingerprint(sentences)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerplexityResult:
        """Read back what :meth:`to_dict` wrote (derived metrics are recomputed, not trusted)."""
        missing = [name for name in _SCALAR_FIELDS if name not in data]
        if missing:
            raise ValueError(f"PerplexityResult dict is missing {missing}")
        sentence_nll = tuple(float(x) for x in data.get("sentence_nll", ()))
        sentence_tokens = tuple(int(x) for x in data.get("sentence_tokens", ()))
        sentence_bytes = tuple(int(x) for x in data.get("sentence_bytes", ()))
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
            sentence_bytes=sentence_bytes,
            stored_mean_sentence_ppl=stored_mean,
        )


def sentences_fingerprint(sentences: Sequence[str]) -> str:
    """Hex SHA-256 of a list of sentences, in order (the identity of a scored split)."""
    return hashlib.sha256(json.dumps(list(sentences), ensure_ascii=False).encode("utf-8")).hexdigest()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of next-token NLL from full logits, pads and start tokens masked out.

    The full-logits path (``logits_chunk_tokens=0``, or a model without a
    separable LM head): the scored rows are gathered, then cast to float32, so
    besides the model's own [B, L, V] logits it holds a float32 copy of nearly
    every row (all but the pads and the last position) and the float32
    log-softmax of ``cross_entropy``: ``(d + 8) x B x L x V`` bytes at the peak.
    :func:`batch_nll` avoids all three.

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


class LogitsMismatchError(RuntimeError):
    """The LM head applied outside the model's forward does not give the forward's logits."""


@dataclass(frozen=True)
class _OutputHead:
    """The pieces of a causal LM that chunked scoring applies by itself.

    Attributes:
        decoder: the module whose first output is the last hidden state [B, L, H]
            the forward hands to the LM head.
        head: the LM head (``get_output_embeddings()``; PEFT-wrapped if adapted).
        transform: what the forward does to the head's output before returning
            it (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma's
            soft-capping), applied in place, in the model's dtype, as the forward does.
        model_class: the transformers class, for messages.
    """

    decoder: torch.nn.Module
    head: torch.nn.Module
    transform: Callable[[torch.Tensor], torch.Tensor]
    model_class: str


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _logits_transform(base: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward's own step between the LM head and the returned logits (transformers 5 forms)."""
    config = getattr(base, "config", None)
    scaling = getattr(config, "logits_scaling", None)  # Granite family: logits / logits_scaling
    if scaling is not None:
        return lambda logits: logits.div_(scaling)
    scale = getattr(base, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return lambda logits: logits.mul_(scale)
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
    if cap is not None:
        return lambda logits: logits.div_(cap).tanh_().mul_(cap)
    return _identity


def _output_head(model: torch.nn.Module) -> Optional[_OutputHead]:
    """The decoder and LM head of a transformers (or PEFT-wrapped) causal LM; None if it has none.

    Requires a forward that takes ``logits_to_keep`` (every transformers 5
    causal LM does), ``get_output_embeddings`` and ``get_decoder``. Anything
    else (a custom module, remote code without them) is scored from its full logits.
    """
    get_base = getattr(model, "get_base_model", None)  # PEFT: the transformers model inside
    base = get_base() if callable(get_base) else model
    get_head, get_decoder = getattr(base, "get_output_embeddings", None), getattr(base, "get_decoder", None)
    if not (callable(get_head) and callable(get_decoder)):
        return None
    try:
        takes_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        takes_keep = False
    head, decoder = get_head(), get_decoder()
    if not takes_keep or head is None or decoder is None or decoder is base:
        return None
    return _OutputHead(decoder, head, _logits_transform(base), type(base).__name__)


def _check_head(parts: _OutputHead, hidden: torch.Tensor, last_logits: torch.Tensor,
                attention_mask: Optional[torch.Tensor]) -> None:
    """The head applied here must give the forward's own logits at the last position.

    A model whose forward changes its logits in a way :func:`_logits_transform`
    does not know would otherwise be scored wrongly without a sign.
    """
    rows = slice(None) if attention_mask is None else attention_mask[:, -1].bool()
    expected = last_logits[:, -1][rows].float()
    if expected.numel() == 0:
        return
    got = parts.transform(parts.head(hidden[:, -1][rows])).float()
    # Same inputs through the same modules: equal up to the matrix product's rounding.
    tolerance = (1e-4 if last_logits.dtype == torch.float32 else 2e-2) * (1.0 + expected.abs().max().item())
    difference = (got - expected).abs().max().item()
    if not difference <= tolerance:
        raise LogitsMismatchError(
            f"{parts.model_class}: its LM head applied to the decoder's output differs from the logits its forward "
            f"returns (max difference {difference:.3g}), so its forward transforms the logits in a way ftflow does "
            "not reproduce. Score it from full logits: set benchmark.logits_chunk_tokens: 0 (it needs more memory, "
            "and the memory plan charges it)."
        )


def _decoder_states(model: torch.nn.Module, parts: _OutputHead, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One forward without cache or full logits; the decoder's last hidden state, the head checked on it.

    The forward runs through ``model`` itself (PEFT adapters and prefix tuning's key/values apply) with
    ``use_cache=False`` and ``logits_to_keep=1``; a forward hook on ``parts.decoder`` keeps its output, and
    :func:`_check_head` compares the head applied to it with the forward's own last-position logits. The
    forward's outputs (a prefix model's key/value cache included) are released on return.

    Args:
        model: the causal LM (transformers or PEFT-wrapped) ``parts`` come from (:func:`_output_head`).
        parts: its decoder and LM head.
        inputs: ``input_ids``, ``attention_mask`` (and ``position_ids``), [B, L], on the model's device.

    Returns:
        [B, L, H] hidden states in the model's compute dtype, the LM head's input.

    Raises:
        LogitsMismatchError: the head applied here does not give the forward's logits.
    """
    captured: list[torch.Tensor] = []
    handle = parts.decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        outputs = model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{parts.model_class}: its decoder ran {len(captured)} times in one forward; expected once")
    hidden = captured.pop()
    _check_head(parts, hidden, outputs.logits, inputs.get("attention_mask"))
    return hidden


def batch_nll(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass and its per-row sum of next-token NLL, without the [B, L, V] logits.

    The forward runs through ``model`` itself (so PEFT adapters and prefix
    tuning's key/values apply) with ``logits_to_keep=1``; a forward hook on the
    decoder keeps its last hidden state. The scored positions' hidden states
    are gathered and the LM head (plus the forward's own logit scaling) is
    applied to ``logits_chunk_tokens`` of them at a time, each chunk's NLL taken
    from a float32 ``cross_entropy``. Every batch checks the head against the
    forward's own last-position logits (:class:`LogitsMismatchError` if they differ).

    Args:
        model: a causal LM (transformers, PEFT-wrapped, any dtype, 4-bit).
        inputs: ``input_ids``, ``attention_mask`` (and ``position_ids``), [B, L],
            on the model's device.
        labels: [B, L] token ids, ``IGNORE_INDEX`` where nothing is predicted.
        logits_chunk_tokens: scored positions per LM-head call; 0 scores from
            the model's full logits (:func:`token_nll`), as does a model without
            a separable head.

    Returns:
        ``(nll, count)``: [B] float64 sums of NLL in nats, and [B] int64 numbers
        of scored tokens (as :func:`token_nll`).

    Raises:
        ValueError: a negative ``logits_chunk_tokens``.
        LogitsMismatchError: see above.
    """
    if logits_chunk_tokens < 0:
        raise ValueError(f"logits_chunk_tokens must be >= 0 (0: full logits), got {logits_chunk_tokens}")
    parts = _output_head(model) if logits_chunk_tokens > 0 else None
    if parts is None:
        return token_nll(model(**inputs, use_cache=False).logits, labels)

    hidden = _decoder_states(model, parts, inputs)  # [B, L, H]
    # Position t predicts token t + 1; only scored positions reach the head, so pads
    # (whatever their hidden states hold) cannot leak in.
    shift_labels = labels[:, 1:]
    scored = shift_labels != IGNORE_INDEX
    states = hidden[:, :-1][scored]  # [N, H]
    del hidden
    targets = shift_labels[scored]  # [N]
    per_token = torch.empty(targets.shape[0], dtype=torch.float32, device=labels.device)
    for start in range(0, targets.shape[0], logits_chunk_tokens):
        end = start + logits_chunk_tokens
        # The head's own-dtype output is a temporary: freed as soon as the float32 copy exists.
        per_token[start:end] = F.cross_entropy(
            parts.transform(parts.head(states[start:end])).float(), targets[start:end], reduction="none"
        )
    rows = scored.nonzero(as_tuple=True)[0]
    nll = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    nll.index_add_(0, rows, per_token.double())
    return nll, scored.sum(dim=1)


def _rows_nll(model: torch.nn.Module, rows: list[list[int]], pad_id: int, padding_side: str, device: torch.device,
              logits_chunk_tokens: int) -> tuple[list[float], list[int]]:
    """Per-sentence NLL sums and scored tokens of one batch, as Python numbers (no tensor outlives the call)."""
    batch = pad_batch(rows, pad_id, padding_side)
    labels = batch.pop("labels").to(device)
    # Labels are not passed: the model's own loss would average over
    # the batch, and we need per-sentence sums in float32.
    # No KV cache: each sentence is scored in one pass, a cache would only cost memory.
    inputs = {name: tensor.to(device) for name, tensor in batch.items()}
    nll, count = batch_nll(model, inputs, labels, logits_chunk_tokens=logits_chunk_tokens)
    return nll.tolist(), count.tolist()


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
    logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS,
) -> PerplexityResult:
    """Score each sentence independently and sum its token NLL.

    Sentences are sorted by length (longest first) so that each batch holds
    similar lengths and little compute goes to pads; the per-sentence results
    are put back in input order. The model is put in eval mode for the call
    and its training flag is restored afterwards. CUDA's fp32 matrix products
    run without TF32 here, whatever the caller set (:func:`ftflow.device.tf32`).

    A batch that runs out of device memory (``torch.OutOfMemoryError``) is
    not lost: the memory is freed, the batch size halved, and scoring goes on
    from that batch (logged); the result is what a run at the smaller batch
    size gives. Only a single sentence that does not fit fails the call.

    Args:
        model: a causal LM (transformers, PEFT-wrapped, any dtype); any other
            module whose output has ``.logits`` of shape [B, L, V] is scored from those.
        tokenizer: the model's tokenizer.
        sentences: the texts, none blank.
        batch_size: sentences per forward pass (halved on out-of-memory, see above).
        max_length: the most tokens kept per sentence, start token included.
        padding_side: where pads go; does not change the result.
        progress: show a tqdm bar over sentences.
        desc: label of the progress bar.
        logits_chunk_tokens: scored positions whose logits exist at once
            (:func:`batch_nll`); 0 = the model's full [B, L, V] logits.

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
    if logits_chunk_tokens < 0:
        problems.append(f"logits_chunk_tokens must be >= 0 (0: full logits), got {logits_chunk_tokens}")
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
        # Reported scores in full fp32 matrix products, also when called inside a run that trains in TF32.
        with torch.inference_mode(), tf32(False), tqdm(
            total=len(encoded), desc=desc or "perplexity", unit="sent", disable=not progress
        ) as bar:
            start = 0
            while start < len(order):
                rows = order[start : start + batch_size]
                try:
                    nll, count = _rows_nll(model, [encoded[i] for i in rows], pad_id, padding_side, device,
                                           logits_chunk_tokens)
                except torch.OutOfMemoryError as exc:
                    if batch_size == 1:
                        raise
                    error = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
                else:
                    for row, value, n in zip(rows, nll, count):
                        sentence_nll[row] = value
                        sentence_tokens[row] = n
                    start += len(rows)
                    bar.update(len(rows))
                    continue
                # Out of the except block: the error's traceback, and the batch's tensors its frames held, are gone.
                free_memory(str(device))
                log.warning("out of memory scoring %d sentences of up to %d tokens at batch size %d (%s): memory "
                            "freed, going on from that batch at batch size %d", len(rows), len(encoded[rows[0]]),
                            batch_size, error, batch_size // 2)
                batch_size //= 2
    finally:
        model.train(was_training)

    sentence_bytes = [_text_bytes(tokenizer, text, ids, cut) for text, ids, cut in zip(sentences, encoded, truncated)]
    return PerplexityResult(
        total_nll=math.fsum(sentence_nll),
        scored_tokens=sum(sentence_tokens),
        total_bytes=sum(sentence_bytes),
        n_sentences=len(encoded),
        n_truncated=sum(truncated),
        sentence_nll=tuple(sentence_nll),
        sentence_tokens=tuple(sentence_tokens),
        sentence_bytes=tuple(sentence_bytes),
    )
