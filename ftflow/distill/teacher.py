"""The teacher pass: the trained teacher run over the training split, its sparse targets stored
(:func:`compute_teacher_topk`, :func:`teacher_topk_for_student`), never holding the full logits."""


from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ftflow.distill.store import VARIANTS, TeacherTopK
from ftflow.distill.vocabulary import check_distillable, embedding_rows
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, _decoder_states, _output_head, _OutputHead
from ftflow.tokens import pad_batch, pad_token_id, sentence_ids

logger = logging.getLogger(__name__)


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
    (:func:`ftflow.plan.predict.predict_teacher_pass` predicts the peak).

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
            :func:`ftflow.models.loading.load_trained` takes it.
        student: the student model (``name``, ``path``, ``trust_remote_code``).
        sentences: the training sentences, in dataset order.
        k, max_length, batch_size, progress, variant, seed, logits_chunk_tokens: as for
            :func:`compute_teacher_topk`.
        device: where the teacher runs.

    Returns:
        The :class:`TeacherTopK`, with the teacher's tokenizer and the shared vocabulary recorded.
    """
    from ftflow.device import free_memory
    from ftflow.models.loading import load_tokenizer, load_trained

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


