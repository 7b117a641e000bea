"""Predicted against measured peak memory, for scoring, one training step of each method and the teacher pass.

    python bench/memory_accuracy.py [--quick] [--only TEXT] [--csv PATH] [--device cpu|cuda]

Models are built here from configs (random initialisation, nothing
downloaded): a zoo-like Granite teacher (the demo's shape), a 40M Qwen2, a
125M Llama and, for scoring, a 333M Granite and a Llama with a 100k vocabulary
(one batch of 2 x 2048 tokens, scored from full logits and chunk by chunk: the
logits' share of the peak before and after chunked scoring); for the teacher
pass, granite-3.3-8b's and Qwen2.5-1.5B's shapes cut to one layer (Granite with
its real multipliers and ``logits_scaling``, Qwen with its 152k vocabulary).
Each case is run the way ftflow runs it (scoring: :func:`ftflow.perplexity.batch_nll` under
``inference_mode``, chunked unless the case says ``logits_chunk_tokens=0``;
distillation: the student's forward and :func:`ftflow.distill.losses.kd_loss` on
stored top-k (k = 16), then as full training; training: forward with labels, backward,
gradient clipping and a fused AdamW step whose state already exists, so the
measured step is a steady-state one; LoRA/QLoRA/prefix through PEFT, QLoRA
through :func:`ftflow.models.loading.load_model` and ``prepare_model_for_kbit_training``
as :func:`ftflow.train.trainer.train_lora` does; the teacher pass:
:func:`ftflow.distill.teacher.compute_teacher_topk` over one batch, k = 100, the teacher
plain, with an unmerged LoRA adapter or a prefix, as ``load_trained`` loads a run;
``step-8bit``: ftflow's 8-bit AdamW step alone on one 32M-element tensor whose
gradient and state exist) and compared with
:func:`ftflow.plan.predict.predict_scoring` / :func:`ftflow.plan.predict.predict_training` /
:func:`ftflow.plan.predict.predict_teacher_pass` / :func:`ftflow.plan.predict.adamw_8bit_step_bytes`.
Sequences are full length; one pad in the last row makes the batch a padded
one, as real batches are.

How memory is measured:

* cuda: cases run one after another in this process; the peak is
  ``torch.cuda.max_memory_allocated`` minus what was allocated before the model
  existed, compared with the prediction's ``allocated_bytes`` (the peak without
  the CUDA context, which the allocator does not see).
* cpu: ``tracemalloc`` does not see torch's allocations, and torch has no CPU
  peak counter, so each case runs in a forked child process and the peak is the
  growth of the process's resident set: ``VmHWM`` (reset through
  ``/proc/self/clear_refs`` after the model is built, so loading transients do
  not count) minus ``VmRSS`` before the model was built. glibc is told to serve
  every block over 64 KiB with ``mmap`` (``mallopt``), so freed tensors leave
  the resident set at once instead of lingering in malloc's heap, and MKL's
  buffer cache is off (``MKL_DISABLE_FAST_MM``): its GEMM packing buffers
  (up to ~32 MB) then live only during the product that needs them, instead
  of staying resident from whichever case first needed them. Before the
  baseline is read, the child runs the same case once on a micro model of the
  same architecture, so one-time costs (thread pool, kernel caches, lazily
  loaded libraries) are not counted.
  An NF4 model is loaded from a bf16 checkpoint written to a temporary folder;
  its unquantized tensors are copied out of the memory-mapped file so the
  file's page cache does not count as model memory. What the measurement still
  counts that the prediction does not: malloc/page rounding, per-thread scratch
  buffers of the CPU kernels, Python objects. Compared with the prediction's
  ``allocated_bytes`` (the process's own baseline is subtracted).

Prints one row per case: predicted and measured peak (MB), relative error, and
the same for the weights alone; then the logits' share of one 2 x 2048-token
batch at a 100k vocabulary, full against chunked; the 8-bit step's temporaries
per element; each teacher-pass case's peak above the weights, predicted against
measured; then PASS when every weights-dominated case (weights >= 70% of the
prediction) is within 10%, every case of a technique ftflow/plan/fit.py chooses
(gradient checkpointing ``+gc``, micro-batches with accumulation ``+accN``,
8-bit AdamW ``+8bit`` and ``step-8bit``) is within 10%, every chunked
teacher-pass case is within 10%, and chunking lowers that share at least 4x,
else FAIL (exit status 1).

Last measured here (2-core CPU, loaded machine). ``--only +``: the 8 fit cases
within 10%: full + gc -0.4%, full 2 x 2 accumulation +6.1%, LoRA 1 x 4
accumulation -2.4%, LoRA + gc bf16 +0.2% and fp32 +0.1%, full + gc + 2
accumulation +0.5%, full with 8-bit AdamW fp32 -0.3% and bf16 (stochastic
rounding) -0.5%. ``--only " teacher"``: 11 of 11
chunked teacher-pass cases within 10% (largest total error -0.4%); above the
weights, predicted vs measured: granite-8b-1-layer bf16 top-k 105 vs 105 MB,
sampled 156 vs 156, fp32 top-k 109 vs 109, sampled 160 vs 160, fp32 with chunks
of 128 (the forward outweighs them) 104 vs 105, unmerged LoRA bf16 126 vs 126;
qwen2.5-1.5b-1-layer bf16 top-k 313 vs 313, sampled 425 vs 425, fp32 315 vs 315
and 427 vs 427; llama-125M with a prefix (its key/value cache over 12 layers)
128 vs 130 (-1.2%). Full logits for comparison (2 x 256 tokens, fewer than a
chunk of 1024 would hold): Granite 151 MB (its ``logits_scaling`` copy), Qwen
467 MB. ``--only step-8bit``: 117.3 MB of temporaries for a 32M-element bf16
tensor, 27.96 bytes per element of its 4,194,304-element slice (83.7 MB, 19.95
for fp32), each within 0.3% of the plan; before the step was sliced it held 28.0
(bf16) and 20.0 (fp32) bytes per element of the whole tensor. On a CPU
bitsandbytes runs its reference 8-bit kernel, whose fp32 temporaries CUDA's fused
kernel does not have (:data:`ftflow.plan.predict.ADAMW_8BIT_STEP_BYTES_PER_ELEMENT`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# Before torch allocates anything: large blocks through mmap, so RSS follows live tensors,
# and no MKL buffer cache that would outlive the GEMM that needed it (see the docstring).
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
except OSError:  # not glibc: measurements get noisier, nothing else changes
    _LIBC = None

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

from ftflow.distill.losses import kd_loss  # noqa: E402
from ftflow.perplexity import DEFAULT_LOGITS_CHUNK_TOKENS, batch_nll  # noqa: E402
from ftflow.plan import predict as plan_predict  # noqa: E402

MB = 10**6
WEIGHTS_TARGET = 0.10
"""Largest relative error accepted where weights dominate the peak."""
LOGITS_SHARE_TARGET = 4.0
"""Chunked scoring must make one batch's logits phase at least this many times smaller than full logits."""
WEIGHTS_DOMINATED = 0.70
"""A case is weights-dominated when weights are at least this share of the predicted peak."""


