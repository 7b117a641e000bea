"""A rehearsal of the real shapes, here: a config's stage sequence on random-weight checkpoints of its models.

    python bench/rehearsal.py CONFIG [--quick] [--layers N] [--device cpu|cuda] [--memory-cap-gb G]
                              [--max-length L] [--sentences N] [--models A,B] [--family F] [--out DIR]
    python bench/rehearsal.py configs/seed-20gb.yaml --quick      # 2-core CPU
    python bench/rehearsal.py configs/seed-20gb.yaml --device cuda # a GPU: every model at full depth

What it builds (nothing is downloaded): for every model of the config, a
checkpoint with random bf16 weights and the model's real widths, heads,
vocabulary (embedding rows) and, for Granite, multipliers, from
:func:`ftflow.models.architecture.model_config_for` (``ftflow/models/known.py`` for hub
ids); on a CPU its decoder layers are cut to ``--layers`` (default 1), on a
GPU it has them all. Each family gets one byte-level BPE tokenizer with as
many ids as the family's smallest embedding (Qwen2.5: 151,936), in which every
two-letter word is one token (transformers 5 rebuilds a ``qwen2`` checkpoint's
tokenizer as ``Qwen2Tokenizer``: it survives that); every model of a family
shares it, so distillation's tokenizer check passes as it would on the hub's
files. The sentences are random words, exactly ``--max-length`` tokens each
with the start token (checked under every model's tokenizer as ftflow loads
it), so every batch has the shape the planner predicts for (packing changes
no row).

What it runs: the stage sequence :mod:`ftflow.study.design` decides for the
config, each stage through ftflow's own functions, the way the pipeline
calls them (``tasks/*.py``):

* ``benchmark`` of every model: :func:`ftflow.models.loading.load_model` at the
  planned precision, :func:`ftflow.perplexity.score_sentences` on validation
  and test at the planned batch (:func:`ftflow.plan.decide.plan_candidate` at the
  memory cap);
* the LoRA grid on the teacher, as one representative run (its largest
  rank, alpha and dropout: the grid's largest memory), then
  :func:`ftflow.study.design.per_model_jobs` with it as the best combination: LoRA,
  QLoRA and full fine-tuning per compared model, and the prefix grid's
  largest prefix on the teacher. Each run is :func:`ftflow.train.runner.run_job`
  (train, save, reload with ``load_trained``, score test) with the fit plan
  :func:`ftflow.plan.fit.choose_fit` makes for the *full-depth* model at the memory
  cap on CUDA (micro-batch, checkpointing, 8-bit state, bf16 weights), passed
  as ``fit_plan`` as ``tasks/train.py`` does;
* the teacher pass per distillation variant (``topk`` and ``sampled``, at the
  largest k): :func:`ftflow.distill.teacher.teacher_topk_for_student` on the LoRA run
  above (the design's teacher is the teacher model's best run; random
  weights cannot say which, and its LoRA run is the one that loads the whole
  base), stored as ``tasks/teacher_logits.py`` does;
* distillation per variant at the largest k, into the student (``run_job``);
* ``evaluate``: the distilled student reloaded (``load_trained``) and its test
  split scored. (ftflow's evaluate stage itself loads no model; this row is the
  reload every result's test score rests on, in a process of its own.)

Not run: the LoRA grid's other combinations and the prefix grid's other
lengths (smaller than the rows above), the distillation reference (the
student's full fine-tune when ``distill`` and ``finetune`` share epochs, batch
and learning rate, as in the seed config; else it is a row), the augmentation
ablation (the same LoRA run on other sentences).

Which family is selected: random weights cannot say, so the family whose
teacher is largest (the heaviest stages; ``--family`` to choose another),
whose teacher and student :func:`ftflow.study.selection.select_family`'s rule
picks among equal scores. ``--quick`` runs that family's teacher and student
and the smallest model of each other family but Llama-3.2 (whose 1B full
fine-tune needs 8-bit AdamW, whose CPU kernel alone holds 20 bytes per
element of its 263M-element embedding: about 8.5 GB at one layer), for one
epoch at 16 tokens a sentence: on configs/seed-20gb.yaml granite-3.3-8b-base,
granite-3.3-2b-base, Qwen2.5-0.5B and TinyLlama-1.1B-Chat-v1.0, 21 stages.
Every run has 8 training sentences (two optimizer steps at the seed config's
batch of 4: the second is the steady state the planner predicts, its
optimizer state resident through forward and backward) and 2 validation and
test sentences.

How it measures, each stage on its own:

* cpu: each stage in a forked child (``bench/memory_accuracy.py``'s
  ``in_child``, malloc settings and meter), after a warm-up (the same stage on
  micro models of the same architectures, so one-time costs do not count) and
  with the tokenizers already loaded (host memory a GPU never holds: Qwen2's
  is about 50 MB). The peak is the growth of the resident set (``VmHWM`` over
  ``VmRSS`` before the stage) less what a GPU's memory does not see: loading a
  checkpoint (``from_pretrained``: memory-mapped file pages, dtype conversion)
  and writing one (``save_pretrained``, the Trainer's checkpoints), which the
  host does, and bitsandbytes' CPU reference kernel of the 8-bit AdamW step
  (20 bytes of temporaries per element, where CUDA's fused kernel has none).
  Their transients are left out by reading the peak before each and restarting
  it after (what they leave resident counts); the raw growth is in the CSV.
  Compared with the ``allocated_bytes`` (no runtime overhead) of the
  prediction for CUDA, as memory_accuracy compares. On a CPU without
  AVX512-BF16, bf16 matrix products run through :class:`CpuBf16Matmul` (fp32
  blocks of at most 8 MB): torch's own kernel takes minutes for one backward
  through an LM head there.
* cuda: stages one after another in this process (as the pipeline runs them),
  under ``torch.cuda.set_per_process_memory_fraction`` so that the allocator
  has the cap less the CUDA context; ``max_memory_allocated`` growth against
  ``allocated_bytes``, ``max_memory_reserved`` and the context recorded; an
  out-of-memory error is a stage over budget.

What "over budget" means: the stage's full-depth plan on CUDA (the model with
all its layers, context included, at the shape run here) is above the memory
cap, or the plan skips the run, or (at full depth on a GPU) the measured peak
plus the CUDA context is, or it ran out of memory. A cut model's measurement
is not compared with the cap: the within-10% check, at the cut shape, is what
says whether the full-depth plan can be trusted.

What "leaked" means: during the stage ``gc`` is disabled (a model that only
a collection frees is still there when the pipeline loads the next one); every
model loaded (``AutoModelForCausalLM.from_pretrained``) and every optimizer
(``torch.optim.Optimizer``, bitsandbytes' and optimi's included) is tracked by
a weak reference, and after the stage function returns, without collecting,
those still alive are counted with their tensors' bytes. On CUDA also
``memory_allocated`` back at its value before the stage (within 64 MiB).

Prints one row per stage (predicted and measured MB, error = measured /
predicted - 1, within 10%, the full-depth plan, over budget, leaked) and writes
the table as Markdown and CSV under ``--out`` (default ``bench/out/rehearsal``);
its last line is ``rehearsal: N of N stages within 10% of plan, 0 over budget,
0 leaked`` (or the counts that fail); exit status 1 when anything fails. A
stage with no prediction (today the teacher pass: ``ftflow.plan.predict`` had no
``predict_teacher_pass`` yet) is "unplanned", which is not within 10%.

Last measured here (``--quick`` on configs/seed-20gb.yaml, before the fixes of issue 24's items 1-3; a
2-core CPU that other jobs kept at a load of 8-10: 1453 s wall, 584 s of CPU):
``rehearsal: 7 of 21 stages within 10% of plan, 0 over budget, 14 leaked``. Within 2%: the four benchmarks,
the evaluate reload, full fine-tuning of TinyLlama and Qwen2.5-0.5B. Over: every LoRA, QLoRA and prefix run
(+39% to +90%: the trained model, which the Trainer-callback cycle keeps alive, beside its reload for test
scoring), granite-3.3-2b-base in full and both distillations (+74%: 8-bit AdamW's stochastic rounding holds
about 21 bytes per element of the 100.7M-element embedding where the plan counts 8); the two teacher passes
unplanned; every training run leaves its model and optimizer alive.
"""

