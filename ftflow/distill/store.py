"""The teacher's stored targets (:class:`TeacherTopK`): per position of every training sentence, k ids
(its top-k, or k draws) with their log-probs (and for top-k the tail's mass), written once, read by every
distillation run."""


from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

TOPK_FILE = "teacher_topk.safetensors"
META_FILE = "teacher_topk.json"
TOKENIZER_DIR = "teacher_tokenizer"
# 2: adds the float32 tail mass, the teacher's tokenizer and the shared vocabulary size.
# 3: adds the variant (topk or sampled) and the sampling seed.
FORMAT_VERSION = 3
VARIANTS = ("topk", "sampled")
"""What a teacher store holds per position: its top-k ids, or k ids sampled from it."""


# ------------------------------------------------------------- teacher top-k store


@dataclass
class TeacherTopK:
    """The teacher's sparse targets for a list of sentences, ragged and stored flat.

    Sentence ``i`` owns rows ``offsets[i]:offsets[i + 1]``, one per input
    position (see the module docstring for the alignment). ``variant``
    ``topk``: each row holds the top-k sorted by descending log-prob, so
    keeping its first ``k'`` columns is the top-k'. ``sampled``: each row
    holds k independent draws from the teacher, in draw order, so its first
    ``k'`` columns are a sample of k' draws; no tail is stored.

    Besides the top-k, each row keeps the log of the teacher's exact mass
    outside them (float32, one number per position): ``1 - sum p_topk`` from
    float16 log-probs loses the tail when it is small, and :func:`kd_loss`
    tempers that tail. The teacher's tokenizer travels with the store, so a
    distillation run can check that its student shares it.

    Attributes:
        ids: [P, k] int32 token ids, P = total positions over all sentences.
        logprobs: [P, k] float16 log-probs (temperature 1, normalized over the
            ``vocab_size`` ids).
        offsets: [N + 1] int64 row offsets, N = number of sentences.
        tail_logmass: [P] float32 log of the mass outside the stored top-k
            (``-inf`` when k covers the vocabulary); None when unknown
            (:meth:`tail_for_sentence` then derives it from the top-k).
        tokenizer: the teacher's tokenizer (required to save and to distill).
        teacher_name: the teacher's name, for messages and the manifest.
        teacher_rows: rows of the teacher's embedding (its logits' width).
        vocab_size: ids the log-probs are normalized over: the range shared
            with the student (``<= teacher_rows``; see :func:`check_distillable`).
        vocabulary_note: why the teacher's logits were cut to ``vocab_size``, or None.
        variant: ``topk`` or ``sampled`` (:data:`VARIANTS`).
        sample_seed: the seed of the draws (``sampled`` only).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    offsets: torch.Tensor
    tail_logmass: torch.Tensor | None = None
    tokenizer: Any = None
    teacher_name: str | None = None
    teacher_rows: int | None = None
    vocab_size: int | None = None
    vocabulary_note: str | None = None
    variant: str = "topk"
    sample_seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        elif self.variant == "sampled" and self.tail_logmass is not None:
            problems.append("a sampled store has no tail mass (tail_logmass must be None)")
        if self.ids.dim() != 2 or self.ids.dtype != torch.int32:
            problems.append(f"ids must be a 2-D int32 tensor, got {self.ids.dtype} {tuple(self.ids.shape)}")
        if self.logprobs.dtype != torch.float16 or tuple(self.logprobs.shape) != tuple(self.ids.shape):
            problems.append(
                f"logprobs must be float16 with the shape of ids {tuple(self.ids.shape)}, "
                f"got {self.logprobs.dtype} {tuple(self.logprobs.shape)}"
            )
        if self.tail_logmass is not None and (self.tail_logmass.dtype != torch.float32
                                              or tuple(self.tail_logmass.shape) != tuple(self.ids.shape[:1])):
            problems.append(f"tail_logmass must be float32 of shape [P] = {tuple(self.ids.shape[:1])}, got "
                            f"{self.tail_logmass.dtype} {tuple(self.tail_logmass.shape)}")
        if self.offsets.dim() != 1 or self.offsets.dtype != torch.int64 or self.offsets.numel() < 1:
            problems.append(f"offsets must be a non-empty 1-D int64 tensor, got {self.offsets.dtype} "
                            f"{tuple(self.offsets.shape)}")
        elif self.ids.dim() == 2:
            if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.ids.shape[0]:
                problems.append(f"offsets must run from 0 to the number of rows {self.ids.shape[0]}, got "
                                f"{int(self.offsets[0])}..{int(self.offsets[-1])}")
            if bool((self.offsets[1:] < self.offsets[:-1]).any()):
                problems.append("offsets must be non-decreasing")
        if problems:
            raise ValueError("TeacherTopK: " + "; ".join(problems))

    @property
    def k(self) -> int:
        """Log-probs stored per position."""
        return int(self.ids.shape[1])

    @property
    def n_sentences(self) -> int:
        """Number of sentences N."""
        return int(self.offsets.numel() - 1)

    @property
    def positions(self) -> int:
        """Total rows P over all sentences."""
        return int(self.ids.shape[0])

    def rows(self, i: int) -> int:
        """Number of stored rows (= input ids) of sentence ``i``."""
        self._check_index(i)
        return int(self.offsets[i + 1] - self.offsets[i])

    def for_sentence(self, i: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of sentence ``i``, optionally cut to its best ``k`` entries.

        Args:
            i: sentence index in [0, N).
            k: keep this many entries per row (<= stored k); None keeps all.

        Returns:
            ``(ids, logprobs)``: [n_i, k] int32 and [n_i, k] float16 views.
        """
        self._check_index(i)
        k = self._check_k(k)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[start:end, :k], self.logprobs[start:end, :k]

    def tail_for_sentence(self, i: int, k: int | None = None) -> torch.Tensor | None:
        """Log of the teacher's mass outside the best ``k`` entries, at each row of sentence ``i``.

        The mass outside the top-k' is the stored tail plus entries k'..k:
        summed, never subtracted from 1, so it keeps its precision.

        Returns:
            [n_i] float32 (``-inf`` where nothing is left), or None when the
            store has no tail (:func:`kd_loss` then derives it from the top-k).
        """
        self._check_index(i)
        k = self._check_k(k)
        if self.tail_logmass is None:
            return None
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        tail = self.tail_logmass[start:end]
        if k == self.k:
            return tail
        dropped = torch.logsumexp(self.logprobs[start:end, k:].float(), dim=-1)
        return torch.logaddexp(tail, dropped)

    def save(self, directory: Path) -> None:
        """Write the tensors, a JSON meta and (when known) the teacher's tokenizer into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"ids": self.ids.contiguous(), "logprobs": self.logprobs.contiguous(),
                   "offsets": self.offsets.contiguous()}
        if self.tail_logmass is not None:
            tensors["tail_logmass"] = self.tail_logmass.contiguous()
        save_file(tensors, str(directory / TOPK_FILE))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        meta = {
            "format_version": FORMAT_VERSION,
            "k": self.k,
            "n_sentences": self.n_sentences,
            "positions": self.positions,
            "ids_dtype": "int32",
            "logprobs_dtype": "float16",
            "offsets_dtype": "int64",
            "tail_logmass": ("float32, log of the teacher's mass outside the stored top-k at each row"
                             if self.tail_logmass is not None else None),
            "alignment": "one row per input id; row t is the prediction made at position t (of token t+1); "
                         + ("rows sorted by descending log-prob" if self.variant == "topk"
                            else "rows hold independent draws from the teacher, in draw order"),
            "variant": self.variant,
            "sample_seed": self.sample_seed,
            "teacher": self.teacher_name,
            "teacher_tokenizer": TOKENIZER_DIR if self.tokenizer is not None else None,
            "teacher_rows": self.teacher_rows,
            "vocab_size": self.vocab_size,
            "vocabulary_note": self.vocabulary_note,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "TeacherTopK":
        """Read what :meth:`save` wrote, checking the tensors against the JSON meta."""
        directory = Path(directory)
        missing = [name for name in (TOPK_FILE, META_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"teacher top-k directory {directory} lacks {missing}; recompute the teacher top-k")
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"teacher top-k in {directory} have format {meta.get('format_version')}, this ftflow "
                             f"reads format {FORMAT_VERSION}; recompute the teacher top-k")
        tensors = load_file(str(directory / TOPK_FILE))
        tokenizer = None
        if meta.get("teacher_tokenizer"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory / meta["teacher_tokenizer"]))
        topk = cls(ids=tensors["ids"], logprobs=tensors["logprobs"], offsets=tensors["offsets"],
                   tail_logmass=tensors.get("tail_logmass"), tokenizer=tokenizer, teacher_name=meta.get("teacher"),
                   teacher_rows=meta.get("teacher_rows"), vocab_size=meta.get("vocab_size"),
                   vocabulary_note=meta.get("vocabulary_note"), variant=meta["variant"],
                   sample_seed=meta.get("sample_seed"))
        found = {"k": topk.k, "n_sentences": topk.n_sentences, "positions": topk.positions}
        mismatched = {key: (meta.get(key), value) for key, value in found.items() if meta.get(key) != value}
        if mismatched:
            raise ValueError(f"teacher top-k in {directory} do not match their meta (meta, tensors): {mismatched}")
        return topk

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.n_sentences:
            raise IndexError(f"sentence index {i} out of range for {self.n_sentences} sentences")

    def _check_k(self, k: int | None) -> int:
        if k is None:
            return self.k
        if not 1 <= k <= self.k:
            raise ValueError(f"k must be in [1, {self.k}] (the stored top-k), got {k}")
        return k


