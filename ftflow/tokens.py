"""How ftflow turns sentences into token ids and batches.

One convention is shared by scoring, training and distillation, so that the
perplexity a model is trained to lower is the perplexity that is reported:

* every sentence is encoded on its own, without the tokenizer's own special
  tokens, and one start token is prepended: BOS where the tokenizer has one,
  EOS otherwise (Qwen2-style tokenizers have no BOS);
* the sequence is cut to ``max_length`` tokens (start token included) and the
  cut is reported, never hidden;
* every real token after the start token is a prediction target; pads and the
  start token are not.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

IGNORE_INDEX = -100
"""Label value that transformers' causal-LM loss skips."""


def start_token_id(tokenizer) -> int:
    """The id prepended to every sentence: BOS if the tokenizer has one, else EOS."""
    token_id = tokenizer.bos_token_id
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has neither a BOS nor an "
            "EOS token, so a sentence's first word cannot be predicted. Use a tokenizer that "
            "defines bos_token or eos_token."
        )
    return int(token_id)


def pad_token_id(tokenizer) -> int:
    """The id used for padding; falls back to EOS (never a target, so any id works)."""
    token_id = tokenizer.pad_token_id
    if token_id is None:
        token_id = tokenizer.eos_token_id
    if token_id is None:
        token_id = start_token_id(tokenizer)
    return int(token_id)