from __future__ import annotations

import argparse
import csv
import gc
import inspect
import os
import random
import shutil
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

# First, before torch allocates anything: memory_accuracy's malloc settings (its import sets them) and meters.
from bench.memory_accuracy import _CpuMeter, in_child  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from ftflow.config import PipelineConfig, load_config  # noqa: E402
from ftflow.device import freeze_long_lived_objects  # noqa: E402
from ftflow.models import architecture  # noqa: E402
from ftflow.plan import decide as plan_decide  # noqa: E402
from ftflow.plan import predict as plan_predict  # noqa: E402
from ftflow.plan.fit import choose_fit  # noqa: E402
from ftflow.study import design  # noqa: E402
from ftflow.train.jobs import FullJob, Job, PrefixJob  # noqa: E402

MB = 10**6
WITHIN = 0.10
"""A stage is within plan when ``|measured / predicted - 1| <= WITHIN``."""
CUDA_LEAK_BYTES = 64 * 2**20
"""CUDA: memory still allocated after a stage beyond this counts as leaked (cuBLAS workspaces and RNG state are
a few MB and stay by design)."""
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "rehearsal"
PLANNED_DEVICE = "cuda"
"""Every prediction is made for CUDA, the product's device, on a CPU too: its allocated bytes differ from a CPU
prediction only by bitsandbytes' CPU step term, whose kernel's transients the CPU measurement leaves out."""
QUICK_LEFT_OUT_FAMILIES = ("llama-3.2",)
"""Families --quick leaves out on a CPU (see the module docstring: 8-bit AdamW's CPU kernel on a 128k embedding)."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """How big the rehearsal is (see :func:`settings_from`)."""

    device: str
    layers: Optional[int]  # decoder layers of every model (None: all)
    micro: bool  # tiny widths too (the test's micro run)
    max_length: int  # tokens of every sentence, start token included
    n_train: int
    n_eval: int  # validation and test sentences each
    epochs: Optional[int]  # None: the config's
    cap_bytes: int
    quick: bool


MICRO_NUMBERS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
MICRO_VOCAB = 512


# ----------------------------------------------------------------------------- models and data


@dataclass
class Model:
    """One model of the config: its real config, the config built here, and where its checkpoint is."""

    name: str
    hub: str  # the config's path (hub id or directory): where the real shapes come from
    family: str
    precision: str
    full_config: Any
    config: Any
    path: Path
    with_bos: bool
    parameters: int  # of the full model

    def as_spec(self, precision: Optional[str] = None) -> dict:
        """The benchmarked model dict the pipeline's jobs carry, pointing at the checkpoint built here."""
        return {"name": self.name, "path": str(self.path), "family": self.family,
                "precision": precision or self.precision, "trust_remote_code": False}


def built_config(full, layers: Optional[int], vocab_size: int, micro: bool, special_ids: dict):
    """``full``'s config with ``layers`` decoder layers (micro: tiny widths and ``vocab_size`` rows)."""
    numbers = full.to_dict()
    numbers.pop("layer_types", None)  # derived from the layer count (Qwen2): rebuilt for the new one
    if layers is not None:
        numbers["num_hidden_layers"] = layers
    if micro:
        numbers.update(MICRO_NUMBERS, vocab_size=vocab_size,
                       head_dim=MICRO_NUMBERS["hidden_size"] // MICRO_NUMBERS["num_attention_heads"])
    numbers.update(special_ids)
    return type(full).from_dict(numbers)


def _letters(vocab_size: int) -> str:
    """The alphabet of the words: as many letters as fit a vocabulary of ``vocab_size`` (see :func:`bpe_tokenizer`)."""
    for n in range(26, 1, -1):
        if 4 + 256 + n + 2 * n * n <= vocab_size:
            return "abcdefghijklmnopqrstuvwxyz"[:n]
    raise ValueError(f"a vocabulary of {vocab_size} ids is too small for the rehearsal's tokenizer (at least 272)")


def bpe_tokenizer(vocab_size: int, with_bos: bool):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids in which every two-letter word is one token.

    Byte-level BPE as Qwen2's (transformers 5 rebuilds a ``qwen2`` checkpoint's tokenizer as ``Qwen2Tokenizer``
    from its vocabulary and merges, with its own pre-tokenizer): 4 specials, the 256 byte symbols, then ``Ġx``,
    ``Ġxy`` and ``xy`` for letters x, y (merges build them), then filler tokens no text produces, up to
    ``vocab_size`` (the embedding's rows).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = _letters(vocab_size)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    pairs = [a + b for a in letters for b in letters]
    merges = ([("Ġ", c) for c in letters] + [("Ġ" + pair[0], pair[1]) for pair in pairs]
              + [(pair[0], pair[1]) for pair in pairs])
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]
    tokens += [f"<|filler{i}|>" for i in range(vocab_size - len(tokens))]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>" if with_bos else None,
                                   eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def sentences(n: int, length: int, letters: str, seed: int) -> list[str]:
    """``n`` sentences of ``length - 1`` random two-letter words (``length`` tokens with the start token)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(letters) + rng.choice(letters) for _ in range(length - 1)) for _ in range(n)]


def build_checkpoint(config, tokenizer, directory: Path, device: str = "cpu") -> dict:
    """Random bf16 weights of ``config``, made on ``device``, and the tokenizer, saved as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    from ftflow.models import zoo

    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # an 8B model's random initialisation takes minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    zoo.save_checkpoint(model, tokenizer, directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------- the stages


@dataclass
class Stage:
    """One stage run: what it is, its prediction, and the function that runs it (in the measuring process)."""

    label: str
    kind: str  # benchmark | train | teacher | evaluate
    model: str
    run: Callable[[], dict]
    predicted: Optional[plan_predict.MemoryPrediction]  # at the shape run here, for CUDA; None: unplanned
    full_peak_bytes: Optional[int]  # the full-depth plan on CUDA (context included); None: unplanned
    shape: str
    note: str = ""
    needs: tuple[str, ...] = ()
    skipped: Optional[str] = None  # not run: the plan says it does not fit (over budget)
    tokenizers: Callable[[], list[Path]] = list  # tokenizer directories to load before the baseline
    warm_up_as: str = ""  # the label of the stage whose warm-up it takes (default: its own)


