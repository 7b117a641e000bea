"""Reading the task's sentences and holding out a validation split.

Files are read in memory (plain text one sentence per line, JSONL with a text
field, CSV with a named column), so reading leaves nothing behind outside the
artifacts directory. Problems that would otherwise show up deep inside
training (a missing file, bad encoding, a bad line, too few sentences) are
caught here with the file's name, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ftflow.config import FORMATS
from ftflow.errors import UserError

log = logging.getLogger(__name__)

# Below this many training sentences a run still goes ahead, with a warning: at the default validation
# fraction (0.1) the split every choice is made on then has fewer than 10 sentences.
MIN_TRAIN_SENTENCES = 100


class DataError(UserError, ValueError):
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


def _check_readable(path: Path) -> str:
    """The file's text (UTF-8, a byte-order mark dropped), or a :class:`DataError` saying what is wrong."""
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
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"data file {path} is not UTF-8 (invalid byte at offset {exc.start}, line {line}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from None


def _json_records(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) of a JSON Lines file, or of a ``.json`` file holding one array."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"data file {path}, line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(records, list):
            raise DataError(f"data file {path}: expected a JSON array of objects or JSON Lines")
        yield from ((0, record) for record in records)  # one document: no line per record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data file {path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno}); "
                f"each line of a JSON Lines file must be one object, e.g. {{\"text\": \"a sentence\"}}: {line[:80]!r}"
            ) from None


def _column_values(path: Path, text: str, builder: str, column: str) -> list:
    """The values of the sentence field (JSONL) or column (CSV), None where a record lacks it."""
    if builder == "json":
        values, fields = [], set()
        for number, record in _json_records(path, text):
            if not isinstance(record, dict):
                where = f"line {number}" if number else "an array element"
                raise DataError(f"data file {path}, {where}: expected a JSON object with a {column!r} field, "
                                f"got {type(record).__name__}")
            fields.update(record)
            values.append(record.get(column))
        if values and column not in fields:
            raise DataError(f"data file {path} has no {column!r} field; its fields are {sorted(fields)}. "
                            "Set data.text_column to the one holding the sentences.")
        return values
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows)
        if column not in header:
            raise DataError(f"data file {path} has no {column!r} field; its fields are {header}. "
                            "Set data.text_column to the one holding the sentences.")
        index, values = header.index(column), []
        for row in rows:
            if not row:
                continue  # an empty line
            if len(row) != len(header):
                raise DataError(f"data file {path}, line {rows.line_num}: {len(row)} field(s) where the header has "
                                f"{len(header)} ({header}); quote fields that contain commas")
            values.append(row[index])
    except csv.Error as exc:
        raise DataError(f"data file {path}, line {rows.line_num}: not valid CSV ({exc})") from None
    return values


def read_sentences(path: str | Path, text_column: str = "text") -> SentenceFile:
    """Read one file of sentences, dropping (and counting) blank ones.

    The file is parsed in memory (Python's ``json`` and ``csv``), so reading
    writes nothing anywhere (no ``datasets`` cache) and a bad record is
    reported with its line number.

    Args:
        path: a ``.txt`` (one sentence per line), ``.jsonl`` / ``.json`` (JSON Lines, or one array of
            objects) or ``.csv`` (with a header row) file.
        text_column: the JSONL field or CSV column holding the sentence.

    Returns:
        The stripped, non-blank sentences in file order.
    """
    path = Path(path)
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"data file {path} has an unknown extension {path.suffix!r}; use one of {sorted(FORMATS)}"
        )
    text = _check_readable(path)
    values = text.splitlines() if builder == "text" else _column_values(path, text, builder, text_column)
    sentences: list[str] = []
    blank = 0
    for value in values:
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
    """Hold out validation from train and report sentences shared with test.

    A train file of fewer than 2 sentences is refused (validation is held out of it); one of fewer
    than :data:`MIN_TRAIN_SENTENCES` is used, with a warning in ``stats["warnings"]`` (the
    prepare_data stage logs it).
    """
    count = len(train_file.sentences)
    if count < 2:
        raise DataError(
            f"data file {train_file.path} has {count} training sentence(s); ftflow holds a validation split "
            f"out of the training sentences, so it needs at least 2 (and warns below {MIN_TRAIN_SENTENCES})"
        )
    train, validation = hold_out_validation(train_file.sentences, fraction, seed)
    warnings = []
    if count < MIN_TRAIN_SENTENCES:
        warnings.append(
            f"data file {train_file.path} has only {count} training sentence(s) (fewer than "
            f"{MIN_TRAIN_SENTENCES}): models train on {len(train)} and every choice is made on {len(validation)} "
            "validation sentence(s), too few for the perplexities to mean much"
        )
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
        "warnings": warnings,
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
