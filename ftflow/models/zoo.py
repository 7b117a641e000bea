"""The offline model zoo: small Hugging Face checkpoints built and pretrained here.

Each family mirrors one of the study's families (Granite, Llama, Qwen2): one
byte-level BPE tokenizer trained with ``tokenizers``, a student and a larger
teacher that share it, both pretrained briefly on a general corpus (plus the
task's training sentences, ``zoo.task_text``) so that their baselines differ
for real reasons (size, architecture, tokenizer). Like a real family's larger
model, each teacher must beat its student on the task before fine-tuning: the
zoo scores both on the selection split and pretrains a teacher that loses for
more rounds (:func:`build_zoo`).

Every checkpoint is an ordinary Hugging Face directory (``config.json``,
``model.safetensors``, ``tokenizer.json``...), so downstream code loads it with
``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` exactly as it would load a hub id.

Layout written by :func:`build_zoo`::

    out_dir/<family>-student/
    out_dir/<family>-teacher/
"""

from __future__ import annotations

import math
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from ftflow import perplexity
from ftflow.data import synthetic
from ftflow import tokens
from ftflow.device import free_memory
from ftflow.config import Architecture, ZooConfig, ZooSize, zoo_size_problems

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""Special tokens of every zoo tokenizer; they take ids 0-3 in this order."""

TOKENIZER_SAMPLE_FRACTION = 0.8
"""Share of the corpus, drawn with the tokenizer's seed, that its BPE merges are learnt from."""

ROLES = ("student", "teacher")

CHECK_BATCH_SIZE = 32
"""Sentences per forward pass when the zoo scores its models on the check split (the result does not depend on it)."""

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "granite": GraniteConfig,
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
}
# Like the real small checkpoints: Granite 3.x 2B and Qwen2 0.5B tie input and
# output embeddings, Llama / TinyLlama do not.
_TIE_WORD_EMBEDDINGS: dict[str, bool] = {"granite": True, "llama": False, "qwen2": True}


DECLARED_CONTEXT = 2048