@dataclass(frozen=True)
class BenchModel:
    name: str
    architecture: str
    numbers: dict


@dataclass(frozen=True)
class Case:
    model: BenchModel
    kind: str  # scoring | full | lora | qlora | prefix | distill | teacher | step-8bit
    precision: str
    batch_size: int
    max_length: int
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.kind == "teacher":
            name = f"teacher-{self.options.get('variant', 'topk')}"
            name += "" if self.options.get("method", "full") == "full" else f"+{self.options['method']}"
        elif self.kind == "step-8bit":
            name = "step-8bit"
        else:
            name = "scoring" if self.kind == "scoring" else f"train-{self.kind}"
        if self.options.get("logits_chunk_tokens") == 0:
            name += "(full)"
        name += "+gc" if self.options.get("gradient_checkpointing") else ""
        name += f"+acc{self.options['accumulation_steps']}" if self.options.get("accumulation_steps", 1) > 1 else ""
        return name + ("+8bit" if self.options.get("optimizer", "adamw") != "adamw" and self.kind != "step-8bit"
                       else "")

    @property
    def fit_case(self) -> bool:
        """A technique of ftflow/plan/fit.py is on: checkpointing, micro-batches with accumulation, 8-bit state."""
        return (bool(self.options.get("gradient_checkpointing")) or self.options.get("accumulation_steps", 1) > 1
                or self.options.get("optimizer", "adamw") != "adamw" or self.kind == "step-8bit")

    @property
    def teacher_case(self) -> bool:
        """The teacher pass, chunked as ftflow runs it (within 10% required)."""
        return self.kind == "teacher" and self.options.get("logits_chunk_tokens") != 0


ZOO_TEACHER = BenchModel("zoo-granite-teacher", "granite", dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=256, vocab_size=1024, tie_word_embeddings=True))
QWEN_40M = BenchModel("qwen2-40M", "qwen2", dict(
    hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    intermediate_size=1536, vocab_size=32000, tie_word_embeddings=True))
LLAMA_125M = BenchModel("llama-125M", "llama", dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
    intermediate_size=2048, vocab_size=32000, tie_word_embeddings=False))