@dataclass
class Rehearsal:
    """Everything the stages share."""

    cfg: PipelineConfig
    settings: Settings
    models: dict[str, Model]
    workdir: Path
    train: list[str]
    validation: list[str]
    test: list[str]
    teacher: str = ""
    student: str = ""
    eval_batch: int = 1
    decisions: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.settings.device

    @property
    def chunk(self) -> int:
        return self.cfg.benchmark.logits_chunk_tokens


def _scoring_prediction(config, precision: str, batch: int, length: int, device: str, chunk: int):
    return plan_predict.predict_scoring(config, precision, batch, length, device=device, logits_chunk_tokens=chunk)


def teacher_pass_prediction(config, precision: str, batch: int, length: int, *, k: int, variant: str, chunk: int,
                            device: str) -> Optional[plan_predict.MemoryPrediction]:
    """``ftflow.plan.predict.predict_teacher_pass`` when ftflow has it (None: the teacher pass is unplanned)."""
    predictor = getattr(plan_predict, "predict_teacher_pass", None)
    if predictor is None:
        return None
    return predictor(config, precision, batch, length, k=k, variant=variant, logits_chunk_tokens=chunk, device=device)


def _accepts(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


def benchmark_stage(r: Rehearsal, m: Model) -> Stage:
    decision = r.decisions[m.name]
    label = f"benchmark[{m.name}|{decision['precision'] or m.precision}]"
    if decision["precision"] is None:
        return Stage(label, "benchmark", m.name, lambda: {}, None, decision["peak_bytes"], "-",
                     skipped=f"the plan skips it: {decision['reason']}")
    precision, batch = decision["precision"], decision["batch_size"]
    n = min(batch, len(r.validation))
    length = r.settings.max_length
    predicted = _scoring_prediction(m.config, precision, n, length, PLANNED_DEVICE, r.chunk)

    def run() -> dict:  # tasks/benchmark.py
        from ftflow.models.loading import load_model, load_tokenizer
        from ftflow.perplexity import score_sentences

        tokenizer = load_tokenizer(str(m.path))
        model = load_model(str(m.path), precision, r.device)
        facts = {}
        for split, texts in (("validation", r.validation), ("test", r.test)):
            result = score_sentences(model, tokenizer, texts, batch_size=batch, max_length=r.cfg.max_length,
                                     progress=False, logits_chunk_tokens=r.chunk)
            facts[f"{split}_ppl"] = result.corpus_ppl
        return facts

    return Stage(label, "benchmark", m.name, run, predicted, decision["peak_bytes"], f"{n}x{length}",
                 note=f"planned batch {batch}")


def run_dict(job: Job, out_dir: Path) -> dict:
    """What :func:`ftflow.models.loading.load_trained` reads of a finished run (as the train stage's manifest has it)."""
    return {"name": job.name, "method": job.method, "precision": job.precision,
            "quantization": getattr(job, "quantization", None), "base_model": job.model, "dir": str(out_dir),
            "files": {"model": "model"}}


def _fit_text(plan) -> str:
    parts = [f"micro {plan.micro_batch_size}x{plan.accumulation_steps}" if plan.accumulation_steps > 1
             else f"batch {plan.batch_size}"]
    if plan.gradient_checkpointing:
        parts.append("gc")
    if plan.optimizer != "adamw":
        parts.append(plan.optimizer)
    if plan.prediction["precision"] != plan.precision:
        parts.append(f"{plan.prediction['precision']} weights")
    return ", ".join(parts)


def train_stage(r: Rehearsal, job: Job, kind_label: str, teacher_dir: Optional[Path] = None,
                needs: tuple[str, ...] = ()) -> Stage:
    """One training run through ``run_job``, with the fit plan of its full-depth model at the cap."""
    m = r.models[job.model["name"]]
    length = r.settings.max_length
    label = f"{kind_label}[{m.name}|{job.settings_label}]"
    method = job.method
    options = job.memory_options()
    fit = choose_fit(m.full_config, job.precision, method, batch_size=job.batch_size, max_length=length,
                     budget_bytes=r.settings.cap_bytes, fit_order=r.cfg.training.fit_order,
                     eval_batch_size=r.eval_batch, eval_length=length, logits_chunk_tokens=r.chunk, device="cuda",
                     bf16_supported=True, name=m.name, **options)
    if not fit.fits:
        return Stage(label, "train", m.name, lambda: {}, None, fit.peak_bytes, "-", needs=needs,
                     skipped=f"the plan skips it: {fit.reason}")
    n_val, n_test = min(r.eval_batch, len(r.validation)), min(r.eval_batch, len(r.test))
    train_precision = fit.prediction["precision"]
    step = plan_predict.predict_training(
        m.config, train_precision, "qlora" if method == "qlora" else method, fit.micro_batch_size, length,
        gradient_checkpointing=True if method == "qlora" else fit.gradient_checkpointing,
        eval_batch_size=n_val, eval_length=length, logits_chunk_tokens=r.chunk, device=PLANNED_DEVICE,
        optimizer=fit.optimizer, accumulation_steps=fit.accumulation_steps, **options)
    # run_job reloads the saved result at the job's precision to score test: a pass of its own.
    reload = _scoring_prediction(m.config, job.precision, n_test, length, PLANNED_DEVICE, r.chunk)
    predicted = max(step, reload, key=lambda p: p.allocated_bytes)
    out_dir, work_dir = r.workdir / "runs" / _slug(label), r.workdir / "work" / _slug(label)
    fit_plan = {**fit.model_dump(mode="json"), "summary": fit.summary}
    cfg = r.cfg

    def run() -> dict:  # tasks/train.py
        from ftflow.train.runner import run_job

        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        summary = run_job(
            job, train_sentences=r.train, validation_sentences=r.validation, test_sentences=r.test, seed=cfg.seed,
            max_length=cfg.max_length, device=r.device, eval_batch_size=r.eval_batch, work_dir=work_dir,
            out_dir=out_dir, logits_chunk_tokens=r.chunk, checkpoint_steps=cfg.training.checkpoint_steps,
            teacher_topk_dir=teacher_dir, progress=False, packing=cfg.training.packing,
            report_to=list(cfg.training.report_to), fit_plan=fit_plan)
        shutil.rmtree(work_dir, ignore_errors=True)  # checkpoints: the saved model is in out_dir
        return {"selection_ppl": summary["best_validation_ppl"], "test_ppl": summary["test"]["corpus_ppl"]}

    which = "reload for test" if predicted is reload else ("validation pass" if step.eval_peak_bytes >
                                                           step.step_peak_bytes else "step")
    return Stage(label, "train", m.name, run, predicted, fit.peak_bytes, f"{job.batch_size}x{length}", needs=needs,
                 note=f"{_fit_text(fit)}; peak: {which}")


def teacher_stage(r: Rehearsal, teacher_job: Job, teacher_label: str, variant: str) -> Stage:
    """The teacher pass of one variant at the largest k, on the teacher's LoRA run (tasks/teacher_logits.py)."""
    from ftflow.distill.teacher import teacher_topk_for_student

    m, student = r.models[r.teacher], r.models[r.student]
    k = max(r.cfg.distill.top_k)
    length = r.settings.max_length
    label = f"teacher[{teacher_job.name}|{variant}{k}]"
    n = min(r.eval_batch, len(r.train))
    chunked = _accepts(teacher_topk_for_student, "logits_chunk_tokens")
    chunk = r.chunk if chunked else plan_predict.DEFAULT_LOGITS_CHUNK_TOKENS
    predicted = teacher_pass_prediction(m.config, teacher_job.precision, n, length, k=k, variant=variant,
                                        chunk=chunk, device=PLANNED_DEVICE)
    full = teacher_pass_prediction(m.full_config, teacher_job.precision, r.eval_batch, length, k=k, variant=variant,
                                   chunk=chunk, device="cuda")
    teacher_run = run_dict(teacher_job, r.workdir / "runs" / _slug(teacher_label))
    out = r.workdir / "teacher" / variant
    cfg = r.cfg

    def run() -> dict:
        shutil.rmtree(out, ignore_errors=True)
        extra = {"logits_chunk_tokens": r.chunk} if chunked else {}
        topk = teacher_topk_for_student(teacher_run, student.as_spec(), r.train, k=k, max_length=cfg.max_length,
                                        device=r.device, batch_size=r.eval_batch, progress=False, variant=variant,
                                        seed=cfg.seed, **extra)
        topk.save(out / "topk")
        return {"positions": int(topk.offsets[-1])}

    return Stage(label, "teacher", m.name, run, predicted, None if full is None else full.peak_bytes,
                 f"{n}x{length}", needs=(teacher_label,),
                 note="unplanned: ftflow.plan.predict has no predict_teacher_pass" if predicted is None else f"k={k}")


def evaluate_stage(r: Rehearsal, job: Job, trained_label: str) -> Stage:
    """A finished run reloaded and its test split scored, in a process of its own."""
    m = r.models[job.model["name"]]
    length = r.settings.max_length
    n = min(r.eval_batch, len(r.test))
    run_info = run_dict(job, r.workdir / "runs" / _slug(trained_label))
    predicted = _scoring_prediction(m.config, job.precision, n, length, PLANNED_DEVICE, r.chunk)
    full = _scoring_prediction(m.full_config, job.precision, r.eval_batch, length, "cuda", r.chunk)

    def run() -> dict:
        from ftflow.models.loading import load_trained
        from ftflow.models.loading import load_tokenizer
        from ftflow.perplexity import score_sentences

        model = load_trained(run_info, r.device)
        result = score_sentences(model, load_tokenizer(str(m.path)), r.test, batch_size=r.eval_batch,
                                 max_length=r.cfg.max_length, progress=False, logits_chunk_tokens=r.chunk)
        return {"test_ppl": result.corpus_ppl}

    return Stage(f"evaluate[{job.name}]", "evaluate", m.name, run, predicted, full.peak_bytes, f"{n}x{length}",
                 needs=(trained_label,), note="reload + test")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in label)[:120]