def train_tokenizer(sentences: Sequence[str], vocab_size: int, seed: int, with_bos: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 / Qwen2 style).

    BPE training itself has no randomness, so ``seed`` chooses the sample it
    learns from: a seeded :data:`TOKENIZER_SAMPLE_FRACTION` of ``sentences``.
    Families trained with different seeds thus get genuinely different merges,
    as real families' tokenizers come from different corpora.

    Byte-level means every string is encodable (no ``<unk>`` in practice) and
    decoding gives back the exact text; no prefix space is added, so the first
    word of a sentence keeps its own token (``the``) and later words carry
    their space (``Ġthe``).

    Args:
        sentences: training text, one sentence per item.
        vocab_size: target vocabulary, special tokens and the 256 byte
            symbols included; fewer if the text runs out of pairs to merge.
        seed: seed of the training sample.
        with_bos: declare ``<s>`` as BOS; without it (as in Qwen2's tokenizer)
            ftflow starts every sentence with EOS instead.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>``, ``<unk>``, ``<s>`` (BOS) and
        ``</s>`` (EOS) at ids 0-3, which adds no special tokens on its own
        (ftflow prepends the start token itself, see :mod:`ftflow.tokens`).
    """
    if not sentences:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(SPECIAL_TOKENS) + len(byte_alphabet)
    if vocab_size <= smallest:
        raise ValueError(f"vocab_size must exceed {smallest} (4 special tokens + 256 bytes), got {vocab_size}")

    generator = torch.Generator().manual_seed(seed)
    sample_size = max(1, round(TOKENIZER_SAMPLE_FRACTION * len(sentences)))
    # Sorted so the sample, not the order, depends on the seed (BPE counts pairs anyway).
    picked = sorted(torch.randperm(len(sentences), generator=generator)[:sample_size].tolist())
    sample = [sentences[i] for i in picked]

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front: text the sample never showed still encodes.
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(sample, trainer=trainer, length=len(sample))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN if with_bos else None,
        eos_token=EOS_TOKEN,
        # The default clean-up rewrites " ," and " 's", which would break round trips.
        clean_up_tokenization_spaces=False,
    )


def model_config(
    architecture: Architecture,
    size: ZooSize,
    tokenizer: PreTrainedTokenizerFast,
    max_position_embeddings: int,
) -> PretrainedConfig:
    """The transformers config of one zoo model.

    Args:
        architecture: ``"granite"``, ``"llama"`` or ``"qwen2"``.
        size: width, depth and heads.
        tokenizer: the family's tokenizer; sets the vocabulary and special ids.
        max_position_embeddings: longest sequence the model declares it handles.

    Returns:
        A ``GraniteConfig``, ``LlamaConfig`` or ``Qwen2Config`` in fp32, with
        the library's defaults for everything not listed here (Granite's
        multipliers stay 1.0).
    """
    if architecture not in _CONFIG_CLASSES:
        raise ValueError(f"architecture must be one of {sorted(_CONFIG_CLASSES)}, got {architecture!r}")
    problems = zoo_size_problems(size, architecture)
    if problems:
        raise ValueError("; ".join(problems))
    return _CONFIG_CLASSES[architecture](
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=_TIE_WORD_EMBEDDINGS[architecture],
        dtype="float32",
    )


def _lr_factor(step: int, total_steps: int) -> float:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, round(0.1 * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batch_order(n_items: int, total: int, generator: torch.Generator) -> list[int]:
    """``total`` indices: whole shuffled passes over ``n_items`` items, one after another."""
    order: list[int] = []
    while len(order) < total:
        order.extend(torch.randperm(n_items, generator=generator).tolist())
    return order[:total]


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    corpus: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "pretrain",
) -> list[float]:
    """Pretrain ``model`` in place with next-token cross-entropy on ``corpus``.

    Sentences are encoded with :func:`ftflow.tokens.sentence_ids` and batched
    with :func:`ftflow.tokens.pad_batch`, the convention scoring uses, so the
    loss lowered here is the perplexity reported later. Batches are whole
    shuffled passes over the corpus (seeded); AdamW with a short warmup and a
    cosine decay; gradients clipped at norm 1.

    Args:
        model: a causal LM; left in eval mode, on ``device``.
        tokenizer: its tokenizer.
        corpus: training sentences.
        steps: optimizer steps.
        batch_size: sentences per step.
        learning_rate: peak learning rate.
        max_length: tokens kept per sentence, start token included.
        seed: seed of the batch order.
        device: where to train.
        progress: show a progress bar.
        description: label of the progress bar.

    Returns:
        The training loss of every step (mean over the batch's target tokens).
    """
    if not corpus:
        raise ValueError("cannot pretrain on an empty corpus")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    encoded = [tokens.sentence_ids(tokenizer, sentence, max_length)[0] for sentence in corpus]
    pad_id = tokens.pad_token_id(tokenizer)
    order = _batch_order(len(encoded), steps * batch_size, torch.Generator().manual_seed(seed))

    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    losses: list[float] = []
    for step in tqdm(range(steps), desc=description, disable=not progress, leave=False):
        rows = order[step * batch_size : (step + 1) * batch_size]
        batch = tokens.pad_batch([encoded[i] for i in rows], pad_id)
        loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Write model (safetensors) and tokenizer into ``directory``, replacing it whole.

    The files go to a temporary sibling first and are renamed into place, so
    a crash never leaves a half-written directory that looks finished.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    # transformers 5 always writes safetensors (its `safe_serialization` switch is gone).
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)


def _stable_offset(text: str) -> int:
    """A small seed offset that depends only on ``text`` (``hash`` changes per process)."""
    return zlib.crc32(text.encode("utf-8")) % 100_000


def zoo_problems(cfg: ZooConfig) -> list[str]:
    """Every reason the zoo in ``cfg`` cannot be built (empty when it can)."""
    problems = []
    names = [family.name for family in cfg.families]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"zoo family names must be unique; repeated: {repeated}")
    for family in cfg.families:
        for role in ROLES:
            problems.extend(zoo_size_problems(getattr(family, role), f"zoo.families[{family.name}].{role}"))
    return problems


@dataclass(frozen=True)
class TeacherCheck:
    """Sentences of the task on which each family's teacher must beat its student before fine-tuning.

    Attributes:
        sentences: the task's selection split (validation by default).
        split: its name, for logs and the manifest.
        max_length: tokens kept per sentence, as the benchmark scores them.
    """

    sentences: Sequence[str]
    split: str = "validation"
    max_length: int = 2048


def _check_ppl(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, check: TeacherCheck) -> float:
    return perplexity.score_sentences(model, tokenizer, list(check.sentences), batch_size=CHECK_BATCH_SIZE,
                                      max_length=check.max_length, progress=False).corpus_ppl


def _pretrain_round(cfg: ZooConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                    corpus: Sequence[str], name: str, steps: int, round_index: int, device,
                    progress: bool) -> list[float]:
    """One round of ``steps`` pretraining steps of the model ``name``; each round draws its own batch order."""
    return pretrain(model, tokenizer, corpus, steps=steps, batch_size=cfg.batch_size,
                    learning_rate=cfg.learning_rate, max_length=cfg.max_length,
                    seed=cfg.seed + _stable_offset(name) + round_index, device=device, progress=progress,
                    description=name if round_index == 0 else f"{name} round {round_index + 1}")


def scaled_teacher_steps(cfg: ZooConfig, student_parameters: int, teacher_parameters: int) -> int:
    """Steps of a teacher's pretraining round: ``zoo.teacher_pretrain_steps``, or unset, ``pretrain_steps`` scaled
    by the square root of the teacher's size over its student's (a larger model needs more tokens; the square
    root keeps the CPU time of the offline zoo reasonable)."""
    if cfg.teacher_pretrain_steps is not None:
        return cfg.teacher_pretrain_steps
    return max(1, round(cfg.pretrain_steps * math.sqrt(teacher_parameters / student_parameters)))


def beats_by_margin(teacher_ppl: float, student_ppl: float, margin: float) -> bool:
    """Whether the teacher's PPL is at least ``margin`` (a share) below its student's: a teacher worth the name."""
    return teacher_ppl <= (1.0 - margin) * student_ppl


def _teacher_check_line(family: str, record: dict) -> str:
    """One line on a family's check: both figures, the pretraining it took, and what to change if it failed."""
    rounds = record["teacher_ppl_by_round"]
    pretraining = f"teacher pretrained {record['teacher_steps']} steps"
    if len(rounds) > 1:
        pretraining += f" in {len(rounds)} rounds, PPL " + " -> ".join(f"{ppl:.2f}" for ppl in rounds)
    ahead = 100.0 * (1.0 - record["teacher_ppl"] / record["student_ppl"])
    margin = record.get("margin", 0.0)
    head = (f"zoo check, family {family}: teacher {record['split']} PPL {record['teacher_ppl']:.4f} vs student "
            f"{record['student_ppl']:.4f} before fine-tuning, {ahead:+.1f}% lower (margin {100 * margin:g}%; "
            f"{pretraining}; student {record['student_steps']}): ")
    if record["beats"]:
        return head + "the teacher beats its student"
    return head + ("the teacher does NOT beat its student by the margin, so distillation will have little to learn "
                   "from it: give the zoo real text of the task's domain (zoo.corpus_file, zoo.task_text: true), or "
                   "more teacher pretraining (zoo.teacher_pretrain_steps, zoo.teacher_extra_rounds)")


def build_zoo(
    cfg: ZooConfig,
    corpus: Sequence[str],
    out_dir: Path,
    *,
    check: Optional[TeacherCheck] = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    warn: Optional[Callable[[str], None]] = None,
) -> dict:
    """Build, pretrain and save every family of the zoo, each teacher checked against its student.

    For each family: one tokenizer (seeded by ``cfg.seed`` and the family's
    name, so families get different tokenizers), then a student and a teacher
    initialised and pretrained with seeds derived the same way (the teacher
    for :func:`scaled_teacher_steps`). With ``check``, both are scored on the
    task's sentences (corpus PPL); while the teacher does not beat its
    student by ``cfg.teacher_margin`` (:func:`beats_by_margin`) it is
    pretrained one more round of the same steps (a warm restart of the
    schedule, on a new batch order), at most ``cfg.teacher_extra_rounds`` times. A teacher that still loses is saved
    all the same, and the failure is logged (``warn``) and recorded. Results
    depend only on ``cfg``, ``corpus`` and ``check`` (and on the device's
    arithmetic), not on the order of the families; the caller's global torch
    RNG is left as it was.

    Args:
        cfg: the zoo section of the pipeline config.
        corpus: pretraining sentences (see :func:`load_corpus`).
        out_dir: where ``<family>-student/`` and ``<family>-teacher/`` are written.
        check: the task's selection split; None: no check (and no extra rounds).
        device: where to pretrain.
        progress: show a progress bar per model.
        log: receives one line per model and per check.
        warn: receives the line of a check that failed (default: ``log``).

    Returns:
        A JSON-ready manifest: ``{"families": [{"name", "architecture",
        "members": [{"name", "role", "path", "parameters", "pretrain_steps",
        "final_pretrain_loss"}, ...], "teacher_check": {...} or None}],
        "corpus_sentences": int}``, where ``final_pretrain_loss`` is the mean
        loss of the last 10 steps (or fewer) and ``teacher_check`` holds
        ``split``, ``student_ppl``, ``teacher_ppl``, ``teacher_ppl_by_round``,
        ``student_steps``, ``teacher_steps``, ``margin``, ``beats`` and ``line``.
    """
    problems = zoo_problems(cfg)
    if problems:
        raise ValueError("cannot build the zoo:\n" + "\n".join(f"  - {p}" for p in problems))
    if not corpus:
        raise ValueError("cannot build the zoo from an empty corpus")
    if check is not None and not check.sentences:
        raise ValueError("the zoo's teacher check needs sentences of the task; got none")
    warn = warn or log
    out_dir = Path(out_dir)
    families = []
    for family in cfg.families:
        # Like the real families: Qwen2's tokenizer has no BOS, so its sentences start with EOS.
        tokenizer = train_tokenizer(corpus, cfg.vocab_size, seed=cfg.seed + _stable_offset(family.name),
                                    with_bos=family.architecture != "qwen2")
        # Declare the study's context length, not the short pretraining length: rotary
        # position embeddings have no parameters, and scoring runs up to max_length 2048.
        tokenizer.model_max_length = max(cfg.max_length, DECLARED_CONTEXT)
        members, ppl_by_round = [], {}  # per role: its check PPL after each pretraining round
        for role in ROLES:
            name = f"{family.name}-{role}"
            config = model_config(family.architecture, getattr(family, role), tokenizer, tokenizer.model_max_length)
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + _stable_offset(name))
                model = AutoModelForCausalLM.from_config(config)
                steps = (cfg.pretrain_steps if role == "student" else
                         scaled_teacher_steps(cfg, members[0]["parameters"], sum(p.numel() for p in model.parameters())))
                losses = _pretrain_round(cfg, model, tokenizer, corpus, name, steps, 0, device, progress)
                total_steps, by_round = steps, []
                if check is not None:
                    by_round.append(_check_ppl(model, tokenizer, check))
                    # The teacher must beat its student by the margin; more rounds while it does not.
                    while (role == "teacher" and not beats_by_margin(by_round[-1], ppl_by_round["student"][-1],
                                                                     cfg.teacher_margin)
                           and len(by_round) <= cfg.teacher_extra_rounds):
                        log(f"zoo: {name} {check.split} PPL {by_round[-1]:.4f} does not beat its student's "
                            f"{ppl_by_round['student'][-1]:.4f} by {100 * cfg.teacher_margin:g}% after {total_steps} "
                            f"steps; pretraining {steps} more (round {len(by_round) + 1} of at most "
                            f"{cfg.teacher_extra_rounds + 1})")
                        losses = _pretrain_round(cfg, model, tokenizer, corpus, name, steps, len(by_round), device,
                                                 progress)
                        total_steps += steps
                        by_round.append(_check_ppl(model, tokenizer, check))
                    ppl_by_round[role] = by_round
            seconds = time.perf_counter() - started
            path = out_dir / name
            save_checkpoint(model, tokenizer, path)
            parameters = sum(p.numel() for p in model.parameters())
            final_loss = sum(losses[-10:]) / len(losses[-10:])
            log(
                f"zoo: {name} ({family.architecture}, {parameters:,} parameters, vocab {len(tokenizer)}): "
                f"pretrain loss {losses[0]:.3f} -> {final_loss:.3f} in {total_steps} steps, {seconds:.1f}s"
                + (f"; {check.split} PPL {by_round[-1]:.4f}" if check is not None else "")
            )
            members.append(
                {
                    "name": name,
                    "role": role,
                    "path": str(path),
                    "parameters": parameters,
                    "pretrain_steps": total_steps,
                    "final_pretrain_loss": final_loss,
                }
            )
            del model
            free_memory(device)  # the next model is built with this one gone
        record = None
        if check is not None:
            student_ppl, teacher_ppl = ppl_by_round["student"][-1], ppl_by_round["teacher"][-1]
            record = {"split": check.split, "student_ppl": student_ppl, "teacher_ppl": teacher_ppl,
                      "teacher_ppl_by_round": ppl_by_round["teacher"],
                      "student_steps": members[0]["pretrain_steps"], "teacher_steps": members[1]["pretrain_steps"],
                      "margin": cfg.teacher_margin, "beats": beats_by_margin(teacher_ppl, student_ppl,
                                                                              cfg.teacher_margin)}
            record["line"] = _teacher_check_line(family.name, record)
            (log if record["beats"] else warn)(record["line"])
        families.append({"name": family.name, "architecture": family.architecture, "members": members,
                         "teacher_check": record})
    return {"families": families, "corpus_sentences": len(corpus)}


