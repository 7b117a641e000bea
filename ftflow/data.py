"""Reading the task's sentences and holding out a validation split.

Files are read with ``datasets`` (plain text one sentence per line, JSONL with
a text field, CSV with a named column). Problems that would otherwise show up
deep inside training (a missing file, bad encoding, no sentences) are caught
here with the file's name and the fix.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DataError(ValueError):
    """A data file ftflow cannot use; the message names the file and the fix."""


@dataclass(frozen=True)
class SentenceFile:
    """The sentences read from one file and what was dropped on the way."""

    path: str
    sentences: tuple[str, ...]
    blank_dropped: int


@dataclass(frozen=True)
class Splits:
    """Train, validation (held out of train) and test sentences, with bookkeeping."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    stats: dict = field(default_factory=dict)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check data.train_file / data.test_file in the config")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data file {path} cannot be read ({exc.strerror}); check its permissions") from None
    if not raw.strip():
        raise DataError(f"data file {path} is empty; it needs at least one sentence")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {path} is not UTF-8 (invalid byte at offset {exc.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from None


def read_sentences(path: str | Path, text_column: str = "text") -> SentenceFile:
    """Read one file of sentences, dropping (and counting) blank ones.

    Args:
        path: a ``.txt`` (one sentence per line), ``.jsonl`` or ``.csv`` file.
        text_column: the JSONL field or CSV column holding the sentence.

    Returns:
        The stripped, non-blank sentences in file order.
    """
    import datasets  # heavy: imported where used

    path = Path(path)
    _check_readable(path)
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"data file {path} has an unknown extension {path.suffix!r}; use one of {sorted(FORMATS)}"
        )
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in several types
        raise DataError(f"data file {path} could not be parsed as {builder}: {exc}") from None
    if builder == "text":
        column = "text"
    else:
        column = text_column
        if column not in table.column_names:
            raise DataError(
                f"data file {path} has no {column!r} field; its fields are {table.column_names}. "
                "Set data.text_column to the one holding the sentences."
            )
    sentences: list[str] = []
    blank = 0
    for value in table[column]:
        text = "" if value is None else str(value).strip()
        if text:
            sentences.append(text)
        else:
            blank += 1
    if not sentences:
        raise DataError(f"data file {path} has no non-blank sentences ({blank} blank)")
    return SentenceFile(path=str(path), sentences=tuple(sentences), blank_dropped=blank)


def hold_out_validation(sentences: tuple[str, ...], fraction: float, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split train into (train, validation) with a seeded shuffle; both keep file order."""
    if len(sentences) < 2:
        raise DataError(f"need at least 2 training sentences to hold out a validation split, got {len(sentences)}")
    n_validation = min(len(sentences) - 1, max(1, round(len(sentences) * fraction)))
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_validation])
    train = tuple(s for i, s in enumerate(sentences) if i not in held)
    validation = tuple(s for i, s in enumerate(sentences) if i in held)
    return train, validation


def make_splits(train_file: SentenceFile, test_file: SentenceFile, fraction: float, seed: int) -> Splits:
    """Hold out validation from train and report sentences shared with test."""
    train, validation = hold_out_validation(train_file.sentences, fraction, seed)
    test_set = set(test_file.sentences)
    overlap = sorted({s for s in train_file.sentences if s in test_set})
    if overlap:
        log.warning(
            "%d distinct sentence(s) appear in both train and test (e.g. %r); test perplexity of trained "
            "models is optimistic for them",
            len(overlap),
            overlap[0],
        )
    stats = {
        "train_file": train_file.path,
        "test_file": test_file.path,
        "blank_dropped": {"train": train_file.blank_dropped, "test": test_file.blank_dropped},
        "sentences": {"train": len(train), "validation": len(validation), "test": len(test_file.sentences)},
        "train_test_overlap": {"count": len(overlap), "examples": overlap[:5]},
    }
    return Splits(train=train, validation=validation, test=test_file.sentences, stats=stats)


def write_split(path: Path, sentences: tuple[str, ...] | list[str], extra: list[dict] | None = None) -> None:
    """Write sentences as JSONL records ``{"id", "text", ...extra}``."""
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(sentences):
            record = {"id": i, "text": text}
            if extra is not None:
                record.update(extra[i])
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_split(path: str | Path) -> list[str]:
    """The sentences of a split written by :func:`write_split`."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def read_records(path: str | Path) -> list[dict]:
    """All records of a split written by :func:`write_split`."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