def stage_sequence(r: Rehearsal) -> list[Stage]:
    """The config's stages, as ftflow/study/design.py decides them (see the module docstring for what is left out)."""
    cfg = r.cfg
    epochs = r.settings.epochs
    stages = [benchmark_stage(r, m) for m in r.models.values()]
    benchmarks = [{"name": m.name, "model": m.as_spec(r.decisions[m.name]["precision"] or m.precision),
                   "parameters": m.parameters} for m in r.models.values() if r.decisions[m.name]["precision"]]
    teacher, student = r.models[r.teacher], r.models[r.student]
    selection = {"teacher": teacher.name, "student": student.name,
                 "teacher_model": next(b["model"] for b in benchmarks if b["name"] == teacher.name),
                 "student_model": next(b["model"] for b in benchmarks if b["name"] == student.name)}

    def shorter(job):
        return job if epochs is None else job.model_copy(update={"epochs": epochs})

    # 1. The LoRA grid's largest-memory combination on the teacher, taken as its best one.
    grid = design.lora_grid_jobs(cfg, selection)
    best = shorter(max(grid, key=lambda j: (j.r, j.dropout, j.alpha)))
    grid_stage = train_stage(r, best, "lora-grid")
    stages.append(grid_stage)
    # 2. Per compared model: LoRA, QLoRA, full fine-tuning; the prefix grid's longest prefix on the teacher.
    per_model = design.per_model_jobs(cfg, benchmarks, selection, best)
    prefix = [j for j in per_model if isinstance(j, PrefixJob)]
    for job in per_model:
        if isinstance(job, PrefixJob) and job is not max(prefix, key=lambda p: (p.num_virtual_tokens, p.learning_rate)):
            continue
        stages.append(train_stage(r, shorter(job), job.method))
    # 3. The teacher pass per variant, then distillation per variant at the largest k.
    k = max(cfg.distill.top_k)
    for variant in design.distillation_variants(cfg):
        teacher = teacher_stage(r, best, grid_stage.label, variant)
        stages.append(teacher)
        jobs = [j for j in design.distillation_jobs(cfg, selection, variant) if j.top_k == k]
        distill = train_stage(r, shorter(jobs[0]), "distill", teacher_dir=r.workdir / "teacher" / variant / "topk",
                              needs=(teacher.label,))
        stages.append(distill)
        if variant == design.distillation_variants(cfg)[0]:
            first_distill = (shorter(jobs[0]), distill.label)
    reference = shorter(design.distillation_reference(cfg, selection))
    if not any(isinstance(j, FullJob) and shorter(j) == reference for j in per_model):
        stages.append(train_stage(r, reference, "full-reference"))
    # 4. Evaluation: the (first) distilled student reloaded and scored on test.
    stages.append(evaluate_stage(r, *first_distill))
    for stage in stages:
        stage.tokenizers = lambda: tokenizer_directories(r)
    return stages


# ----------------------------------------------------------------------------- measuring


