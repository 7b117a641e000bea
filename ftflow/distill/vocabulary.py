"""Whether a teacher can be distilled into a student: one tokenizer, and the ids their probabilities are
compared over.

Distillation compares the two models' probabilities token by token, so it needs one tokenizer
(:func:`check_distillable`). The study distils whenever that holds; :func:`distillation_problem` answers it
before the teacher pass, from the tokenizer files and configs only (no weights), so that a pair it does not hold
for is skipped with the reason instead of failing the run; :func:`check_store_for_student` checks stored teacher
targets before every distillation run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import transformers

from ftflow.distill.store import TeacherTopK
from ftflow.tokens import start_token_id

logger = logging.getLogger(__name__)


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
                         "(ftflow.distill.teacher.teacher_topk_for_student)")
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


def distillation_problem(teacher: Mapping, student: Mapping) -> Optional[str]:
    """Why ``teacher`` cannot be distilled into ``student`` (one line), or None when it can.

    Args:
        teacher: the teacher model (``name``, ``path``, ``trust_remote_code``).
        student: the student model, the same keys.
    """
    from ftflow.models.loading import ModelLoadError, load_tokenizer

    try:
        check_distillable(load_tokenizer(teacher["path"], teacher["trust_remote_code"]),
                          load_tokenizer(student["path"], student["trust_remote_code"]),
                          embedding_rows(teacher["path"], teacher["trust_remote_code"]),
                          embedding_rows(student["path"], student["trust_remote_code"]),
                          teacher["name"], student["name"])
    except (ValueError, ModelLoadError) as exc:
        return str(exc)
    return None