def sentence_ids(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """Encode one sentence the way ftflow scores and trains on it.

    Args:
        tokenizer: a transformers tokenizer.
        text: the sentence.
        max_length: the most tokens kept, start token included (>= 2).

    Returns:
        ``(ids, truncated)``: ``[start] + tokens`` cut to ``max_length``, and
        whether anything was cut.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a start token and one target), got {max_length}")
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [start_token_id(tokenizer), *body]
    truncated = len(ids) > max_length
    return ids[:max_length], truncated


def pad_batch(
    batch_ids: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad encoded sentences into one batch.

    Position ids are computed from the attention mask so that a left-padded
    sentence sees the same positions as a right-padded one (transformers'
    default positions ignore the mask).

    Args:
        batch_ids: B lists of token ids, each starting with the start token.
        pad_id: id written into pad slots.
        padding_side: where pads go.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``, each
        a LongTensor of shape [B, L] with L the longest sequence. ``labels`` is
        ``IGNORE_INDEX`` at pads and at each start token.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), length), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        ids_tensor = torch.as_tensor(list(ids), dtype=torch.long)
        if padding_side == "right":
            span = slice(0, len(ids))
        else:
            span = slice(length - len(ids), length)
        input_ids[row, span] = ids_tensor
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    # The start token is context, not a target: with left padding the shift in
    # the loss would otherwise ask a pad position to predict it.
    labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
    }


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> tuple[list[tuple[int, int]], list[int], float]:
    """First-fit decreasing into rows of ``capacity`` tokens: placements, tokens per row, and the next capacity.

    The next capacity is the smallest ``row tokens + sentence`` that did not
    fit (inf if every sentence fit the first row it tried): every capacity below
    it gives this very layout, since no comparison changes its outcome.
    """
    used: list[int] = []  # tokens already in each row
    placements: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    next_capacity = math.inf
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = len(used)
        for r, taken in enumerate(used):
            if taken + lengths[i] <= capacity:
                row = r
                break
            next_capacity = min(next_capacity, taken + lengths[i])
        if row == len(used):
            used.append(0)
        placements[i] = (row, used[row])
        used[row] += lengths[i]
    return placements, used, next_capacity


def pack_placements(lengths: Sequence[int], row_tokens: int | None = None) -> list[tuple[int, int]]:
    """Where each sentence of a packed batch goes: ``(row, first column)``.

    ``row_tokens`` None: one row, the sentences in their order (what flash
    attention's varlen kernel takes). Otherwise first-fit decreasing into rows
    of at most ``row_tokens`` tokens (at least the longest sentence; see
    :func:`packed_row_tokens` for the budget the collators choose). Ties keep
    the batch order, so the layout is a pure function of the lengths.

    Args:
        lengths: tokens of each sentence (start token included), in batch order.
        row_tokens: the most tokens of one row, or None for a single row.

    Returns:
        One ``(row, start)`` per sentence, in batch order.
    """
    if row_tokens is None:
        starts = [0]
        for length in lengths[:-1]:
            starts.append(starts[-1] + length)
        return [(0, start) for start in starts]
    return _first_fit_decreasing(lengths, max(row_tokens, max(lengths)))[0]


MAX_PACKING_LAYOUTS = 64
"""Most layouts :func:`packed_row_tokens` tries per batch: about 30 ms of Python at batch 64, nothing lost on
sst2 at batch 16 (47 tried on average)."""


def packed_row_tokens(lengths: Sequence[int]) -> int:
    """The row budget of a packed batch (for :func:`pack_placements`): the fewest computed tokens.

    A packed batch computes rows x widest row tokens, pads included; the
    linear layers and the LM head cost per computed token, attention (sdpa
    and eager build a dense block-diagonal mask) per row x width^2. Rows of
    the longest sentence leave the ends of short rows padded (about 12% of
    the tokens of random sst2 batches of 16); slightly wider rows fill up
    better (about 2.5%). So this tries every budget from the longest sentence
    up, first-fit decreasing each, and keeps the layout with the fewest
    computed tokens among those whose attention (rows x width^2: its FLOPs,
    the mask's and the attention scores' memory) is no more than the padded
    batch's (B x longest^2). Tokens (rows x width <= B x longest) and
    attention then never exceed the padded batch's, so a memory plan made
    for padded batches of ``max_length`` holds, though a row may be longer
    than ``max_length`` (positions restart at every sentence, so no position
    exceeds the longest sentence's). Among as many tokens the cheaper
    attention wins, then the smaller budget, so rows of the longest sentence
    stay when nothing is gained.

    Only budgets where a first-fit comparison changes its outcome give a new
    layout, so the search jumps from one to the next; it stops where no new
    layout can have fewer tokens within the attention bound, or after
    :data:`MAX_PACKING_LAYOUTS` layouts.

    Args:
        lengths: tokens of each sentence (start token included), in batch order.

    Returns:
        The budget: at least the longest sentence.
    """
    longest, total = max(lengths), sum(lengths)
    attention_bound = len(lengths) * longest * longest
    # A layout within the bound has width <= attention_bound / total, so at least this many rows.
    fewest_rows = math.ceil(total * total / attention_bound)
    best_key, best_capacity = None, longest
    capacity: float = longest
    # A new layout from here on is at least `capacity` wide (a narrower one was met at its own width).
    for _ in range(MAX_PACKING_LAYOUTS):
        if capacity * total > attention_bound or (best_key is not None and capacity * fewest_rows > best_key[0]):
            break
        _, used, next_capacity = _first_fit_decreasing(lengths, int(capacity))
        rows, width = len(used), max(used)
        key = (rows * width, rows * width * width)
        if key[1] <= attention_bound and (best_key is None or key < best_key):
            best_key, best_capacity = key, int(capacity)
        capacity = next_capacity
    return best_capacity


def pack_batch(
    batch_ids: Sequence[Sequence[int]],
    pad_id: int,
    row_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pack encoded sentences into rows without attention across sentences.

    Each sentence is placed by :func:`pack_placements`; position ids restart
    at 0 at every sentence. A row shorter than the longest one ends with pads
    that form a segment of their own (positions restarting at 0 too), so
    nothing attends to them. There is no attention mask: transformers then
    finds the segments in the position ids and builds a block-diagonal causal
    mask (sdpa, eager; flash attention's varlen path needs a single row). The
    labels are the padded batch's targets: ``IGNORE_INDEX`` at every start
    token and pad, so no sentence's last token is asked to predict the next.

    Args:
        batch_ids: B lists of token ids, each starting with the start token.
        pad_id: id written into the pad segments.
        row_tokens: the most tokens of one row; None packs everything into one row.

    Returns:
        ``input_ids``, ``position_ids``, ``labels`` (LongTensors [R, L], R rows
        of the longest row's L tokens) and ``use_cache`` False: transformers only
        looks for packed segments when there is no key/value cache, and a causal
        LM builds one from ``config.use_cache``, in train mode too.
    """
    lengths = [len(ids) for ids in batch_ids]
    placements = pack_placements(lengths, row_tokens)
    rows = 1 + max(row for row, _ in placements)
    used = [0] * rows
    for (row, start), length in zip(placements, lengths):
        used[row] = max(used[row], start + length)
    width = max(used)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    # Every column a pad until a sentence is written over it; pad segments count from 0 where they start.
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    for row in range(rows):
        position_ids[row, used[row]:] = torch.arange(width - used[row])
    for ids, (row, start) in zip(batch_ids, placements):
        ids_tensor = torch.as_tensor(list(ids), dtype=torch.long)
        span = slice(start, start + len(ids))
        input_ids[row, span] = ids_tensor
        labels[row, span] = ids_tensor
        labels[row, start] = IGNORE_INDEX  # the start token is context, not a target
        position_ids[row, span] = torch.arange(len(ids))
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "use_cache": False}