def _blocked_bf16_mm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, alpha=1, beta=1,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``beta * bias + alpha * a @ b`` for bf16 ``a`` [M, K] and ``b`` [K, N], computed in fp32 blocks of ``b``.

    The fp32 copies are one block at a time (:data:`CpuBf16Matmul.BLOCK_ELEMENTS`), plus ``a`` in fp32.
    """
    rows, inner = a.shape
    columns = b.shape[1]
    out = torch.empty((rows, columns), dtype=a.dtype, device=a.device) if out is None else out
    left = a.float()
    step = max(1, CpuBf16Matmul.BLOCK_ELEMENTS // max(1, inner))
    for start in range(0, columns, step):
        block = left @ b[:, start:start + step].float()
        if alpha != 1:
            block.mul_(alpha)
        if bias is not None:
            block.add_(bias[..., start:start + step].float(), alpha=beta)
        out[:, start:start + step] = block
        del block
    return out


class CpuBf16Matmul(TorchDispatchMode):
    """On a CPU without AVX512-BF16: bf16 matrix products in fp32 blocks (same shapes, fp32 accumulation).

    torch's bf16 GEMM on such CPUs (AVX2 only) runs about 100 times slower than fp32 when the reduction runs
    along a strided dimension, as in every backward through a linear layer (measured here: 146 s for a
    [16, 49159] x [49159, 4096] product, 1.6 s for the forward's layout, 2.5 s in fp32), which would make a
    bf16 training stage take an hour. Products are computed from fp32 copies of the left operand and of one
    block of the right one at a time (at most 8 MB), then rounded to bf16: the tensors every op returns are
    the same; only these transient copies are extra (a few percent of a stage's peak at the rehearsal's sizes).
    """

    BLOCK_ELEMENTS = 1 << 21

    @staticmethod
    def wanted() -> bool:
        """Whether this CPU needs it (torch's own bf16 kernels are fast with AVX512-BF16)."""
        return "AVX512" not in torch.backends.cpu.get_cpu_capability()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten

        def bf16_cpu(*tensors) -> bool:
            return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)

        def slow(a, b) -> bool:  # the forward's layout (both operands contiguous along the reduction) is fast
            return not (a.stride(-1) == 1 and b.stride(-2) == 1)

        if func is aten.mm.default and bf16_cpu(*args) and slow(*args):
            return _blocked_bf16_mm(*args)
        if func is aten.addmm.default and bf16_cpu(*args[:3]) and slow(*args[1:3]):
            return _blocked_bf16_mm(args[1], args[2], args[0], kwargs.get("alpha", 1), kwargs.get("beta", 1))
        if func is aten.bmm.default and bf16_cpu(*args) and slow(*args):
            left, right = args
            out = torch.empty((left.shape[0], left.shape[1], right.shape[2]), dtype=left.dtype)
            for i in range(left.shape[0]):
                _blocked_bf16_mm(left[i], right[i], out=out[i])
            return out
        return func(*args, **kwargs)



class LeftOutSteps:
    """Around the steps a GPU's memory does not see, set the peak aside and restart it (CPU measurement).

    The host does them on a GPU: loading a checkpoint, writing one. CUDA's fused kernel has no transients
    where bitsandbytes' CPU reference kernel of the 8-bit AdamW step holds 20 bytes per element of the tensor
    it updates (:data:`ftflow.plan.predict.ADAMW_8BIT_STEP_BYTES_PER_ELEMENT`). What they leave resident counts.

    ``/proc/self/clear_refs`` (5) resets ``VmHWM`` to the current resident set. Before such a step the peak so
    far is kept; after it, what it left resident is kept and the peak restarts there. The stage's peak is the
    largest of those and the final ``VmHWM``; ``raw`` also keeps the peaks inside the steps.
    """

    def __init__(self, meter: _CpuMeter):
        self.meter = meter
        self.kept: list[int] = []
        self.raw: list[int] = []
        self.depth = 0

    @staticmethod
    def _restart_peak() -> None:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    def wrap(self, function: Callable) -> Callable:
        steps = self

        def host_only(*args, **kwargs):
            steps.depth += 1
            if steps.depth == 1:
                steps.kept.append(steps.meter._status("VmHWM"))
            try:
                return function(*args, **kwargs)
            finally:
                steps.depth -= 1
                if steps.depth == 0:
                    steps.raw.append(steps.meter._status("VmHWM"))
                    steps.kept.append(steps.meter.rss())
                    steps._restart_peak()

        host_only.__wrapped__ = function
        return host_only

    def install(self) -> None:
        import peft
        import transformers

        auto = transformers.AutoModelForCausalLM
        auto.from_pretrained = self.wrap(auto.from_pretrained)
        for cls in (transformers.PreTrainedModel, peft.PeftModel):
            cls.save_pretrained = self.wrap(cls.save_pretrained)
        transformers.Trainer._save_checkpoint = self.wrap(transformers.Trainer._save_checkpoint)
        import bitsandbytes.functional as bnb_functional

        for name in ("optimizer_update_8bit_blockwise", "optimizer_update_32bit"):
            setattr(bnb_functional, name, self.wrap(getattr(bnb_functional, name)))

    def peaks(self) -> tuple[int, int]:
        """(peak without the host-only steps' transients, raw peak), as growth over the meter's base."""
        final = self.meter._status("VmHWM")
        return max([*self.kept, final]) - self.meter.base, max([*self.raw, *self.kept, final]) - self.meter.base


class LiveObjects:
    """Weak references to every model loaded and every optimizer made: which are still alive, and their bytes."""

    def __init__(self) -> None:
        self.models: list[weakref.ref] = []
        self.optimizers: list[weakref.ref] = []
        self._originals: Optional[tuple] = None

    def install(self) -> "LiveObjects":
        """Track from now on (``AutoModelForCausalLM.from_pretrained``, ``torch.optim.Optimizer.__init__``)."""
        import transformers

        auto = transformers.AutoModelForCausalLM
        loaded_by = auto.from_pretrained
        made_by = torch.optim.Optimizer.__init__
        self._originals = (loaded_by, made_by)
        live = self

        def from_pretrained(*args, **kwargs):
            model = loaded_by(*args, **kwargs)
            live.models.append(weakref.ref(model))
            return model

        def optimizer_init(optimizer, *args, **kwargs):
            made_by(optimizer, *args, **kwargs)
            live.optimizers.append(weakref.ref(optimizer))

        auto.from_pretrained = from_pretrained
        torch.optim.Optimizer.__init__ = optimizer_init
        return self

    def uninstall(self) -> None:
        """Stop tracking (what is tracked stays countable)."""
        import transformers

        if self._originals is not None:
            transformers.AutoModelForCausalLM.from_pretrained, torch.optim.Optimizer.__init__ = self._originals
            self._originals = None

    def alive(self) -> dict:
        """Counts and bytes (each storage once) of what is still alive; no garbage collection."""
        seen: set[int] = set()

        def tensor_bytes(tensors) -> int:
            total = 0
            for tensor in tensors:
                if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                    continue
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            return total

        models = [ref() for ref in self.models if ref() is not None]
        optimizers = [ref() for ref in self.optimizers if ref() is not None]
        bytes_ = sum(tensor_bytes(list(m.parameters()) + list(m.buffers())) for m in models)
        bytes_ += sum(tensor_bytes(v for state in o.state.values() for v in state.values()) for o in optimizers
                      if isinstance(getattr(o, "state", None), dict))
        return {"models": len(models), "optimizers": len(optimizers), "bytes": bytes_}


def share_tokenizers(directories: Sequence[Path]) -> None:
    """Load the tokenizers of ``directories`` now and hand out the same ones later (``AutoTokenizer``).

    A tokenizer is host memory a GPU never holds (Qwen2's 151,936-token vocabulary is about 50 MB of Python
    objects): loaded before the baseline, it is not counted in a stage's peak.
    """
    import transformers

    loaded_by = transformers.AutoTokenizer.from_pretrained
    cache: dict = {}

    def from_pretrained(path, *args, **kwargs):
        key = (str(path), bool(kwargs.get("trust_remote_code")), args)
        if key not in cache:
            cache[key] = loaded_by(path, *args, **kwargs)
        return cache[key]

    transformers.AutoTokenizer.from_pretrained = from_pretrained
    for directory in directories:
        if Path(directory).is_dir():
            from_pretrained(str(directory), trust_remote_code=False)


def tokenizer_directories(r: "Rehearsal") -> list[Path]:
    """Every model's, and every stored teacher's (distillation reads it back), in ``r``."""
    return [*(m.path for m in r.models.values()), *sorted((r.workdir / "teacher").glob("*/topk/teacher_tokenizer"))]


def measure_on_cpu(stage: Stage, warm_up: Optional[Stage]) -> dict:
    """Run ``stage`` in this (forked) process: its peak without host-only transients, what it left alive.

    ``warm_up`` (the same stage on micro models) runs first, so that one-time costs (thread pools, kernel
    caches, lazily loaded libraries, the Trainer's first set-up) are not counted, as memory_accuracy does.
    """
    if CpuBf16Matmul.wanted():
        CpuBf16Matmul().__enter__()  # for the child's whole life (it ends with the stage)
    if warm_up is not None:
        warm_up.run()
    share_tokenizers(stage.tokenizers())
    meter = _CpuMeter()  # collects, trims malloc, takes the base resident set
    LeftOutSteps._restart_peak()
    steps, live = LeftOutSteps(meter), LiveObjects()
    live.install()
    steps.install()
    gc.disable()  # for the whole stage: what only a collection would free is still alive after it
    started = time.perf_counter()
    facts = stage.run() or {}
    seconds = time.perf_counter() - started
    peak, raw = steps.peaks()
    alive = live.alive()  # before anything is collected
    return {"measured_bytes": peak, "raw_bytes": raw, "alive": alive, "seconds": seconds, "facts": facts}


def measure_on_cuda(stage: Stage, warm_up: Optional[Stage]) -> dict:
    """Run ``stage`` in this process on the GPU: allocated and reserved peaks, what it left alive and allocated."""
    if warm_up is not None:
        warm_up.run()
    live = LiveObjects().install()
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    gc.disable()
    started = time.perf_counter()
    try:
        facts = stage.run() or {}
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        alive = live.alive()
        left = torch.cuda.memory_allocated() - before
    finally:
        gc.enable()
        live.uninstall()
    return {"measured_bytes": torch.cuda.max_memory_allocated() - before, "raw_bytes": None, "alive": alive,
            "cuda_left_bytes": left, "reserved_bytes": torch.cuda.max_memory_reserved(), "seconds": seconds,
            "facts": facts}


def run_stage(stage: Stage, device: str, warm_up: Optional[Stage] = None) -> dict:
    """``stage`` measured (after ``warm_up``): in a forked child on a CPU, in this process on a GPU."""
    if device == "cpu":
        return in_child(measure_on_cpu, stage, warm_up)
    try:
        return {"ok": True, **measure_on_cuda(stage, warm_up)}
    except Exception as exc:  # recorded in the row; the next stages still run
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                "out_of_memory": isinstance(exc, torch.cuda.OutOfMemoryError)}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- rows and report


