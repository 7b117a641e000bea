"""The CUDA path of ftflow, checked in one command: loading, scoring, training, memory and speed.

On a machine with a GPU (nothing is downloaded, no hub is needed)::

    python bench/gpu_check.py OUTDIR                      # every model but granite-8b, 480 s in all
    python bench/gpu_check.py OUTDIR --models qwen2 --budget-s 200
    python bench/gpu_check.py OUTDIR --memory-cap-gb 20 --models granite-8b --budget-s 540   # as a 20 GB card

and on a CPU, the same code at tiny sizes (what ``tests/unit/bench/test_gpu_check.py`` runs)::

    python bench/gpu_check.py --smoke OUTDIR

What it builds: random-weight checkpoints of real architectures at realistic
sizes, written as ordinary Hugging Face directories (bf16 safetensors and a
byte-level BPE tokenizer trained on the sentences; its vocabulary is smaller
than the embedding, which keeps the real row count) so that every load goes
through :func:`ftflow.models.loading.load_model`, ftflow's one loading path:

* ``llama``: Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32/8 heads, MLP 8192,
  vocabulary 128256, tied), 1.24B parameters;
* ``granite``: Granite 3.0 2B's shapes cut to 14 of its 40 layers (vocabulary
  49155, tied), 0.95B parameters (Granite 3.x has no dense 1B model), with
  its real multipliers (embeddings x12, attention 1/64, residual 0.22, logits
  / 8: ``ftflow/models/known.py``), which ftflow's chunked scoring must
  reproduce;
* ``qwen2``: Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14/2 heads, MLP 4864,
  vocabulary 151936, tied), 0.49B parameters;
* ``granite-8b``: granite-3.3-8b-base, all 40 layers and its multipliers, 8.17B
  parameters in bf16 (16.3 GB): the seed study's teacher on a 20 GB card. Only
  ``train[lora-fit]`` and ``teacher[topk]`` (below); run it on its own
  (``--models granite-8b``): its checkpoint alone is 16 GB to write and read.

The first three have a distillation student of the same family and tokenizer
(their shapes with fewer layers). The weights' values do not matter for speed
and memory.

What it checks, per model, each check on its own (one failure is recorded with
its error and the rest go on):

* ``score[fp32|bf16|nf4]``: load at the precision (nf4 through bitsandbytes),
  weights in memory against :func:`ftflow.plan.predict.predict_scoring`'s; the
  sentences scored by :func:`ftflow.perplexity.score_sentences` and by the
  one-sentence-at-a-time loop of ``bench/perplexity_speed.py`` (tokens/s of
  each, their ratio, corpus NLL agreement); the scoring peak against the
  prediction for the first (longest) batch.
* ``train[lora|qlora|prefix|full|distill]``: a few optimizer steps through
  ftflow's training functions (:func:`ftflow.train.trainer.train_lora`,
  :func:`~ftflow.train.trainer.train_prefix`, :func:`~ftflow.train.trainer.train_full`;
  distillation with :func:`ftflow.distill.teacher.compute_teacher_topk`, the stored
  :class:`~ftflow.distill.store.TeacherTopK` and the
  :class:`~ftflow.distill.trainer.DistillationTrainer`), each run first checked with
  :func:`ftflow.plan.decide.check_training_fits` against the device's memory (a run
  predicted not to fit is skipped with the figure, as the pipeline does), then
  its measured peak compared with that prediction; seconds per step, tokens/s
  and achieved FLOP/s. The training set is ``steps x batch`` sequences of
  exactly ``--max-length`` tokens (sentences joined, then cut), so every batch
  has the shape the planner predicts for and one epoch is the number of steps.
  Then, as :func:`ftflow.train.runner.run_job` does, the saved result is reloaded
  (base + adapter, or the checkpoint) and the test sentences scored: with
  ``gc`` off from the start of training, what of the run is still alive when
  its function returns (models, optimizers: a reference cycle that only a
  collection frees) is recorded, and the reload's peak, as growth over the
  memory before training (so a trained model still alive counts), is
  compared with :func:`ftflow.plan.predict.predict_scoring` for the reload alone.
* ``train[lora-fit]`` (granite-8b): LoRA in bf16 with the micro-batch,
  checkpointing and optimizer state that :func:`ftflow.plan.fit.choose_fit` picks
  for the memory cap, its peak against the plan's prediction.
* ``teacher[topk]`` (granite-8b): the teacher pass
  (:func:`ftflow.distill.teacher.compute_teacher_topk`, k = 100, the seed study's
  largest) at the batch :func:`ftflow.plan.decide.plan_candidate` gives the model
  for scoring at the training length within the cap (the pipeline passes its
  evaluation batch), against ``ftflow.plan.predict.predict_teacher_pass`` when
  ftflow has it ("unplanned" otherwise).

How it measures:

* memory, cuda: ``torch.cuda.max_memory_allocated`` minus what was allocated
  before the model was loaded (``torch.cuda.synchronize`` and
  ``reset_peak_memory_stats`` around each measurement), compared with the
  prediction's ``allocated_bytes`` (the peak without the CUDA context, which the
  allocator does not see); ``max_memory_reserved`` beside it. Between checks every model is deleted, then
  ``gc.collect()`` and ``torch.cuda.empty_cache()``; what is still allocated
  after a check is recorded (``leftover_mb``), so a leak shows. The CUDA
  context (used memory the allocator does not hold, once it exists) is
  recorded beside the planned runtime overhead. With ``--memory-cap-gb G``
  every run is planned for G GB and the allocator is capped at G less the
  context (``torch.cuda.set_per_process_memory_fraction``), so what a card of
  G GB cannot hold fails with an out-of-memory error.
* memory, cpu (``--smoke``): growth of the resident set (``bench/memory_accuracy.py``'s
  meter), in this process, loading included: a sanity figure at smoke sizes, not a check.
* time: one timed run after an untimed warm-up on two sentences (scoring); for training,
  the time between the first and the last logged step divided by the steps in
  between (ftflow's ``fit`` logs every step when there are fewer than 8, and
  the Trainer reads the loss with ``.item()`` before it logs, which
  synchronizes), so the first step (optimizer state, kernel selection) is not
  counted.
* FLOP/s: ``P`` is the matmul parameters (every linear layer, the output layer
  included; the embedding lookup does no FLOPs), ``T`` the trainable ones.
  Scoring: ``2 P`` per scored token. Full fine-tuning and distillation (the
  student): ``6 P``. LoRA and prefix tuning: ``4 P + 6 T`` (the frozen weights
  get no weight gradient), QLoRA ``6 P + 6 T`` (gradient checkpointing runs the
  forward twice). Attention's ``L^2`` terms and padding are not counted.

The Trainer's own checkpoints of the full-model runs (full, distill) are not
written: model and AdamW state of a 1B fp32 model are ~15 GB of disk I/O per
run, which is not what this check measures (checkpointing and resuming are
tested on CPU). The best epoch is still saved as ftflow saves it.

Time: the budget (``--budget-s``, default 480 s) is shared by the models; each
model may use what is left divided by the models still to run, and a check that
would start past its model's share is not run and counts as failed ("time budget: ...").

Writes ``OUTDIR/gpu_check.json`` (every figure) and ``OUTDIR/gpu_check.md``
(the summary, also printed), rewritten after every check so that a run killed
from outside still leaves what it measured. Exit status 0 when no check failed, 1 when one did
(a check skipped because it cannot run here, e.g. 4-bit without bitsandbytes' kernels, is not a failure;
one not run for lack of time is), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import inspect
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

from bench.memory_accuracy import _CpuMeter, _CudaMeter  # noqa: E402
from bench.rehearsal import LiveObjects  # noqa: E402
from bench.perplexity_speed import DEFAULT_DATA, naive_score, read_sentences  # noqa: E402

import torch  # noqa: E402

from ftflow.data import synthetic  # noqa: E402
from ftflow.models import architecture, zoo  # noqa: E402
from ftflow.models.loading import load_model, load_tokenizer  # noqa: E402
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, score_sentences  # noqa: E402
from ftflow.plan import decide as plan_decide  # noqa: E402
from ftflow.plan import predict as plan_predict  # noqa: E402
from ftflow.tokens import pad_token_id, sentence_ids  # noqa: E402

MB = 10**6
SCORING_PRECISIONS = ("fp32", "bf16", "nf4")
TRAINING_METHODS = ("lora", "qlora", "prefix", "full", "distill", "full-fit")
"""``full-fit``: full fine-tuning as ftflow/plan/fit.py makes a too-large run fit: bf16 weights, bitsandbytes 8-bit
AdamW with stochastic rounding, micro-batches of half the batch with 2 accumulation steps, gradient checkpointing."""
NLL_RTOL = {"fp32": 1e-4, "bf16": 1e-2, "nf4": 1e-2}
"""Largest relative difference of corpus NLL, evaluator vs loop, that passes. In
fp32 the two differ only by summation order; in bf16 (and nf4, which computes
in bf16) a padded batch and a single sequence run different kernels, whose
rounding differs by about one bf16 ulp per logit."""

# Hyperparameters of the training checks: ftflow's config defaults, which are also the
# memory planner's defaults (LoRA rank 8, dropout 0.05; 8 virtual tokens).
LORA = dict(r=8, alpha=16.0, dropout=0.05, target_modules="all-linear")
PREFIX_TOKENS = 8
DISTILL = dict(top_k=10, temperature=1.0, alpha=0.5)
LEARNING_RATE = {"lora": 2e-4, "qlora": 2e-4, "prefix": 1e-4, "full": 5e-5, "distill": 5e-5, "full-fit": 5e-5,
                 "lora-fit": 2e-4}
TEACHER_K = 100
"""The teacher pass keeps the top 100 (the seed study's largest k)."""


# ----------------------------------------------------------------------------- models


ALL_CHECKS = ("build", *(f"score[{p}]" for p in SCORING_PRECISIONS), *(f"train[{m}]" for m in TRAINING_METHODS))
EIGHT_B_CHECKS = ("build", "train[lora-fit]", "teacher[topk]")
ON_ITS_OWN = ("granite-8b",)
"""Models a GPU run checks only when ``--models`` names them (the smoke run checks every model)."""
"""The 8B model's checks: its LoRA run at the micro-batch the planner chooses for the memory cap, and the
teacher pass at its planned batch (what a 20 GB card must hold for the seed study's teacher)."""


@dataclass(frozen=True)
class ModelSpec:
    """One architecture at one size, the layers of its distillation student (None: none), and its checks."""

    name: str
    like: str
    architecture: str
    numbers: dict
    student_layers: Optional[int]
    with_bos: bool = True  # Qwen2's tokenizer has no BOS: ftflow then starts sentences with EOS
    checks: tuple[str, ...] = ALL_CHECKS


GRANITE_SCALING = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def _known(hub_id: str, *fields: str) -> dict:
    """Fields of a hub model's config as ``ftflow/models/known.py`` records them."""
    from ftflow.models.known import KNOWN_MODELS

    return {name: KNOWN_MODELS[hub_id][name] for name in fields}


GPU_MODELS = (
    ModelSpec("llama", "Llama-3.2-1B", "llama", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True), student_layers=4),
    # Granite's forward scales embeddings, attention, residual branches and logits: its real multipliers, so
    # ftflow's chunked scoring is checked against the forward the hub's checkpoints run.
    ModelSpec("granite", "granite-3.0-2b shapes and multipliers, 14 of 40 layers", "granite", dict(
        hidden_size=2048, num_hidden_layers=14, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=49155, tie_word_embeddings=True,
        **_known("ibm-granite/granite-3.0-2b-base", *GRANITE_SCALING)), student_layers=4),
    ModelSpec("qwen2", "Qwen2.5-0.5B", "qwen2", dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True), student_layers=6,
        with_bos=False),
    ModelSpec("granite-8b", "granite-3.3-8b-base (all 40 layers, its multipliers)", "granite", _known(
        "ibm-granite/granite-3.3-8b-base", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings", *GRANITE_SCALING),
        student_layers=None, checks=EIGHT_B_CHECKS),
)
_SMOKE_NUMBERS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=512)
SMOKE_MODELS = tuple(
    ModelSpec(spec.name, f"{spec.like} (smoke: tiny)", spec.architecture,
              {**_SMOKE_NUMBERS, "tie_word_embeddings": spec.numbers["tie_word_embeddings"],
               **{k: v for k, v in spec.numbers.items() if k in GRANITE_SCALING}},
              student_layers=None if spec.student_layers is None else 1, with_bos=spec.with_bos, checks=spec.checks)
    for spec in GPU_MODELS
)