LLAMA_100K_VOCAB = BenchModel("llama-100k-vocab", "llama", dict(
    hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=512, vocab_size=100352, tie_word_embeddings=False, max_position_embeddings=2048))
GRANITE_333M = BenchModel("granite-333M", "granite", dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
    intermediate_size=2816, vocab_size=49155, tie_word_embeddings=True))
# The teacher pass at real widths, layers cut to one: granite-3.3-8b's shape and its own multipliers
# (logits_scaling divides the logits: a copy of them in the full-logits forward), and Qwen2.5-1.5B's (a 152k
# vocabulary).
GRANITE_8B_1L = BenchModel("granite-8b-1-layer", "granite", dict(
    hidden_size=4096, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8, intermediate_size=12800,
    vocab_size=49159, tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22,
    attention_multiplier=0.0078125, logits_scaling=16.0, max_position_embeddings=4096))
QWEN_15B_1L = BenchModel("qwen2.5-1.5b-1-layer", "qwen2", dict(
    hidden_size=1536, num_hidden_layers=1, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
    vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096))
# The 8-bit AdamW step alone: one tensor of 32M elements (8 slices of ftflow.train.optimizers.SLICE_ELEMENTS).
TENSOR_32M = BenchModel("tensor-32M", "tensor", dict(elements=32_000_000, vocab_size=0))
TEACHER_K = 100
"""Ids stored per position in the teacher-pass cases (the seed study's largest top_k)."""


def cases(quick: bool) -> list[Case]:
    """Weights-dominated cases (large model, few tokens) and activation/logit-dominated ones."""
    chosen = [
        Case(ZOO_TEACHER, "scoring", "fp32", 32, 128),
        Case(ZOO_TEACHER, "full", "fp32", 16, 64),
        Case(ZOO_TEACHER, "lora", "fp32", 16, 64),
        Case(QWEN_40M, "scoring", "fp32", 8, 256),
        Case(QWEN_40M, "scoring", "bf16", 2, 256),
        Case(QWEN_40M, "full", "bf16", 2, 128),
        Case(QWEN_40M, "full", "fp32", 4, 128, {"gradient_checkpointing": True}),
        Case(QWEN_40M, "lora", "bf16", 2, 128),
        Case(QWEN_40M, "prefix", "fp32", 4, 128),
        Case(QWEN_40M, "distill", "fp32", 2, 128),
        Case(QWEN_40M, "distill", "bf16", 2, 128),
        Case(LLAMA_125M, "scoring", "fp32", 1, 256),
        Case(LLAMA_125M, "scoring", "bf16", 1, 128),
        Case(LLAMA_125M, "scoring", "nf4", 1, 128),
        Case(LLAMA_125M, "full", "fp32", 1, 64),
        Case(LLAMA_125M, "lora", "fp32", 2, 64),
        Case(LLAMA_125M, "qlora", "nf4", 1, 32),
        Case(LLAMA_125M, "prefix", "bf16", 1, 64),
        Case(GRANITE_333M, "scoring", "fp32", 1, 64),
        Case(LLAMA_100K_VOCAB, "scoring", "fp32", 2, 2048, {"logits_chunk_tokens": 0}),
        Case(LLAMA_100K_VOCAB, "scoring", "fp32", 2, 2048),
        # What ftflow/plan/fit.py turns on: micro-batches with accumulation (the batch is the micro-batch here),
        # gradient checkpointing, 8-bit AdamW state (bf16 weights: stochastic rounding).
        Case(QWEN_40M, "full", "fp32", 2, 128, {"accumulation_steps": 2}),
        Case(QWEN_40M, "lora", "fp32", 1, 256, {"accumulation_steps": 4}),
        Case(QWEN_40M, "lora", "bf16", 4, 256, {"gradient_checkpointing": True}),
        Case(LLAMA_125M, "lora", "fp32", 4, 128, {"gradient_checkpointing": True}),
        Case(LLAMA_125M, "full", "fp32", 1, 64, {"accumulation_steps": 2, "gradient_checkpointing": True}),
        Case(LLAMA_125M, "full", "fp32", 2, 64, {"optimizer": "adamw-8bit"}),
        Case(LLAMA_125M, "full", "bf16", 2, 64, {"optimizer": "adamw-8bit"}),
        # The 8-bit step's temporaries (bf16: stochastic rounding), the constant of ftflow.plan.predict's plan.
        Case(TENSOR_32M, "step-8bit", "bf16", 1, 1, {"optimizer": "adamw-8bit"}),
        Case(TENSOR_32M, "step-8bit", "fp32", 1, 1, {"optimizer": "adamw-8bit"}),
        # The teacher pass (ftflow.distill.teacher.compute_teacher_topk, one batch of 2 x 256 tokens): two chunks of logits
        # (256 positions each), top-k and sampled; the forward outweighing 128-position chunks (fp32, an unmerged
        # LoRA teacher); a prefix teacher's key/value cache over 12 layers; the full-logits path for comparison.
        Case(GRANITE_8B_1L, "teacher", "bf16", 2, 256, {"variant": "topk", "logits_chunk_tokens": 256}),
        Case(GRANITE_8B_1L, "teacher", "bf16", 2, 256, {"variant": "sampled", "logits_chunk_tokens": 256}),
        Case(GRANITE_8B_1L, "teacher", "fp32", 2, 256, {"variant": "topk", "logits_chunk_tokens": 256}),
        Case(GRANITE_8B_1L, "teacher", "fp32", 2, 256, {"variant": "sampled", "logits_chunk_tokens": 256}),
        Case(GRANITE_8B_1L, "teacher", "fp32", 2, 256, {"variant": "topk", "logits_chunk_tokens": 128}),
        Case(GRANITE_8B_1L, "teacher", "bf16", 2, 256, {"variant": "topk", "logits_chunk_tokens": 128,
                                                        "method": "lora"}),
        Case(GRANITE_8B_1L, "teacher", "bf16", 2, 256, {"variant": "topk", "logits_chunk_tokens": 0}),
        Case(QWEN_15B_1L, "teacher", "bf16", 2, 256, {"variant": "topk", "logits_chunk_tokens": 256}),
        Case(QWEN_15B_1L, "teacher", "bf16", 2, 256, {"variant": "sampled", "logits_chunk_tokens": 256}),
        Case(QWEN_15B_1L, "teacher", "fp32", 2, 256, {"variant": "topk", "logits_chunk_tokens": 256}),
        Case(QWEN_15B_1L, "teacher", "fp32", 2, 256, {"variant": "sampled", "logits_chunk_tokens": 256}),
        Case(QWEN_15B_1L, "teacher", "bf16", 2, 256, {"variant": "topk", "logits_chunk_tokens": 0}),
        Case(LLAMA_125M, "teacher", "fp32", 4, 512, {"variant": "topk", "logits_chunk_tokens": 64,
                                                     "method": "prefix"}),
    ]
    if quick:
        chosen = [c for c in chosen if c.model not in (GRANITE_333M, LLAMA_100K_VOCAB)
                  and c.kind in ("scoring", "full", "lora")]
    return chosen