def make_row(stage: Stage, result: Optional[dict], settings: Settings, context_bytes: int = 0,
             failed_need: Optional[str] = None) -> dict:
    """One row of the table from a stage and its measurement (None: not run)."""
    row = {"stage": stage.label, "kind": stage.kind, "model": stage.model, "shape": stage.shape,
           "predicted_mb": None, "measured_mb": None, "error_pct": None, "within": False,
           "full_plan_gb": None if stage.full_peak_bytes is None else stage.full_peak_bytes / 1e9,
           "over_budget": False, "leaked": False, "leaked_objects": "", "leaked_mb": None, "raw_mb": None,
           "reserved_mb": None, "seconds": None, "status": "ok", "note": stage.note, "error": ""}
    if stage.predicted is not None:
        row["predicted_mb"] = stage.predicted.allocated_bytes / MB
    if stage.full_peak_bytes is not None and stage.full_peak_bytes > settings.cap_bytes:
        row["over_budget"] = True
    if stage.skipped:
        row.update(status="skipped", error=stage.skipped, over_budget=True)
        return row
    if failed_need:
        row.update(status="not run", error=f"needs {failed_need}, which did not finish")
        return row
    if not result["ok"]:
        row.update(status="failed", error=result["error"])
        if result.get("out_of_memory"):
            row["over_budget"] = True
        return row
    measured = result["measured_bytes"]
    row.update(measured_mb=measured / MB, seconds=result["seconds"],
               raw_mb=None if result.get("raw_bytes") is None else result["raw_bytes"] / MB,
               reserved_mb=None if result.get("reserved_bytes") is None else result["reserved_bytes"] / MB)
    if stage.predicted is not None and stage.predicted.allocated_bytes > 0:
        error = measured / stage.predicted.allocated_bytes - 1
        row.update(error_pct=100 * error, within=abs(error) <= WITHIN)
    else:
        row["status"] = "unplanned"
    if settings.layers is None and not settings.micro and measured + context_bytes > settings.cap_bytes:
        row["over_budget"] = True  # a full-depth model measured over the card
    alive = result["alive"]
    leaked_cuda = result.get("cuda_left_bytes") is not None and result["cuda_left_bytes"] > CUDA_LEAK_BYTES
    if alive["models"] or alive["optimizers"] or leaked_cuda:
        parts = [f"{alive['models']} model(s)" if alive["models"] else "",
                 f"{alive['optimizers']} optimizer(s)" if alive["optimizers"] else "",
                 f"{result['cuda_left_bytes'] / MB:.0f} MB still allocated" if leaked_cuda else ""]
        row.update(leaked=True, leaked_objects=", ".join(p for p in parts if p), leaked_mb=alive["bytes"] / MB)
    return row


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


COLUMNS = ("stage", "shape", "predicted MB", "measured MB", "error", "within 10%", "full plan GB", "over budget",
           "leaked", "s", "note")


def table_cells(row: dict) -> list[str]:
    error = "" if row["error_pct"] is None else f"{row['error_pct']:+.1f}%"
    leaked = (f"yes: {row['leaked_objects']}, {row['leaked_mb']:,.0f} MB" if row["leaked"] else "no")
    note = "; ".join(p for p in (row["status"] if row["status"] != "ok" else "", row["note"], row["error"]) if p)
    cells = [row["stage"], row["shape"], _fmt(row["predicted_mb"]), _fmt(row["measured_mb"]), error,
             _fmt(row["within"]), _fmt(row["full_plan_gb"], 2), _fmt(row["over_budget"]), leaked,
             _fmt(row["seconds"], 1), note.replace("\n", " ")[:300]]
    return [cell.replace("|", "\\|") for cell in cells]  # stage labels hold "|" (model|settings)


