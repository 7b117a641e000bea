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