def read_corpus_file(path: Path, max_sentences: int) -> list[str]:
    """The first ``max_sentences`` non-blank lines of a UTF-8 text file, stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: the file is not UTF-8 or has no non-blank line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"zoo corpus_file {path} does not exist or is not a file; give a UTF-8 .txt file with one "
            "sentence per line, or leave corpus_file unset to generate one"
        )
    sentences: list[str] = []
    # Read lazily: a large corpus is cut at max_sentences without loading it whole.
    # utf-8-sig drops a byte-order mark instead of gluing it to the first sentence.
    with path.open(encoding="utf-8-sig", errors="strict") as handle:
        try:
            for line in handle:
                text = line.strip()
                if text:
                    sentences.append(text)
                    if len(sentences) >= max_sentences:
                        break
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.start + 4]
            raise ValueError(
                f"zoo corpus_file {path} is not UTF-8 text ({exc.reason}, bytes {bad!r}); re-encode it as UTF-8"
            ) from None
    if not sentences:
        raise ValueError(f"zoo corpus_file {path} has no sentences (it is empty or only blank lines)")
    return sentences


def load_corpus(cfg: ZooConfig, task_sentences: Sequence[str] = ()) -> list[str]:
    """The zoo's pretraining sentences: ``cfg.corpus_file`` or generated general text, then the task's.

    Args:
        cfg: the zoo config; ``corpus_sentences`` caps the lines read, or sets
            how many sentences are generated (seeded by ``cfg.seed``).
        task_sentences: the task's training split, appended when
            ``cfg.task_text`` is on (the caller passes nothing else of the task).

    Returns:
        Sentences, one per item, blank lines dropped.
    """
    if cfg.corpus_file is None:
        general = synthetic.generate_sentences(cfg.corpus_sentences, cfg.seed, "general")
    else:
        general = read_corpus_file(cfg.corpus_file, cfg.corpus_sentences)
    return general + list(task_sentences) if cfg.task_text else general