def markdown_table(rows: Sequence[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return lines + ["| " + " | ".join(table_cells(row)) + " |" for row in rows]


def last_line(rows: Sequence[dict]) -> str:
    """``rehearsal: N of M stages within 10% of plan, X over budget, Y leaked``."""
    within = sum(row["within"] for row in rows)
    over = sum(row["over_budget"] for row in rows)
    leaked = sum(row["leaked"] for row in rows)
    return f"rehearsal: {within} of {len(rows)} stages within 10% of plan, {over} over budget, {leaked} leaked"


def failed(rows: Sequence[dict]) -> bool:
    return any(not row["within"] or row["over_budget"] or row["leaked"] for row in rows)


def write_outputs(out: Path, rows: Sequence[dict], header: Sequence[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rehearsal.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["stage"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "rehearsal.md").write_text("\n".join([*header, "", *markdown_table(rows), "", last_line(rows)]) + "\n")


# ----------------------------------------------------------------------------- setting up


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a ftflow config with a models: list (e.g. configs/seed-20gb.yaml)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of every model (default: 1 on cpu, all on cuda)")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="the card's memory (default: the config's training budget)")
    parser.add_argument("--quick", action="store_true",
                        help="the selected family's teacher and student and one small model per other family, "
                             "1 epoch, 16 tokens a sentence (see the module docstring)")
    parser.add_argument("--micro", action="store_true", help="tiny widths too (the test's run: seconds per stage)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per sentence (default: 16 quick and micro, 32 on cpu, the config's max_length on cuda)")
    parser.add_argument("--sentences", type=int, default=None,
                        help="training sentences (default 8: two optimizer steps at the seed config's batch of 4, so "
                             "the second runs with the optimizer state resident); validation and test get a quarter "
                             "as many each (at least 2)")
    parser.add_argument("--models", default=None, help="comma-separated model names of the config (default: see --quick)")
    parser.add_argument("--family", default=None, help="the family taken as selected (default: the largest teacher's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"table folder (default {DEFAULT_OUT})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="checkpoints and runs (default: OUT/work, deleted at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and runs")
    parser.add_argument("--plan-only", action="store_true", help="print the stages and their plans; run nothing")
    return parser.parse_args(argv)


class RehearsalError(SystemExit):
    """A bad command line or config: one line, exit status 2."""

    def __init__(self, message: str):
        print(f"rehearsal: {message}", file=sys.stderr)
        super().__init__(2)


def settings_from(args: argparse.Namespace, cfg: PipelineConfig) -> Settings:
    problems = []
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA GPU is visible; run on a GPU machine or use --device cpu")
    layers = args.layers if args.layers is not None else (None if args.device == "cuda" else 1)
    if layers is not None and layers < 1:
        problems.append(f"--layers must be >= 1, got {layers}")
    default_length = 16 if args.micro or args.quick else 32 if args.device == "cpu" else cfg.max_length
    length = args.max_length or default_length
    if not 3 <= length <= cfg.max_length:
        problems.append(f"--max-length must be in [3, {cfg.max_length}] (the config's max_length), got {length}")
    n_train = args.sentences or 8
    if n_train < 2:
        problems.append(f"--sentences must be >= 2, got {n_train}")
    cap = args.memory_cap_gb if args.memory_cap_gb is not None else cfg.training_budget_gb
    if cap <= 0:
        problems.append(f"--memory-cap-gb must be > 0, got {cap}")
    if problems:
        raise RehearsalError("; ".join(problems))
    return Settings(device=args.device, layers=layers, micro=args.micro, max_length=length, n_train=n_train,
                    n_eval=max(2, n_train // 4), epochs=1 if args.quick or args.micro else None,
                    cap_bytes=int(cap * plan_predict.GB), quick=args.quick)


def choose_models(args: argparse.Namespace, cfg: PipelineConfig, full_configs: dict
                  ) -> tuple[list, str, str, str, dict[str, int]]:
    """(the config's models to rehearse, selected family, teacher, student, every model's parameters)."""
    from ftflow.study.selection import select_family

    specs = list(cfg.models or [])
    if not specs:
        raise RehearsalError(f"{args.config} has no models: list (a zoo config builds its own small models; "
                             "the rehearsal is for hub models, e.g. configs/seed-20gb.yaml)")
    parameters = {s.name: architecture.count_config_parameters(full_configs[s.name]) for s in specs}
    families = sorted({s.family for s in specs})
    family = args.family or max(families, key=lambda f: max(parameters[s.name] for s in specs if s.family == f))
    if family not in families:
        raise RehearsalError(f"--family {family!r} is not a family of {args.config}; choose from {families}")
    # Random weights give no scores: equal ones, so ftflow's own rule picks by size (and name among equals).
    same = {"validation": {"bits_per_byte": 1.0, "corpus_ppl": 1.0}}
    members = [{"name": s.name, "family": s.family, "parameters": parameters[s.name], **same}
               for s in specs if s.family == family]
    chosen = select_family(members, split="validation", metric=cfg.select.metric,
                           student_max_params=cfg.select.student_max_params)
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in parameters]
        if unknown:
            raise RehearsalError(f"--models: unknown {unknown}; the config has {sorted(parameters)}")
        wanted = set(names) | {chosen["teacher"], chosen["student"]}
    elif args.quick or args.micro:
        wanted = {chosen["teacher"], chosen["student"]}
        for other in families:
            if other != family and other not in QUICK_LEFT_OUT_FAMILIES:
                wanted.add(min((s for s in specs if s.family == other), key=lambda s: parameters[s.name]).name)
    else:
        wanted = set(parameters)
    return [s for s in specs if s.name in wanted], family, chosen["teacher"], chosen["student"], parameters


def prepare(args: argparse.Namespace) -> tuple[Rehearsal, list[str]]:
    """Config, settings, models, tokenizers, data and the benchmark plan; nothing built yet."""
    from ftflow.config import ConfigError

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        raise RehearsalError(str(exc)) from None
    settings = settings_from(args, cfg)
    full_configs = {}
    for spec in cfg.models or []:
        try:
            full_configs[spec.name] = architecture.model_config_for(spec.path, spec.trust_remote_code)
        except architecture.UnknownModelError as exc:
            raise RehearsalError(str(exc)) from None
    specs, family, teacher, student, parameters = choose_models(args, cfg, full_configs)
    workdir = args.workdir or args.out / "work"
    # One tokenizer per family: its smallest embedding's rows (micro: a small vocabulary).
    vocab = {}
    for spec in specs:
        rows = MICRO_VOCAB if settings.micro else full_configs[spec.name].vocab_size
        vocab[spec.family] = min(vocab.get(spec.family, rows), rows)
    models = {}
    for spec in specs:
        with_bos = "qwen" not in (getattr(full_configs[spec.name], "model_type", "") or "")  # Qwen2: no BOS
        config = built_config(full_configs[spec.name], settings.layers, vocab[spec.family], settings.micro,
                              {**SPECIAL_IDS, "bos_token_id": SPECIAL_IDS["bos_token_id"] if with_bos else None})
        models[spec.name] = Model(spec.name, spec.path, spec.family, spec.precision, full_configs[spec.name], config,
                                  workdir / "models" / spec.name, with_bos, parameters[spec.name])
    letters = _letters(min(vocab.values()))
    length = settings.max_length
    r = Rehearsal(cfg, settings, models, workdir, train=sentences(settings.n_train, length, letters, 1),
                  validation=sentences(settings.n_eval, length, letters, 2),
                  test=sentences(settings.n_eval, length, letters, 3), teacher=teacher, student=student)
    for m in models.values():
        r.decisions[m.name] = plan_decide.plan_candidate(
            m.name, m.hub, settings.cap_bytes, precision=m.precision, batch_size=cfg.benchmark.batch_size,
            max_length=length, batch_size_cap=cfg.memory.batch_size_cap, allow_nf4=cfg.memory.allow_nf4,
            device="cuda", logits_chunk_tokens=r.chunk)
    r.eval_batch = design.evaluation_batch_size(cfg, r.decisions)
    layers = "all layers" if settings.layers is None else f"{settings.layers} decoder layer(s)"
    header = [
        f"# ftflow rehearsal of {args.config}",
        "",
        f"Device {settings.device}; {'micro widths, ' if settings.micro else 'real widths, '}{layers}; "
        f"{length} tokens a sentence; {settings.n_train} training, {settings.n_eval} validation and test sentences; "
        f"{'1 epoch' if settings.epochs else 'the config''s epochs'}; memory cap {settings.cap_bytes / 1e9:g} GB.",
        f"Selected family (random weights: the largest teacher's unless --family): {family}: teacher {teacher}, "
        f"student {student}. Models: {', '.join(models)}.",
        f"Evaluation batch (the plan's smallest benchmark batch): {r.eval_batch}.",
        "",
        "error = measured / predicted - 1 (the prediction's allocated bytes for the shape run here); full plan: "
        "the full-depth model's plan on CUDA at that shape, context included, against the cap.",
    ]
    return r, header


def build(r: Rehearsal) -> None:
    """Tokenizers and checkpoints (each in a child on a CPU, so this process never runs a kernel)."""
    tokenizers: dict[tuple[str, bool], Any] = {}
    for m in r.models.values():
        vocab = m.config.vocab_size if r.settings.micro else min(
            o.full_config.vocab_size for o in r.models.values() if o.family == m.family)
        key = (m.family, m.with_bos)
        if key not in tokenizers:
            tokenizers[key] = bpe_tokenizer(vocab, m.with_bos)
        if (m.path / "config.json").is_file():
            continue
        started = time.perf_counter()
        if r.device == "cpu":
            result = in_child(build_checkpoint, m.config, tokenizers[key], m.path)
        else:
            result = {"ok": True, **build_checkpoint(m.config, tokenizers[key], m.path, "cuda")}
        if not result["ok"]:
            raise RuntimeError(f"could not build {m.name}'s checkpoint in {m.path}: {result['error']}")
        print(f"built {m.name} ({architecture.count_config_parameters(m.config):,} parameters) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    # Every sentence must be exactly the planned length under every model's tokenizer, as loaded by ftflow.
    from ftflow.models.loading import load_tokenizer
    from ftflow.tokens import sentence_ids

    for m in r.models.values():
        tokenizer = load_tokenizer(str(m.path))
        lengths = {len(sentence_ids(tokenizer, text, r.cfg.max_length)[0]) for text in r.train + r.validation + r.test}
        if lengths != {r.settings.max_length}:
            raise RuntimeError(f"{m.name}'s tokenizer ({type(tokenizer).__name__}) encodes the sentences to "
                               f"{sorted(lengths)} tokens, not {r.settings.max_length}")


def quiet() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("ftflow").setLevel(logging.WARNING)


def import_everything() -> None:
    """Import what the stages use once, here, so no child pays for (or counts) an import."""
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import optimi  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.granite.modeling_granite  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401

    import ftflow.distill.teacher  # noqa: F401
    import ftflow.distill.trainer  # noqa: F401
    import ftflow.train.optimizers  # noqa: F401
    import ftflow.train.runner  # noqa: F401
    import ftflow.train.trainer  # noqa: F401


def cuda_context_bytes() -> int:
    """What the CUDA context takes on the card: used memory that the caching allocator does not hold."""
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def run_all(r: Rehearsal, stages: Sequence[Stage], context_bytes: int = 0,
            warm_ups: Optional[dict[str, Stage]] = None) -> list[dict]:
    rows, done = [], {}
    for stage in stages:
        failed_need = next((n for n in stage.needs if not done.get(n)), None)
        result = None
        if not stage.skipped and failed_need is None:
            print(f"... {stage.label}", flush=True)
            result = run_stage(stage, r.device, (warm_ups or {}).get(stage.warm_up_as or stage.label))
        row = make_row(stage, result, r.settings, context_bytes, failed_need)
        done[stage.label] = result is not None and result["ok"]
        rows.append(row)
        print(" | ".join(table_cells(row)), flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None,
         adjust_stages: Optional[Callable[[list[Stage]], list[Stage]]] = None) -> int:
    """The rehearsal; ``adjust_stages`` (tests) may change the stage list before it runs."""
    args = parse_args(argv)
    started = time.perf_counter()
    r, header = prepare(args)
    stages = stage_sequence(r)
    # The same stages on micro models, run before each measured one in its process (see measure_on_cpu); a micro
    # run is its own warm-up (its figures show the code path, not the planner's accuracy).
    warm, warm_ups = None, {}
    if not args.micro:
        warm_args = argparse.Namespace(**{**vars(args), "micro": True, "quick": True, "max_length": 16,
                                          "sentences": 8, "workdir": r.workdir / "warm", "layers": 1,
                                          "models": ",".join(r.models)})
        warm, _ = prepare(warm_args)
        warm_ups = {stage.label: stage for stage in stage_sequence(warm)}
    if adjust_stages is not None:
        stages = adjust_stages(stages)
    if args.plan_only:
        for stage in stages:
            predicted = "unplanned" if stage.predicted is None else f"{stage.predicted.allocated_bytes / MB:,.0f} MB"
            full = "" if stage.full_peak_bytes is None else f"{stage.full_peak_bytes / 1e9:.2f} GB"
            print(f"{stage.label:<75} {stage.shape:>8} {predicted:>12} {full:>9}  {stage.skipped or stage.note}")
        return 0
    quiet()
    import_everything()
    freeze_long_lived_objects()  # as a stage's process does: each free_memory walks only what a stage made
    context = 0
    if r.device == "cuda":
        context = cuda_context_bytes()
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        fraction = (r.settings.cap_bytes - context) / total
        if not 0 < fraction <= 1:
            raise RehearsalError(f"--memory-cap-gb {r.settings.cap_bytes / 1e9:g} leaves no room beside the CUDA "
                                 f"context ({context / 1e9:.2f} GB) on a {total / 1e9:.1f} GB card")
        torch.cuda.set_per_process_memory_fraction(fraction)
        header = [*header, f"CUDA context {context / MB:,.0f} MB; allocator capped at {fraction:.3f} of "
                           f"{total / 1e9:.1f} GB."]
    print("\n".join(header), flush=True)
    try:
        if warm is not None:
            build(warm)
        build(r)
        rows = run_all(r, stages, context, warm_ups)
    finally:
        if not args.keep:
            shutil.rmtree(r.workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    header = [*header, f"Wall time {elapsed:.0f} s."]
    write_outputs(args.out, rows, header)
    print()
    print("\n".join(markdown_table(rows)))
    print(f"wrote {args.out / 'rehearsal.md'} and {args.out / 'rehearsal.csv'} ({elapsed:.0f} s)")
    print(last_line(rows))
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