@dataclass(frozen=True)
class Settings:
    """What a run of the check uses besides the models (GPU defaults, or the smoke ones)."""

    device: str
    smoke: bool
    budget_s: float
    n_sentences: int
    n_validation: int
    eval_batch_size: int
    steps: int
    batch_size: int
    max_length: int
    train_precision: str
    tokenizer_vocab: int
    max_length_scoring: int = 2048
    memory_cap_gb: Optional[float] = None
    """The card's memory to plan for and (cuda) cap the allocator at; None: the device's own."""


GPU_DEFAULTS = dict(budget_s=480.0, n_sentences=384, n_validation=16, eval_batch_size=32, steps=6, batch_size=8,
                    max_length=256, train_precision="fp32", tokenizer_vocab=4096)
SMOKE_DEFAULTS = dict(budget_s=300.0, n_sentences=24, n_validation=4, eval_batch_size=8, steps=3, batch_size=2,
                      max_length=32, train_precision="fp32", tokenizer_vocab=512)


def model_config(spec: ModelSpec, tokenizer, layers: Optional[int] = None):
    """The transformers config of ``spec`` (``layers`` decoder layers), special ids from ``tokenizer``."""
    from transformers import CONFIG_MAPPING

    numbers = dict(spec.numbers)
    if layers is not None:
        numbers["num_hidden_layers"] = layers
    return CONFIG_MAPPING[spec.architecture](
        **numbers, max_position_embeddings=zoo.DECLARED_CONTEXT, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build_checkpoint(config, tokenizer, directory: Path, device: str) -> float:
    """Random bf16 weights made on ``device``, saved with the tokenizer; returns the seconds it took."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    zoo.save_checkpoint(model, tokenizer, directory)
    del model
    _free(device)
    return time.perf_counter() - started


def matmul_parameters(config) -> int:
    """Weights that take part in a matmul per token: every linear layer, the output layer included."""
    counts = architecture.parameter_counts(config)
    return counts.linear_weights + (counts.output_untied or counts.embedding)


def training_flops_per_token(method: str, config) -> tuple[float, str]:
    """FLOPs per trained token and the formula used (see the module docstring)."""
    p = matmul_parameters(config)
    if method in ("full", "distill"):
        return 6.0 * p, "6P"
    if method == "full-fit":  # checkpointing recomputes the forward
        return 8.0 * p, "8P"
    if method == "prefix":
        return 4.0 * p, "4P"
    t = architecture.parameter_counts(config).lora(LORA["r"])
    if method == "qlora":
        return 6.0 * p + 6.0 * t, "6P+6T"
    return 4.0 * p + 6.0 * t, "4P+6T"


# ----------------------------------------------------------------------------- data


def scoring_sentences(data: Optional[Path], n: int) -> tuple[list[str], str]:
    """The first ``n`` sentences of ``data``, else of the shared SST-2 test file, else generated ones."""
    path = data if data is not None else (DEFAULT_DATA if DEFAULT_DATA.is_file() else None)
    if path is not None:
        if not path.is_file():
            raise SystemExit(f"--data {path} is not a file (expected one sentence per line)")
        sentences = read_sentences(path, n)
        if not sentences:
            raise SystemExit(f"{path} has no non-blank lines")
        return sentences, str(path)
    return synthetic.generate_sentences(n, seed=0, domain="reviews"), f"generated ({n} review-like sentences)"


def training_documents(tokenizer, sentences: list[str], n_documents: int, length: int) -> list[str]:
    """``n_documents`` texts of at least ``length`` tokens each (start token included): sentences joined in turn.

    ftflow's encoding then cuts each to exactly ``length`` tokens, so every batch is
    ``[batch, length]`` with no padding: the shape the memory planner predicts for.
    """
    documents, index = [], 0
    for _ in range(n_documents):
        parts: list[str] = []
        while len(sentence_ids(tokenizer, " ".join(parts), length + 1)[0]) <= length:
            parts.append(sentences[index % len(sentences)])
            index += 1
        documents.append(" ".join(parts))
    return documents


# ----------------------------------------------------------------------------- measuring


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _meter(device: str):
    """Memory meter whose baseline is taken now: ``peak()`` / ``now()`` are growth since then."""
    return _CudaMeter() if device == "cuda" else _CpuMeter()


def _restart_peak(device: str) -> None:
    """Restart the peak where memory is now, without collecting garbage (unlike the meters' ``reset_peak``)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def _reserved_peak_mb(device: str) -> Optional[float]:
    """cuda: the caching allocator's reserved peak since the last reset (allocated + cached blocks), in MB."""
    return torch.cuda.max_memory_reserved() / MB if device == "cuda" else None


def _compare(prefix: str, predicted: int, measured: int) -> dict:
    """``<prefix>_predicted_mb``, ``_measured_mb`` and ``_error_pct`` (predicted / measured - 1)."""
    return {
        f"{prefix}_predicted_mb": predicted / MB,
        f"{prefix}_measured_mb": measured / MB,
        f"{prefix}_error_pct": 100.0 * (predicted / measured - 1.0) if measured > 0 else None,
    }


class StepClock:
    """``on_progress`` callback of ftflow's training: the time of every logged optimizer step.

    The Trainer logs after the step's ``loss.item()`` (a synchronization), so the
    time between two logged steps is the time of the steps in between.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []

    def __call__(self, info: dict) -> None:
        if info.get("validation_ppl") is None and info.get("loss") is not None:  # a step log, not a validation
            self.steps.append((int(info["step"]), time.perf_counter()))

    def seconds_per_step(self) -> float:
        if len(self.steps) < 2:
            raise RuntimeError(f"only {len(self.steps)} logged step(s): use --steps 3 or more to time a step")
        (first_step, first_t), (last_step, last_t) = self.steps[0], self.steps[-1]
        return (last_t - first_t) / (last_step - first_step)


def _without_trainer_checkpoints(trainer_cls):
    """``trainer_cls`` that does not write its checkpoints (model + optimizer state; see the module docstring)."""

    class NoCheckpointTrainer(trainer_cls):
        def _save_checkpoint(self, model, trial):  # noqa: D401 - Trainer hook
            return None

    NoCheckpointTrainer.__name__ = f"NoCheckpoint{trainer_cls.__name__}"
    return NoCheckpointTrainer


def bitsandbytes_4bit_problem(device: str) -> Optional[str]:
    """Why 4-bit weights cannot be used on ``device`` (None when a 4-bit layer runs forward and backward)."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
        x = torch.randn(2, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        return None
    except Exception as exc:  # any failure means: no 4-bit here, say why
        return f"bitsandbytes 4-bit does not run on {device}: {type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- checks


@dataclass
class ModelContext:
    """What the checks of one model share: its checkpoints, tokenizer and data."""

    spec: ModelSpec
    settings: Settings
    workdir: Path
    sentences: list[str]
    tokenizer: object = None
    config: object = None
    student_config: object = None
    path: Optional[Path] = None
    student_path: Optional[Path] = None
    documents: list[str] = field(default_factory=list)


def check_build(ctx: ModelContext) -> dict:
    """Tokenizer, teacher and student checkpoints (bf16 safetensors), training documents."""
    s = ctx.settings
    tokenizer = zoo.train_tokenizer(ctx.sentences, s.tokenizer_vocab, seed=0, with_bos=ctx.spec.with_bos)
    ctx.config = model_config(ctx.spec, tokenizer)
    ctx.path = ctx.workdir / ctx.spec.name
    build_s = build_checkpoint(ctx.config, tokenizer, ctx.path, s.device)
    student_s = None
    if ctx.spec.student_layers is not None:
        ctx.student_config = model_config(ctx.spec, tokenizer, ctx.spec.student_layers)
        ctx.student_path = ctx.workdir / f"{ctx.spec.name}-student"
        student_s = build_checkpoint(ctx.student_config, tokenizer, ctx.student_path, s.device)
    # Loaded back through ftflow, as every later check (and the pipeline) reads it.
    ctx.tokenizer = load_tokenizer(str(ctx.path))
    ctx.documents = training_documents(ctx.tokenizer, ctx.sentences, s.steps * s.batch_size, s.max_length)
    return {
        "parameters": architecture.count_config_parameters(ctx.config),
        "matmul_parameters": matmul_parameters(ctx.config),
        "student_parameters": (None if ctx.student_config is None
                               else architecture.count_config_parameters(ctx.student_config)),
        "vocab_size": ctx.config.vocab_size,
        "tokenizer_vocab": len(ctx.tokenizer),
        "layers": ctx.config.num_hidden_layers,
        "hidden_size": ctx.config.hidden_size,
        **{name: getattr(ctx.config, name) for name in GRANITE_SCALING if name in ctx.spec.numbers},
        "build_s": build_s,
        "student_build_s": student_s,
        "checkpoint_mb": sum(f.stat().st_size for f in ctx.path.iterdir()) / MB,
    }


def check_scoring(ctx: ModelContext, precision: str) -> dict:
    """Load at ``precision``; evaluator vs one-sentence loop: speed, NLL agreement, peak vs prediction."""
    s, tokenizer = ctx.settings, ctx.tokenizer
    if precision == "nf4" and s.device == "cpu":
        problem = bitsandbytes_4bit_problem("cpu")
        if problem:
            raise SkipCheck(problem)
    meter = _meter(s.device)
    started = time.perf_counter()
    model = load_model(str(ctx.path), precision, s.device)
    _sync(s.device)
    out: dict = {"load_s": time.perf_counter() - started}
    weights = plan_predict.predict_scoring(ctx.config, precision, 1, 2, device=s.device).weights_bytes
    out.update(_compare("weights", weights, meter.now()))

    # Untimed warm-up of both (first-call costs: allocator, kernel selection), as perplexity_speed does.
    score_sentences(model, tokenizer, ctx.sentences[:2], batch_size=2, max_length=s.max_length_scoring,
                    progress=False)
    naive_score(model, tokenizer, ctx.sentences[:2], s.max_length_scoring)

    meter.reset_peak()
    _sync(s.device)
    started = time.perf_counter()
    result = score_sentences(model, tokenizer, ctx.sentences, batch_size=s.eval_batch_size,
                             max_length=s.max_length_scoring, progress=False)
    _sync(s.device)
    evaluator_s = time.perf_counter() - started
    peak = meter.peak()
    reserved = _reserved_peak_mb(s.device)

    started = time.perf_counter()
    naive_nll, naive_tokens = naive_score(model, tokenizer, ctx.sentences, s.max_length_scoring)
    _sync(s.device)
    naive_s = time.perf_counter() - started
    del model
    _free(s.device)

    # The first batch holds the longest sentences, all padded to the longest: the planner's worst case.
    longest = max(len(sentence_ids(tokenizer, text, s.max_length_scoring)[0]) for text in ctx.sentences)
    first_batch = min(s.eval_batch_size, len(ctx.sentences))
    predicted = plan_predict.predict_scoring(ctx.config, precision, first_batch, longest, device=s.device)
    evaluator_tps = result.scored_tokens / evaluator_s
    nll_rel = abs(result.total_nll - naive_nll) / abs(naive_nll)
    out.update({
        "sentences": result.n_sentences,
        "scored_tokens": result.scored_tokens,
        "batch_size": s.eval_batch_size,
        "longest_tokens": longest,
        "evaluator_s": evaluator_s,
        "evaluator_tokens_per_s": evaluator_tps,
        "loop_s": naive_s,
        "loop_tokens": naive_tokens,
        "loop_tokens_per_s": naive_tokens / naive_s,
        "speedup": evaluator_tps / (naive_tokens / naive_s),
        "corpus_ppl": result.corpus_ppl,
        "loop_corpus_ppl": math.exp(naive_nll / naive_tokens),
        "nll_rel_diff": nll_rel,
        "nll_rtol": NLL_RTOL[precision],
        "tflops": 2.0 * matmul_parameters(ctx.config) * evaluator_tps / 1e12,
        **_compare("peak", predicted.allocated_bytes, peak),
        "peak_reserved_mb": reserved,
    })
    problems = []
    if naive_tokens != result.scored_tokens:
        problems.append(f"scored tokens differ: evaluator {result.scored_tokens}, loop {naive_tokens}")
    if not nll_rel <= NLL_RTOL[precision]:
        problems.append(f"corpus NLL evaluator vs loop differs by {nll_rel:.2e} relative (> {NLL_RTOL[precision]:g})")
    if problems:
        raise CheckFailed("; ".join(problems), out)
    return out


def _train_settings(s: Settings, method: str, precision: str):
    from ftflow.train.trainer import TrainSettings

    return TrainSettings(
        epochs=1, learning_rate=LEARNING_RATE[method], batch_size=s.batch_size, max_length=s.max_length, seed=0,
        device=s.device, precision=precision, eval_batch_size=s.eval_batch_size, progress=False,
        checkpoint_steps=10**9,  # no mid-run checkpoints: the run is a few steps (one epoch)
    )


def _budget_bytes(settings: Settings) -> int:
    """What runs are planned against: the memory cap, else the device's memory."""
    if settings.memory_cap_gb is not None:
        return int(settings.memory_cap_gb * plan_predict.GB)
    if settings.device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_training(ctx: ModelContext, method: str) -> dict:
    """A few optimizer steps of ``method`` through ftflow's training code; peak vs prediction, speed."""
    from transformers import Trainer

    from ftflow.train.trainer import batching_for, encode_dataset, train_full, train_lora, train_prefix

    s, tokenizer = ctx.settings, ctx.tokenizer
    precision = "nf4" if method == "qlora" else "bf16" if method == "lora-fit" else s.train_precision
    fit_options: dict = {}
    out: dict = {}
    if method == "lora-fit":
        # LoRA as the pipeline plans it for the memory cap (ftflow/plan/fit.py): the micro-batch, checkpointing and
        # optimizer state it chooses, bf16 weights as the study's 8B models.
        from ftflow.plan.fit import choose_fit

        longest = max(len(sentence_ids(tokenizer, text, s.max_length_scoring)[0])
                      for text in ctx.sentences[: s.n_validation])
        fit = choose_fit(ctx.config, precision, "lora", batch_size=s.batch_size, max_length=s.max_length,
                         budget_bytes=_budget_bytes(s), eval_batch_size=s.eval_batch_size, eval_length=longest,
                         lora_r=LORA["r"], lora_dropout=LORA["dropout"], device=s.device, name=ctx.spec.name)
        if not fit.fits:
            raise CheckFailed(f"the plan fits no LoRA run of {ctx.spec.name} in {_budget_bytes(s) / 1e9:g} GB: "
                              f"{fit.reason}", {"fit_summary": fit.summary})
        fit_options = dict(micro_batch_size=fit.micro_batch_size, gradient_checkpointing=fit.gradient_checkpointing,
                           optimizer=fit.optimizer)
        out.update(micro_batch_size=fit.micro_batch_size, accumulation_steps=fit.accumulation_steps,
                   gradient_checkpointing=fit.gradient_checkpointing, optimizer=fit.optimizer,
                   fit_summary=fit.summary)
    if method == "full-fit":
        micro = max(1, s.batch_size // 2)
        precision = "bf16"
        fit_options = dict(micro_batch_size=micro, gradient_checkpointing=True, optimizer="adamw-8bit",
                           master_weights="bf16")
    if method == "qlora":
        problem = bitsandbytes_4bit_problem(s.device)
        if problem:
            raise SkipCheck(problem)
    trained_path, trained_config = (ctx.student_path, ctx.student_config) if method == "distill" \
        else (ctx.path, ctx.config)
    # The planner's verdict first, as the pipeline does: a run predicted not to fit is not started.
    if method == "lora-fit":
        predicted = plan_predict.MemoryPrediction(**fit.prediction)
    elif method == "full-fit":
        predicted = plan_predict.predict_training(
            architecture.model_config_for(str(trained_path)), "bf16", "full", micro, s.max_length,
            gradient_checkpointing=True, optimizer="adamw-8bit", accumulation_steps=s.batch_size // micro,
            device=s.device)
        if predicted.peak_bytes > _budget_bytes(s):
            raise SkipCheck(f"full-fit predicted at {predicted.peak_bytes / 1e9:.1f} GB, over the device's memory")
    else:
        try:
            predicted = plan_decide.check_training_fits(
                str(trained_path), precision, method, batch_size=s.batch_size, max_length=s.max_length,
                budget_bytes=_budget_bytes(s), device=s.device, lora_r=LORA["r"],
                lora_dropout=LORA["dropout"], num_virtual_tokens=PREFIX_TOKENS)
        except plan_decide.MemoryBudgetError as exc:
            raise SkipCheck(str(exc)) from None
    out.update({"precision": precision, "batch_size": s.batch_size, "max_length": s.max_length, "steps": s.steps})
    run_dir = ctx.workdir / f"train-{method}"
    clock = StepClock()
    settings = dataclasses.replace(_train_settings(s, method, precision), **fit_options)
    common = dict(settings=settings, work_dir=run_dir / "trainer", on_progress=clock)
    validation = ctx.sentences[: s.n_validation]
    try:
        if method == "distill":
            out.update(_teacher_topk(ctx, run_dir / "topk"))
            from ftflow.distill.trainer import DistillationCollator, DistillationTrainer
            from ftflow.distill.store import TeacherTopK

            store = TeacherTopK.load(run_dir / "topk")
            # The pipeline's batching for distillation (packed by default), its teacher rows following the tokens.
            batching = batching_for(settings.packing, "distill")
            collator = DistillationCollator(pad_token_id(tokenizer), store, k=DISTILL["top_k"],
                                            packed=batching == "packed")
        meter = _meter(s.device)
        meter.reset_peak()
        live = LiveObjects().install()
        gc.disable()  # until the reload is scored: a trained model that only a collection frees shows
        started = time.perf_counter()
        if method in ("lora", "qlora", "lora-fit"):
            result = train_lora(str(trained_path), tokenizer, ctx.documents, validation, r=LORA["r"],
                                alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=LORA["target_modules"],
                                adapter_dir=run_dir / "best", **common)
        elif method == "prefix":
            result = train_prefix(str(trained_path), tokenizer, ctx.documents, validation,
                                  num_virtual_tokens=PREFIX_TOKENS, adapter_dir=run_dir / "best", **common)
        elif method in ("full", "full-fit"):
            result = train_full(str(trained_path), tokenizer, encode_dataset(tokenizer, ctx.documents, s.max_length),
                                validation, model_dir=run_dir / "best",
                                trainer_cls=_without_trainer_checkpoints(Trainer),
                                **common)
        else:
            result = train_full(str(trained_path), tokenizer, encode_dataset(tokenizer, ctx.documents, s.max_length),
                                validation, model_dir=run_dir / "best", collator=collator, batching=batching,
                                trainer_cls=_without_trainer_checkpoints(DistillationTrainer),
                                trainer_kwargs={"alpha": DISTILL["alpha"], "temperature": DISTILL["temperature"]},
                                **common)
        _sync(s.device)
        run_s = time.perf_counter() - started
        peak = meter.peak()
        reserved = _reserved_peak_mb(s.device)
        out.update(_reload_and_score(ctx, method, run_dir / "best", trained_path, trained_config, meter, live))
    finally:
        gc.enable()
        if "live" in locals():
            live.uninstall()
        shutil.rmtree(run_dir, ignore_errors=True)
    step_s = clock.seconds_per_step()
    tokens_per_s = s.batch_size * s.max_length / step_s
    flops, formula = training_flops_per_token(method, trained_config)
    history = result["history"]
    out.update({
        "trained_parameters_of": "student" if method == "distill" else "model",
        "parameters": predicted.parameters,
        "trainable_parameters": result.get("trainable_parameters", predicted.trainable_parameters),
        "run_s": run_s,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "tflops": flops * tokens_per_s / 1e12,
        "flops_formula": formula,
        "train_loss": history[-1]["train_loss"],
        "validation_ppl_before": result["baseline_validation"]["corpus_ppl"],
        "validation_ppl_after": result["best_validation_ppl"],
        **_compare("peak", predicted.allocated_bytes, peak),
        "peak_reserved_mb": reserved,
    })
    return out


def _reload_and_score(ctx: ModelContext, method: str, best_dir: Path, trained_path: Path, trained_config,
                      meter, live: LiveObjects) -> dict:
    """What the pipeline does after training (``ftflow.train.runner.run_job``): reload the saved result, score test.

    Called right after the training function returned, with ``gc`` off: first what of the run is still
    alive (models, optimizers; allocated memory on cuda), then the reload's peak, as growth over the memory
    before training (a trained model still alive counts), against :func:`ftflow.plan.predict.predict_scoring` for
    the reload alone.
    """
    s = ctx.settings
    alive = live.alive()
    out = {"trained_alive_models": alive["models"], "trained_alive_optimizers": alive["optimizers"],
           "trained_alive_mb": alive["bytes"] / MB, "left_after_train_mb": meter.now() / MB}
    precision = "nf4" if method == "qlora" else "bf16" if method == "lora-fit" else s.train_precision
    _restart_peak(s.device)  # no collection here: what is still alive must count
    if method in ("lora", "qlora", "lora-fit", "prefix"):
        model = load_model(str(trained_path), precision, s.device, adapter=str(best_dir))
    else:
        model = load_model(str(best_dir), precision, s.device)
    test = ctx.sentences[: s.eval_batch_size]
    _sync(s.device)
    score = score_sentences(model, ctx.tokenizer, test, batch_size=s.eval_batch_size,
                            max_length=s.max_length_scoring, progress=False)
    _sync(s.device)
    peak = meter.peak()
    del model
    longest = max(len(sentence_ids(ctx.tokenizer, text, s.max_length_scoring)[0]) for text in test)
    predicted = plan_predict.predict_scoring(trained_config, precision, len(test), longest, device=s.device)
    return {**out, "reload_precision": precision, "reload_test_ppl": score.corpus_ppl,
            **_compare("reload_peak", predicted.allocated_bytes, peak),
            "reload_reserved_mb": _reserved_peak_mb(s.device)}


def check_teacher_pass(ctx: ModelContext, variant: str) -> dict:
    """The teacher pass (:func:`ftflow.distill.teacher.compute_teacher_topk`) at the batch the plan gives the model.

    The batch is :func:`ftflow.plan.decide.plan_candidate`'s for scoring at the training length within the memory
    cap: the pipeline runs the teacher pass at its evaluation batch, the smallest such batch of the study's
    models. Compared with ``ftflow.plan.predict.predict_teacher_pass`` when ftflow has it (else "unplanned").
    """
    from bench.rehearsal import teacher_pass_prediction
    from ftflow.distill.teacher import compute_teacher_topk

    s = ctx.settings
    precision = "bf16"
    plan = plan_decide.plan_candidate(ctx.spec.name, str(ctx.path), _budget_bytes(s), precision=precision,
                                 batch_size="auto", max_length=s.max_length, device=s.device)
    batch = plan["batch_size"]
    if not batch:
        raise CheckFailed(f"the plan cannot score {ctx.spec.name} at all: {plan['reason']}", {})
    documents = training_documents(ctx.tokenizer, ctx.sentences, batch, s.max_length)
    chunked = "logits_chunk_tokens" in inspect.signature(compute_teacher_topk).parameters
    predicted = teacher_pass_prediction(ctx.config, precision, batch, s.max_length, k=TEACHER_K, variant=variant,
                                        chunk=DEFAULT_LOGITS_CHUNK_TOKENS, device=s.device)
    meter = _meter(s.device)
    teacher = load_model(str(ctx.path), precision, s.device)
    meter.reset_peak()
    started = time.perf_counter()
    topk = compute_teacher_topk(teacher, ctx.tokenizer, documents, k=TEACHER_K, max_length=s.max_length,
                                batch_size=batch, progress=False, variant=variant,
                                **({"logits_chunk_tokens": DEFAULT_LOGITS_CHUNK_TOKENS} if chunked else {}))
    _sync(s.device)
    seconds = time.perf_counter() - started
    peak = meter.peak()
    positions = int(topk.offsets[-1])
    del teacher, topk
    out = {"batch_size": batch, "max_length": s.max_length, "k": TEACHER_K, "variant": variant,
           "plan_reason": plan["reason"], "positions": positions, "teacher_s": seconds,
           "tokens_per_s": positions / seconds, "peak_measured_mb": peak / MB,
           "peak_reserved_mb": _reserved_peak_mb(s.device),
           "peak_predicted_mb": None if predicted is None else predicted.allocated_bytes / MB}
    if predicted is not None:
        out.update(_compare("peak", predicted.allocated_bytes, peak))
    else:
        out["peak_note"] = "unplanned: ftflow.plan.predict has no predict_teacher_pass"
    return out


def _teacher_topk(ctx: ModelContext, directory: Path) -> dict:
    """The teacher (the model) once over the training documents; top-k stored, teacher freed."""
    from ftflow.distill.vocabulary import check_same_tokenizer
    from ftflow.distill.teacher import compute_teacher_topk

    s = ctx.settings
    check_same_tokenizer(ctx.tokenizer, load_tokenizer(str(ctx.student_path)), ctx.spec.name, f"{ctx.spec.name}-student")
    teacher = load_model(str(ctx.path), s.train_precision, s.device)
    _sync(s.device)
    started = time.perf_counter()
    topk = compute_teacher_topk(teacher, ctx.tokenizer, ctx.documents, k=DISTILL["top_k"], max_length=s.max_length,
                                batch_size=s.batch_size, progress=False)
    _sync(s.device)
    seconds = time.perf_counter() - started
    topk.save(directory)
    del teacher, topk
    _free(s.device)
    tokens = len(ctx.documents) * s.max_length
    return {"teacher_topk_s": seconds, "teacher_topk_tokens_per_s": tokens / seconds}


class SkipCheck(Exception):
    """A check that cannot run here (the reason is reported; not a failure)."""


class CheckFailed(Exception):
    """A check that ran but whose result is wrong; carries the figures it measured."""

    def __init__(self, message: str, metrics: dict):
        super().__init__(message)
        self.metrics = metrics


# ----------------------------------------------------------------------------- running


class Runner:
    """Runs checks one at a time, each isolated: records status, error, figures and seconds."""

    def __init__(self, settings: Settings, on_record: Optional[Callable[[list[dict]], None]] = None):
        self.settings = settings
        self.on_record = on_record
        self.records: list[dict] = []
        self.started = time.perf_counter()
        self.baseline_allocated = torch.cuda.memory_allocated() if settings.device == "cuda" else 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, model: str, check: str, function: Callable[[], dict], deadline: float,
            needs: Optional[dict] = None) -> dict:
        record = {"model": model, "check": check, "status": "ok", "error": None, "seconds": 0.0, "metrics": {}}
        self.records.append(record)
        if needs is not None and needs["status"] != "ok":
            record.update(status="skipped", error=f"needs {needs['check']}, which {needs['status']}")
            return record
        now = time.perf_counter()
        if now > deadline:  # a check not run for lack of time is a check that did not pass
            record.update(status="failed", error=(
                f"time budget: this model's share ran out ({now - self.started:.0f} s used of "
                f"{self.settings.budget_s:.0f} s); raise --budget-s or run fewer --models"))
            return record
        print(f"[{self.elapsed():6.1f}s] {model} {check} ...", flush=True)
        try:
            record["metrics"] = function()
        except SkipCheck as exc:
            record.update(status="skipped", error=str(exc))
        except CheckFailed as exc:
            record.update(status="failed", error=str(exc), metrics=exc.metrics)
        except Exception as exc:  # recorded with its traceback; the other checks go on
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                          traceback="".join(traceback.format_exception(exc))[-4000:])
        finally:
            _free(self.settings.device)
        record["seconds"] = time.perf_counter() - now
        if self.settings.device == "cuda":
            record["leftover_mb"] = (torch.cuda.memory_allocated() - self.baseline_allocated) / MB
        print(f"[{self.elapsed():6.1f}s] {model} {check}: {record['status']}"
              + (f" ({record['error']})" if record["error"] else ""), flush=True)
        if self.on_record is not None:
            self.on_record(self.records)
        return record


def run_model(runner: Runner, spec: ModelSpec, settings: Settings, sentences: list[str], workdir: Path,
              deadline: float) -> None:
    """Every check of one model, in order; its checkpoints deleted at the end."""
    ctx = ModelContext(spec, settings, workdir / spec.name, sentences)
    ctx.workdir.mkdir(parents=True)
    try:
        built = runner.run(spec.name, "build", lambda: check_build(ctx), deadline)
        for check in spec.checks[1:]:
            kind, what = check[:-1].split("[")
            function = {"score": check_scoring, "train": check_training, "teacher": check_teacher_pass}[kind]
            runner.run(spec.name, check, lambda f=function, w=what: f(ctx, w), deadline, built)
    finally:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- reporting


def _clean(value):
    """JSON-safe: NaN and infinities become None (the JSON stays strict)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if abs(value) >= 1e5:
            return f"{value:,.0f}"
        if 0 < abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def markdown_summary(report: dict) -> str:
    """The Markdown summary of a report (what ``gpu_check.md`` holds)."""
    checks = report["checks"]
    counts = {status: sum(c["status"] == status for c in checks) for status in ("ok", "failed", "skipped")}
    env = report["environment"]
    lines = [
        f"# ftflow GPU check{' (smoke, CPU)' if report['settings']['smoke'] else ''}",
        "",
        f"{env['device_name']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"bitsandbytes {env['bitsandbytes']}; {report['started']}.",
        f"Data: {report['data']}. {report['elapsed_s']:.0f} s of a {report['settings']['budget_s']:.0f} s budget. "
        f"Checks: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped.",
        f"Memory cap: {_fmt(env.get('memory_cap_gb')) + ' GB' if env.get('memory_cap_gb') else 'none (the device)'}"
        + (f"; CUDA context {_fmt(env.get('cuda_context_mb'))} MB measured (planned overhead "
           f"{_fmt(env.get('planned_overhead_mb'))} MB)" if env.get("cuda_context_mb") is not None else "")
        + (f", allocator capped at {env['allocator_fraction']:.3f} of the card" if env.get("allocator_fraction")
           else "") + ".",
        "",
        "## Models",
        "",
    ]
    rows = []
    for c in checks:
        if c["check"] == "build" and c["status"] == "ok":
            m = c["metrics"]
            rows.append([c["model"], report["models"][c["model"]]["like"], _fmt(m["parameters"]),
                         _fmt(m["matmul_parameters"]), _fmt(m["student_parameters"]), _fmt(m["vocab_size"]),
                         m["layers"], m["hidden_size"], _fmt(m["build_s"])])
    lines += _table(["model", "like", "params", "matmul params P", "student params", "vocab", "layers", "hidden",
                     "build s"], rows)
    lines += ["", "## Scoring: ftflow's evaluator vs one sentence at a time", ""]
    rows = []
    for c in checks:
        if c["check"].startswith("score[") and c["metrics"]:
            m = c["metrics"]
            rows.append([c["model"], c["check"][6:-1], c["status"], _fmt(m["load_s"]),
                         f"{_fmt(m['weights_predicted_mb'])} / {_fmt(m['weights_measured_mb'])}",
                         _fmt(m["weights_error_pct"]), _fmt(m["evaluator_tokens_per_s"], 0),
                         _fmt(m["loop_tokens_per_s"], 0), _fmt(m["speedup"], 2), _fmt(m["corpus_ppl"], 2),
                         _fmt(m["nll_rel_diff"], 6), f"{_fmt(m['peak_predicted_mb'])} / {_fmt(m['peak_measured_mb'])}",
                         _fmt(m["peak_error_pct"]), _fmt(m["tflops"], 2)])
    lines += _table(["model", "precision", "status", "load s", "weights MB pred / meas", "err %", "evaluator tok/s",
                     "loop tok/s", "ratio", "PPL", "NLL rel diff", "peak MB pred / meas", "err %", "TFLOP/s"], rows)
    lines += ["", "## Training: a few optimizer steps per method", ""]
    rows = []
    for c in checks:
        if c["check"].startswith("train[") and c["metrics"] and "step_s" in c["metrics"]:
            m = c["metrics"]
            rows.append([c["model"] + (" (student)" if m["trained_parameters_of"] == "student" else ""),
                         c["check"][6:-1], m["precision"], f"{m['batch_size']}x{m['max_length']}", m["steps"],
                         _fmt(m["trainable_parameters"]), _fmt(m["step_s"], 3), _fmt(m["tokens_per_s"], 0),
                         f"{_fmt(m['tflops'], 2)} ({m['flops_formula']})",
                         f"{_fmt(m['peak_predicted_mb'])} / {_fmt(m['peak_measured_mb'])}",
                         _fmt(m["peak_error_pct"]), _fmt(m.get("peak_reserved_mb")), _fmt(m["run_s"]),
                         f"{m.get('trained_alive_models', '')} / {m.get('trained_alive_optimizers', '')}",
                         f"{_fmt(m.get('reload_peak_predicted_mb'))} / {_fmt(m.get('reload_peak_measured_mb'))}",
                         _fmt(m.get("reload_peak_error_pct"))])
    lines += _table(["model", "method", "precision", "batch x tokens", "steps", "trainable", "s/step", "tok/s",
                     "TFLOP/s (formula)", "peak MB pred / meas", "err %", "reserved MB", "run s",
                     "alive after: models / optimizers", "reload + test MB pred / meas", "reload err %"], rows)
    fitted = [c for c in checks if c["check"] == "train[lora-fit]" and c["metrics"].get("fit_summary")]
    if fitted:
        lines += ["", "Planned fits: " + "; ".join(c["metrics"]["fit_summary"] for c in fitted) + "."]
    rows = [[c["model"], c["check"][8:-1], c["status"], c["metrics"].get("batch_size"), c["metrics"].get("max_length"),
             c["metrics"].get("k"), f"{_fmt(c['metrics'].get('peak_predicted_mb'))} / "
             f"{_fmt(c['metrics'].get('peak_measured_mb'))}", _fmt(c["metrics"].get("peak_error_pct")),
             _fmt(c["metrics"].get("peak_reserved_mb")), _fmt(c["metrics"].get("tokens_per_s"), 0),
             c["metrics"].get("peak_note", "")]
            for c in checks if c["check"].startswith("teacher[") and c["metrics"]]
    if rows:
        lines += ["", "## Teacher pass at the planned batch", ""]
        lines += _table(["model", "variant", "status", "batch", "tokens", "k", "peak MB pred / meas", "err %",
                         "reserved MB", "tok/s", "note"], rows)
    problems = [c for c in checks if c["status"] != "ok"]
    if problems:
        lines += ["", "## Failed and skipped", ""]
        lines += _table(["model", "check", "status", "why"],
                        [[c["model"], c["check"], c["status"], (c["error"] or "").splitlines()[0][:300]]
                         for c in problems])
    memory_note = ("peaks: `torch.cuda.max_memory_allocated` growth from before the model was loaded vs the "
                   "prediction's `allocated_bytes` (no CUDA context)" if env["device"] == "cuda" else
                   "peaks: resident-set growth of this process, loading included (a sanity figure on CPU, not a "
                   "check)")
    lines += [
        "",
        "Notes: err % = predicted / measured - 1; " + memory_note + ". Scoring peak predicted for the first "
        "(longest) batch. P = matmul parameters (every linear layer incl. the output layer), T = trainable "
        "parameters; scoring FLOPs 2P per scored token; training 6P (full, distill: the student), 4P+6T (LoRA), "
        "4P (prefix), 6P+6T (QLoRA: gradient checkpointing); attention's L^2 terms and padding not counted. "
        "Training time: between the first and last logged step (the first step not counted).",
    ]
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    import peft
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except Exception as exc:  # reported, and the nf4 checks then say why they failed
        bnb_version = f"unavailable ({type(exc).__name__})"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    info = {"device": device, "device_name": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bnb_version, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            # fp32 matmuls run in full fp32 unless this is on (torch's default is off), which the FLOP/s reflect.
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(total_memory_gb=props.total_memory / 1e9, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    return info


def cap_memory(settings: Settings, report: dict) -> None:
    """Record the CUDA context and, with ``--memory-cap-gb``, cap the allocator so the card is that large.

    The context (driver state, kernels) is memory the caching allocator never sees: the allocator gets the cap
    less it, so allocations past what a card of the cap's size holds fail as they would there. On a CPU the cap
    is only what runs are planned against.
    """
    env = report["environment"]
    env["memory_cap_gb"] = settings.memory_cap_gb
    env["planned_overhead_mb"] = plan_predict.RUNTIME_OVERHEAD_BYTES[settings.device] / MB
    if settings.device != "cuda":
        return
    from bench.rehearsal import cuda_context_bytes

    context = cuda_context_bytes()
    env["cuda_context_mb"] = context / MB
    if settings.memory_cap_gb is not None:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        fraction = (settings.memory_cap_gb * plan_predict.GB - context) / total
        if not 0 < fraction <= 1:
            print(f"gpu_check: --memory-cap-gb {settings.memory_cap_gb:g} leaves no room beside the CUDA context "
                  f"({context / 1e9:.2f} GB) on this {total / 1e9:.1f} GB card", file=sys.stderr)
            raise SystemExit(2)
        torch.cuda.set_per_process_memory_fraction(fraction)
        env["allocator_fraction"] = fraction


# ----------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="folder for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: the same code, in about a minute")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of {','.join(s.name for s in GPU_MODELS)} (default: all but "
                             f"{','.join(ON_ITS_OWN)}; smoke: all)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for every check of every model (default {GPU_DEFAULTS['budget_s']:g}; "
                             f"smoke {SMOKE_DEFAULTS['budget_s']:g})")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"sentences to score, one per line (default: {DEFAULT_DATA} when present, else generated)")
    parser.add_argument("--sentences", type=int, default=None, help="sentences scored (default 384; smoke 24)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training check (default 6; smoke 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default 8; smoke 2)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per training sequence (default 256; smoke 32)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="scoring batch size (default 32; smoke 8)")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="plan every run for a card of this many GB (e.g. 20) and, on cuda, cap the allocator "
                             "there (torch.cuda.set_per_process_memory_fraction, less the CUDA context): what that "
                             "card would hit shows as an out-of-memory failure (default: the device's memory)")
    parser.add_argument("--train-precision", choices=("fp32", "bf16"), default=None,
                        help="weights precision of LoRA, prefix, full and distillation runs (default fp32, as the "
                             "study trains models of at most 3B)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> tuple[Settings, tuple[ModelSpec, ...]]:
    """Settings and models from the command line; every problem reported at once (exit status 2)."""
    defaults = SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS
    chosen = {
        "budget_s": args.budget_s, "n_sentences": args.sentences, "steps": args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length, "eval_batch_size": args.eval_batch_size,
        "train_precision": args.train_precision,
    }
    values = {**defaults, **{k: v for k, v in chosen.items() if v is not None}}
    problems = []
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible; run on a GPU machine, or use --smoke for the CPU version")
    catalogue = SMOKE_MODELS if args.smoke else GPU_MODELS
    names = [s.name for s in catalogue]
    # On a GPU the 8B model runs only when named: its 16 GB checkpoint takes minutes to write and read.
    default = names if args.smoke else [n for n in names if n not in ON_ITS_OWN]
    wanted = default if args.models is None else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        problems.append(f"--models: unknown {unknown or 'empty list'}; choose from {','.join(names)}")
    if args.memory_cap_gb is not None and args.memory_cap_gb <= 0:
        problems.append(f"--memory-cap-gb must be > 0, got {args.memory_cap_gb}")
    if values["budget_s"] <= 0:
        problems.append(f"--budget-s must be > 0, got {values['budget_s']}")
    if values["steps"] < 3:
        problems.append(f"--steps must be >= 3 (the first step is not timed), got {values['steps']}")
    for key in ("n_sentences", "batch_size", "eval_batch_size"):
        if values[key] < 1:
            problems.append(f"{key} must be >= 1, got {values[key]}")
    if values["max_length"] < 8:
        problems.append(f"--max-length must be >= 8, got {values['max_length']}")
    if values["n_sentences"] < 2:
        problems.append("--sentences must be >= 2")
    if problems:
        print("gpu_check: " + "; ".join(problems), file=sys.stderr)
        raise SystemExit(2)
    values["n_validation"] = min(defaults["n_validation"], values["n_sentences"])
    settings = Settings(device=device, smoke=args.smoke, memory_cap_gb=args.memory_cap_gb, **values)
    return settings, tuple(s for s in catalogue if s.name in wanted)


def prepare_process(settings: Settings) -> None:
    """Process-wide settings of a check run: quiet libraries, threads, and a frozen import heap."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.simplefilter("ignore")  # library deprecation chatter; errors still surface in the records
    if settings.smoke:
        # Tiny matrices gain nothing from threads, and on a machine other processes keep busy
        # spare threads spin-wait on each other (seen: 27 ms per 64 x 128 matmul with 2 threads).
        torch.set_num_threads(1)
    # Everything imported so far lives to the end: keep it out of every gc.collect() between checks
    # (a full collection over transformers' and peft's objects takes about a second).
    gc.collect()
    gc.freeze()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    settings, specs = settings_from(args)
    prepare_process(settings)
    sentences, data = scoring_sentences(args.data, settings.n_sentences)
    args.outdir.mkdir(parents=True, exist_ok=True)
    report = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(settings.device),
        "settings": {**settings.__dict__},
        "data": data,
        "models": {s.name: {"like": s.like, "architecture": s.architecture, **s.numbers,
                            "student_layers": s.student_layers} for s in specs},
        "checks": [],
    }
    cap_memory(settings, report)

    def write(records: list[dict]) -> str:
        report.update(checks=records, elapsed_s=runner.elapsed())
        clean = _clean(report)
        (args.outdir / "gpu_check.json").write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
        summary = markdown_summary(clean)
        (args.outdir / "gpu_check.md").write_text(summary)
        return summary

    runner = Runner(settings, on_record=write)
    with tempfile.TemporaryDirectory(prefix="ftflow-gpucheck-") as tmp:
        for index, spec in enumerate(specs):
            # This model's share: what is left, split over the models still to run.
            share = (settings.budget_s - runner.elapsed()) / (len(specs) - index)
            run_model(runner, spec, settings, sentences, Path(tmp), time.perf_counter() + share)
    summary = write(runner.records)
    print()
    print(summary)
    failed = [c for c in report["checks"] if c["status"] == "failed"]
    for c in failed:
        print(f"FAILED {c['model']} {c['check']}: {c['error']}", file=sys.stderr)
    print(f"wrote {args.outdir / 'gpu_check.json'} and {args.outdir / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