def build_config(model: BenchModel):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model.architecture](
        **{"max_position_embeddings": 512, **model.numbers}, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def predict(case: Case, device: str) -> plan_predict.MemoryPrediction:
    if case.kind == "step-8bit":
        return _predict_step(case, device)
    config = build_config(case.model)
    if case.kind == "scoring":
        return plan_predict.predict_scoring(config, case.precision, case.batch_size, case.max_length, device=device,
                                      **case.options)
    if case.kind == "teacher":
        return plan_predict.predict_teacher_pass(config, case.precision, case.batch_size, case.max_length, k=TEACHER_K,
                                           device=device, **case.options)
    return plan_predict.predict_training(config, case.precision, case.kind, case.batch_size, case.max_length,
                                   device=device, **case.options)


def _predict_step(case: Case, device: str) -> plan_predict.MemoryPrediction:
    """One tensor's weights, gradient and 8-bit state, and the step's temporaries (ftflow.plan.predict's own terms)."""
    n, d = case.model.numbers["elements"], plan_predict.ELEMENT_BYTES[case.precision]
    state = plan_predict.adamw_8bit_state_bytes([n])
    step = plan_predict.adamw_8bit_step_bytes([n], case.precision == "bf16", device)
    overhead = plan_predict.RUNTIME_OVERHEAD_BYTES[device]
    return plan_predict.MemoryPrediction(case="step-8bit", precision=case.precision, batch_size=1, max_length=1,
                                   parameters=n, trainable_parameters=n, weights_bytes=n * d, logits_bytes=0,
                                   activations_bytes=step, overhead_bytes=overhead, gradients_bytes=n * d,
                                   optimizer_bytes=state, peak_bytes=2 * n * d + state + step + overhead)


# ----------------------------------------------------------------------------- running a case


def _inputs(case: Case, vocab: int, device: str):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (case.batch_size, case.max_length), generator=generator)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    # One pad in the last row: a padded batch, as scoring and the Trainer see them.
    mask[-1, -1] = 0
    labels[-1, -1] = -100
    return ids.to(device), mask.to(device), labels.to(device)


