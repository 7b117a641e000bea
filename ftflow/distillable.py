"""Whether a teacher can be distilled into a student at all: their tokenizers and embeddings, read from disk.

Distillation compares the two models' probabilities token by token, so it
needs one tokenizer (:func:`ftflow.distill.check_distillable`). The study
distils whenever that holds; this answers it before the teacher pass, from the
tokenizer files and configs only (no weights), so that a pair it does not
hold for is skipped with the reason instead of failing the run.
"""

from __future__ import annotations

from typing import Mapping, Optional


def distillation_problem(teacher: Mapping, student: Mapping) -> Optional[str]:
    """Why ``teacher`` cannot be distilled into ``student`` (one line), or None when it can.

    Args:
        teacher: the teacher model (``name``, ``path``, ``trust_remote_code``).
        student: the student model, the same keys.
    """
    from ftflow.distill import check_distillable, embedding_rows
    from ftflow.models import ModelLoadError, load_tokenizer

    try:
        check_distillable(load_tokenizer(teacher["path"], teacher["trust_remote_code"]),
                          load_tokenizer(student["path"], student["trust_remote_code"]),
                          embedding_rows(teacher["path"], teacher["trust_remote_code"]),
                          embedding_rows(student["path"], student["trust_remote_code"]),
                          teacher["name"], student["name"])
    except (ValueError, ModelLoadError) as exc:
        return str(exc)
    return None
