"""ftflow.tokens: the one encoding convention shared by scoring, training and distillation."""

from __future__ import annotations

import pytest
import torch

from ftflow.tokens import IGNORE_INDEX, pad_batch, pad_token_id, sentence_ids, start_token_id
from tests.tiny import tiny_tokenizer

# Ids in tests.tiny: <pad>=0, <unk>=1, <s>=2, </s>=3, then WORDS from 4.
PAD, UNK, BOS, EOS = 0, 1, 2, 3
THE, A, CAT, DOG, SAT = 4, 5, 6, 7, 9
X = IGNORE_INDEX


class _BareTokenizer:
    """Only the special-token attributes tokens.py reads."""

    def __init__(self, bos=None, eos=None, pad=None):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad
        self.name_or_path = "bare"


def test_start_token_is_bos_when_there_is_one():
    assert start_token_id(tiny_tokenizer()) == BOS


def test_start_token_falls_back_to_eos_without_bos():
    assert start_token_id(tiny_tokenizer(with_bos=False)) == EOS


def test_start_token_without_bos_or_eos_is_an_error():
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        start_token_id(_BareTokenizer())


def test_pad_token_fallbacks():
    assert pad_token_id(tiny_tokenizer()) == PAD
    assert pad_token_id(_BareTokenizer(bos=7, eos=9)) == 9
    assert pad_token_id(_BareTokenizer(bos=7)) == 7


def test_sentence_ids_prepends_bos_and_no_other_special_token():
    assert sentence_ids(tiny_tokenizer(), "the cat sat", max_length=2048) == ([BOS, THE, CAT, SAT], False)


def test_sentence_ids_prepends_eos_without_bos():
    assert sentence_ids(tiny_tokenizer(with_bos=False), "the cat sat", max_length=2048) == (
        [EOS, THE, CAT, SAT],
        False,
    )


def test_sentence_ids_truncation_flag_counts_the_start_token():
    tokenizer = tiny_tokenizer()
    # 1 start + 3 words = 4 tokens: a limit of 4 keeps everything, 3 cuts one word.
    assert sentence_ids(tokenizer, "the cat sat", max_length=4) == ([BOS, THE, CAT, SAT], False)
    assert sentence_ids(tokenizer, "the cat sat", max_length=3) == ([BOS, THE, CAT], True)
    assert sentence_ids(tokenizer, "the cat sat", max_length=2) == ([BOS, THE], True)


def test_sentence_ids_rejects_max_length_below_two():
    with pytest.raises(ValueError, match="at least 2"):
        sentence_ids(tiny_tokenizer(), "the cat", max_length=1)


def test_blank_sentence_encodes_to_the_start_token_only():
    assert sentence_ids(tiny_tokenizer(), "   ", max_length=8) == ([BOS], False)


def test_pad_batch_right():
    batch = pad_batch([[BOS, THE, CAT, SAT], [BOS, A]], pad_id=PAD, padding_side="right")
    assert batch["input_ids"].tolist() == [[BOS, THE, CAT, SAT], [BOS, A, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 1, 1]]
    # The start token and pads are not targets.
    assert batch["labels"].tolist() == [[X, THE, CAT, SAT], [X, A, X, X]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_batch_left():
    batch = pad_batch([[BOS, THE, CAT, SAT], [BOS, A]], pad_id=PAD, padding_side="left")
    assert batch["input_ids"].tolist() == [[BOS, THE, CAT, SAT], [PAD, PAD, BOS, A]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    # Positions restart at 0 on the first real token, as they would with right padding.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    # Left pads would otherwise be asked to predict the start token after the shift.
    assert batch["labels"].tolist() == [[X, THE, CAT, SAT], [X, X, X, A]]


def test_pad_batch_start_token_masked_even_when_it_equals_the_pad_id():
    # Qwen2-style: start token is EOS and pads may be EOS too; masking goes by position, not id.
    batch = pad_batch([[EOS, DOG], [EOS, THE, CAT]], pad_id=EOS, padding_side="left")
    assert batch["input_ids"].tolist() == [[EOS, EOS, DOG], [EOS, THE, CAT]]
    assert batch["labels"].tolist() == [[X, X, DOG], [X, THE, CAT]]


def test_pad_batch_rejects_unknown_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch([[BOS, A]], pad_id=PAD, padding_side="middle")