def _build_model(case: Case, device: str, checkpoint: Path | None):
    from transformers import AutoModelForCausalLM

    if case.precision == "nf4":
        from ftflow.models.loading import load_model

        model = load_model(str(checkpoint), "nf4", device, trainable=case.kind != "scoring")
        if device == "cpu":
            # Unquantized tensors may still be views of the memory-mapped checkpoint, whose
            # page cache would then count in the resident set: give them their own memory.
            for param in model.parameters():
                if type(param).__name__ != "Params4bit":
                    param.data = param.data.clone()
        return model
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(build_config(case.model), dtype=memory_dtype(case.precision))


def memory_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _wrap(model, case: Case):
    """PEFT wrapping as ftflow's training does (a teacher: as ftflow.models.loading.load_trained loads its run)."""
    if case.options.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    if case.kind == "teacher":
        method = case.options.get("method", "full")
        if method == "full":
            return model
        return _wrap(model, Case(case.model, method, case.precision, case.batch_size, case.max_length)).eval()
    if case.kind in ("full", "distill"):
        return model
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training

    if case.kind == "prefix":
        return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    if case.kind == "qlora":
        model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    return get_peft_model(model, lora)


class _IdTokenizer:
    """A tokenizer for the teacher-pass cases: a sentence is its token ids written out, BOS 1, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id, name_or_path = 1, 2, 0, "bench-ids"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(token) for token in text.split()]}


def _teacher_pass(model, case: Case, vocab: int) -> None:
    """ftflow's teacher pass over one batch of full-length sentences (the last one token short: one pad)."""
    from ftflow.distill.teacher import compute_teacher_topk

    generator = torch.Generator().manual_seed(0)
    lengths = [case.max_length - 1] * (case.batch_size - 1) + [case.max_length - 2]
    sentences = [" ".join(map(str, torch.randint(3, vocab, (n,), generator=generator).tolist())) for n in lengths]
    options = {k: v for k, v in case.options.items() if k in ("variant", "logits_chunk_tokens")}
    compute_teacher_topk(model, _IdTokenizer(), sentences, k=min(TEACHER_K, vocab), max_length=case.max_length,
                         batch_size=case.batch_size, progress=False, **options)


def _step_tensor(case: Case, device: str):
    """One trainable tensor, its gradient and its 8-bit state (made by a first step), and the optimizer."""
    from ftflow.train.optimizers import adamw_8bit

    generator = torch.Generator().manual_seed(0)
    n = case.model.numbers["elements"]
    weight = torch.nn.Parameter(torch.randn(n, generator=generator).to(memory_dtype(case.precision)).to(device))
    cls, kwargs = adamw_8bit(1e-5)
    optimizer = cls([weight], **kwargs)
    weight.grad = torch.randn(n, generator=generator).to(weight.dtype).to(device)
    optimizer.step()
    return weight, optimizer


def _score(model, ids, mask, labels, logits_chunk_tokens: int = DEFAULT_LOGITS_CHUNK_TOKENS) -> None:
    model.eval()
    with torch.inference_mode():
        batch_nll(model, {"input_ids": ids, "attention_mask": mask}, labels, logits_chunk_tokens=logits_chunk_tokens)


def _optimizer(model, kind: str = "adamw"):
    """Fused AdamW (the Trainer's default), or ftflow's 8-bit AdamW, with its state already created.

    A first step on zero gradients creates both moments of every trainable
    parameter, so the one measured step is a steady-state step (the state exists
    during its forward and backward) and a single step is enough.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    else:
        from ftflow.train.optimizers import adamw_8bit

        cls, kwargs = adamw_8bit(1e-5)
        optimizer = cls(params, **kwargs)
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return params, optimizer


TOP_K = 16


def _teacher_topk(ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored teacher top-k as distillation reads it: ids int32 -> long, log-probs fp16 -> float (k = TOP_K)."""
    generator = torch.Generator().manual_seed(1)
    topk_ids = torch.randint(0, vocab, (*ids.shape, TOP_K), generator=generator).to(ids.device)
    topk_logprobs = (torch.log_softmax(torch.randn(*ids.shape, TOP_K, generator=generator), dim=-1) - 0.1)
    return topk_ids, topk_logprobs.to(ids.device)


def _train_step(model, params, optimizer, ids, mask, labels, topk=None, accumulation_steps: int = 1) -> None:
    # Like the Trainer's compute_loss: only the loss survives the forward. With accumulation, the same
    # micro-batch again (the gradients of the earlier ones stay alive through the later ones).
    for _ in range(accumulation_steps):
        if topk is not None:  # DistillationTrainer.compute_loss
            outputs = model(input_ids=ids, attention_mask=mask)
            loss = kd_loss(outputs.logits, labels, *topk, alpha=0.5, temperature=2.0)["loss"]
            del outputs
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        (loss / accumulation_steps).backward()
        del loss
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _CpuMeter:
    """Resident-set growth of this process (see the module docstring)."""

    def __init__(self) -> None:
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        self.base = self.rss()

    @staticmethod
    def _status(field_name: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field_name} not in /proc/self/status")

    def rss(self) -> int:
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    def peak(self) -> int:
        return self._status("VmHWM") - self.base

    def now(self) -> int:
        return self.rss() - self.base


class _CudaMeter:
    def __init__(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base

    def now(self) -> int:
        return torch.cuda.memory_allocated() - self.base


def _warm_up(case: Case, device: str) -> None:
    """Run the case once on a micro model of the same architecture, then free everything."""
    from transformers import AutoModelForCausalLM

    if case.kind == "step-8bit":
        micro = Case(BenchModel("micro", "tensor", {"elements": 1 << 16}), case.kind, case.precision, 1, 1)
        weight, optimizer = _step_tensor(micro, device)
        optimizer.step()
        return
    numbers = {**case.model.numbers, "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
    micro = Case(BenchModel("micro", case.model.architecture, numbers), case.kind,
                 "bf16" if case.precision == "nf4" else case.precision, 2, 16)
    model = AutoModelForCausalLM.from_config(build_config(micro.model), dtype=memory_dtype(micro.precision))
    if case.precision == "nf4":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
        x = torch.randn(2, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
        layer(x).sum().backward()
    options = {k: v for k, v in case.options.items() if k == "gradient_checkpointing"}
    options.update({k: v for k, v in case.options.items() if case.kind == "teacher"})
    model = _wrap(model.to(device), Case(micro.model, "lora" if case.kind == "qlora" else case.kind,
                                          micro.precision, 2, 16, options))
    ids, mask, labels = _inputs(micro, 256, device)
    if case.kind == "teacher":
        _teacher_pass(model, Case(micro.model, "teacher", micro.precision, 2, 16, case.options), 256)
    elif case.kind == "scoring":
        _score(model, ids, mask, labels, case.options.get("logits_chunk_tokens", DEFAULT_LOGITS_CHUNK_TOKENS))
    else:
        _train_step(model, *_optimizer(model, case.options.get("optimizer", "adamw")), ids, mask, labels,
                    _teacher_topk(ids, 256) if case.kind == "distill" else None,
                    case.options.get("accumulation_steps", 1))


def run_case(case: Case, device: str, checkpoint: Path | None) -> dict:
    """Measure one case in this process: weights after building, peak of the step."""
    started = time.perf_counter()
    _warm_up(case, device)
    meter = _CudaMeter() if device == "cuda" else _CpuMeter()
    if case.kind == "step-8bit":
        # "Weights" here: the tensor, its gradient and its state; the peak: the step's temporaries on top.
        weight, optimizer = _step_tensor(case, device)
        weights = meter.now()
        meter.reset_peak()
        optimizer.step()
        return {"measured_peak": meter.peak(), "measured_weights": weights, "seconds": time.perf_counter() - started}
    model = _wrap(_build_model(case, device, checkpoint), case)
    ids, mask, labels = _inputs(case, case.model.numbers["vocab_size"], device)
    topk = _teacher_topk(ids, case.model.numbers["vocab_size"]) if case.kind == "distill" else None
    weights = meter.now()
    if case.kind not in ("scoring", "teacher"):
        params, optimizer = _optimizer(model, case.options.get("optimizer", "adamw"))
    meter.reset_peak()
    if case.kind == "teacher":
        _teacher_pass(model, case, case.model.numbers["vocab_size"])
    elif case.kind == "scoring":
        _score(model, ids, mask, labels, case.options.get("logits_chunk_tokens", DEFAULT_LOGITS_CHUNK_TOKENS))
    else:
        # QLoRA trains under its compute dtype's autocast (the Trainer's bf16), as ftflow.train.trainer.plan_precision says.
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=case.kind == "qlora")
        with autocast:
            _train_step(model, params, optimizer, ids, mask, labels, topk, case.options.get("accumulation_steps", 1))
    return {"measured_peak": meter.peak(), "measured_weights": weights, "seconds": time.perf_counter() - started}


def _save_bf16_checkpoint(model: BenchModel, directory: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(build_config(model), dtype=torch.bfloat16).save_pretrained(directory)


def in_child(function, *args) -> dict:
    """Run ``function(*args)`` in a forked child and return its JSON result.

    The parent never runs a torch kernel, so the child starts with no OpenMP
    pool to inherit; each child's resident set is its own.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            result = {"ok": True, **(function(*args) or {})}
        except Exception as exc:  # reported in the table; the child must not fall back into the parent's code
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(write_end, "w") as handle:
            handle.write(json.dumps(result))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as handle:
        payload = handle.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        return {"ok": False, "error": f"child died (wait status {status}), likely out of memory"}
    return json.loads(payload)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="scoring, full and LoRA on the three smaller models")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each case (0: torch's default)")
    parser.add_argument("--only", default="", help="run only the cases whose 'model case' label contains this text")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Import once in the parent (fast children); nothing here runs a kernel.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.granite.modeling_granite  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: F401

    import ftflow.models.loading  # noqa: F401

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.simplefilter("ignore")  # library deprecation chatter, once per child otherwise

    print(HEADER, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftflow-membench-") as tmp:
        checkpoints: dict[str, Path] = {}
        for case in [c for c in cases(args.quick) if args.only in f"{c.model.name} {c.label}"]:
            checkpoint = None
            if case.precision == "nf4":
                checkpoint = checkpoints.get(case.model.name)
                if checkpoint is None:
                    checkpoint = Path(tmp) / case.model.name
                    saved = in_child(_save_bf16_checkpoint, case.model, checkpoint) if args.device == "cpu" \
                        else {"ok": True, **(_save_bf16_checkpoint(case.model, checkpoint) or {})}
                    if not saved["ok"]:
                        print(f"could not write the {case.model.name} checkpoint: {saved['error']}", file=sys.stderr)
                        return 1
                    checkpoints[case.model.name] = checkpoint
            prediction = predict(case, args.device)
            if args.device == "cpu":
                result = in_child(run_case, case, "cpu", checkpoint)
            else:
                try:
                    result = {"ok": True, **run_case(case, "cuda", checkpoint)}
                except Exception as exc:
                    result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                gc.collect()
                torch.cuda.empty_cache()
            row = {
                "model": case.model.name,
                "params": prediction.parameters,
                "case": case.label,
                "precision": case.precision,
                "batch": case.batch_size,
                "length": case.max_length,
                "predicted_mb": prediction.allocated_bytes / MB,
                "measured_mb": result.get("measured_peak", math.nan) / MB,
                # step-8bit: what exists before the step (the tensor, its gradient and state), as measured.
                "weights_predicted_mb": (prediction.weights_bytes + (prediction.gradients_bytes
                                         + prediction.optimizer_bytes if case.kind == "step-8bit" else 0)) / MB,
                "weights_measured_mb": result.get("measured_weights", math.nan) / MB,
                "weights_share": prediction.weights_bytes / max(1, prediction.allocated_bytes),
                "seconds": result.get("seconds", math.nan),
                "error": "" if result["ok"] else result["error"],
                "fit_case": case.fit_case,
                "teacher_case": case.teacher_case,
            }
            row["relative_error"] = row["predicted_mb"] / row["measured_mb"] - 1
            row["weights_relative_error"] = row["weights_predicted_mb"] / row["weights_measured_mb"] - 1
            rows.append(row)
            print(_format(row), flush=True)

    fit_rows = [r for r in rows if not r["error"] and r["fit_case"]]
    fit_within = [r for r in fit_rows if abs(r["relative_error"]) <= WEIGHTS_TARGET]
    dominated = [r for r in rows if not r["error"] and r["weights_share"] >= WEIGHTS_DOMINATED]
    within = [r for r in dominated if abs(r["relative_error"]) <= WEIGHTS_TARGET]
    others = [r for r in rows if not r["error"] and r["weights_share"] < WEIGHTS_DOMINATED]
    print(f"\nmeasured on {args.device}: predicted peak without runtime overhead vs measured peak growth")
    print(f"weights-dominated cases (weights >= {WEIGHTS_DOMINATED:.0%} of the prediction): "
          f"{len(within)}/{len(dominated)} within {WEIGHTS_TARGET:.0%}")
    if others:
        worst = max(others, key=lambda r: abs(r["relative_error"]))
        print(f"other cases: largest error {worst['relative_error']:+.1%} ({worst['model']} {worst['case']})")
    share = {r["case"]: r for r in rows if r["model"] == LLAMA_100K_VOCAB.name and not r["error"]}
    if len(share) == 2:
        # What one batch adds to the weights: its logits phase (activations are small at hidden 256).
        full, chunked = share["scoring(full)"], share["scoring"]
        grown = {name: r["measured_mb"] - r["weights_measured_mb"] for name, r in (("full", full), ("chunked", chunked))}
        ratio = grown["full"] / grown["chunked"]
        print(f"logits' share, one batch of {full['batch']} x {full['length']} tokens, vocabulary "
              f"{LLAMA_100K_VOCAB.numbers['vocab_size']:,} (measured peak - weights): full logits {grown['full']:.0f} MB, "
              f"chunked ({DEFAULT_LOGITS_CHUNK_TOKENS} tokens) {grown['chunked']:.0f} MB: {ratio:.1f}x lower "
              f"(target >= {LOGITS_SHARE_TARGET:g}x)")
        if ratio < LOGITS_SHARE_TARGET:
            dominated.append({"relative_error": math.inf})  # counts as a failure below
    if fit_rows:
        print(f"cases with checkpointing, micro-batches or 8-bit state (ftflow/plan/fit.py): {len(fit_within)}/"
              f"{len(fit_rows)} within {WEIGHTS_TARGET:.0%}")
    for r in rows:
        if r["case"] == "step-8bit" and not r["error"]:
            extra = r["measured_mb"] - r["weights_measured_mb"]
            predicted = r["predicted_mb"] - r["weights_predicted_mb"]
            slice_elements = min(r["params"], _slice_elements())
            print(f"8-bit AdamW step ({r['precision']} weights, {r['params']:,} elements): temporaries measured "
                  f"{extra:.1f} MB, predicted {predicted:.1f} MB: {extra * MB / slice_elements:.2f} bytes per "
                  f"element of the {slice_elements:,}-element slice ({extra * MB / r['params']:.2f} per element "
                  "of the tensor)")
    teacher_rows = [r for r in rows if not r["error"] and r["teacher_case"]]
    teacher_within = [r for r in teacher_rows if abs(r["relative_error"]) <= WEIGHTS_TARGET]
    if teacher_rows:
        print(f"teacher-pass cases (ftflow.distill.teacher.compute_teacher_topk, chunked): {len(teacher_within)}/"
              f"{len(teacher_rows)} within {WEIGHTS_TARGET:.0%}; the pass above the weights, predicted vs measured:")
        for r in teacher_rows:
            above = r["measured_mb"] - r["weights_measured_mb"], r["predicted_mb"] - r["weights_predicted_mb"]
            print(f"  {r['model']} {r['case']} {r['precision']} {r['batch']} x {r['length']}: predicted "
                  f"{above[1]:.0f} MB, measured {above[0]:.0f} MB ({above[1] / above[0] - 1:+.1%})")
    for r in rows:
        if r["case"].endswith("(full)") and r["case"].startswith("teacher") and not r["error"]:
            chunked = next((c for c in teacher_rows if (c["model"], c["precision"], c["batch"], c["length"],
                            c["case"]) == (r["model"], r["precision"], r["batch"], r["length"],
                                           r["case"].replace("(full)", ""))), None)
            if chunked is not None:
                print(f"teacher pass above the weights, {r['model']} {r['precision']} {r['batch']} x {r['length']}: "
                      f"full logits {r['measured_mb'] - r['weights_measured_mb']:.0f} MB, chunked "
                      f"{chunked['measured_mb'] - chunked['weights_measured_mb']:.0f} MB")
    verdict = "PASS" if (len(within) == len(dominated) and len(fit_within) == len(fit_rows)
                         and len(teacher_within) == len(teacher_rows)) else "FAIL"
    print(verdict)
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    failed = [r for r in rows if r["error"]]
    for r in failed:
        print(f"FAILED {r['model']} {r['case']} {r['precision']}: {r['error']}", file=sys.stderr)
    return 1 if failed or verdict == "FAIL" else 0


def _slice_elements() -> int:
    from ftflow.train.optimizers import SLICE_ELEMENTS

    return SLICE_ELEMENTS


HEADER = (f"{'model':<21} {'params':>12} {'case':<22} {'prec':<5} {'BxL':>8} {'pred MB':>9} {'meas MB':>9} "
          f"{'rel err':>8}  {'w pred':>8} {'w meas':>8} {'w err':>7} {'w share':>7} {'time':>7}")


def _format(row: dict) -> str:
    return (f"{row['model']:<21} {row['params']:>12,} {row['case']:<22} {row['precision']:<5} "
            f"{row['batch']:>3}x{row['length']:<4} {row['predicted_mb']:>9.1f} {row['measured_mb']:>9.1f} "
            f"{row['relative_error']:>+8.1%}  {row['weights_predicted_mb']:>8.1f} {row['weights_measured_mb']:>8.1f} "
            f"{row['weights_relative_error']:>+7.1%} {row['weights_share']:>7.0%} {row['seconds']:>6.1f}s "
            f"{row['error']}")


if __name__ == "__main__":
    sys.exit(main())
