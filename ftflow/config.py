"""Typed pipeline configuration: one pydantic model per stage, loaded from YAML.

Every field is documented; unknown keys are rejected (a typo must not be a
silently ignored setting); every problem in a file is reported at once.
Relative paths in a config file are resolved against the file's folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftflow.errors import UserError

Precision = Literal["fp32", "bf16", "fp16", "nf4"]
"""Weights precision of a model: what it is loaded (and trained) in."""
Method = Literal["full", "lora", "qlora", "prefix", "distill"]
PEFT_METHODS = frozenset({"lora", "qlora", "prefix"})
"""Methods whose run saves an adapter on a frozen base, not a whole model."""
"""A fine-tuning method of the study (one job class each in ftflow/train/jobs.py)."""
Architecture = Literal["granite", "llama", "qwen2"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticDataConfig(_Strict):
    """Sentences ftflow generates itself, for the offline demo and tests."""

    train_sentences: int = Field(400, ge=10, description="Training sentences to generate.")
    test_sentences: int = Field(200, ge=2, description="Test sentences to generate.")
    seed: int = Field(0, description="Seed of the generator.")


# The data file formats ftflow reads, by extension (ftflow.data.splits reads them).
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DataConfig(_Strict):
    """Where the task's sentences come from and how validation is held out."""

    train_file: Optional[Path] = Field(None, description="Training sentences: .txt (one per line), .jsonl or .csv.")
    test_file: Optional[Path] = Field(None, description="Test sentences, same formats; only ever used for reporting.")
    synthetic: Optional[SyntheticDataConfig] = Field(
        None, description="Generate train/test sentences instead of reading files (offline demo)."
    )
    text_column: str = Field("text", description="Field (JSONL) or column (CSV) holding the sentence.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of train held out for selection.")
    seed: int = Field(0, description="Seed of the validation split.")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        has_files = self.train_file is not None or self.test_file is not None
        if has_files and self.synthetic is not None:
            raise ValueError("data: give either train_file/test_file or synthetic, not both")
        if not has_files and self.synthetic is None:
            raise ValueError("data: give train_file and test_file (or synthetic: {} for generated demo data)")
        if has_files and (self.train_file is None or self.test_file is None):
            raise ValueError("data: train_file and test_file must both be set")
        return self


AugmentMethod = Literal["synonym", "random_insert", "random_swap", "random_delete", "random_mask", "back_translation"]
# Canonical order of the methods: the plan does not depend on the order of keys in a YAML file.
AUGMENT_METHODS: tuple[str, ...] = get_args(AugmentMethod)


class WordRateConfig(_Strict):
    """One word-level EDA operation (synonym replacement, random insertion, swap or deletion)."""

    rate: float = Field(
        0.1, gt=0, le=0.5,
        description="Share of a sentence's words the operation touches: ceil(rate * words), at least one.",
    )


class MaskConfig(_Strict):
    """Random masking: chosen words replaced by a mask token, or dropped."""

    rate: float = Field(0.15, gt=0, le=0.5, description="Share of words masked: ceil(rate * words), at least one.")
    mode: Literal["token", "drop"] = Field(
        "token", description="token: replace each chosen word by `token`; drop: remove it."
    )
    token: str = Field("[MASK]", min_length=1, description="Text that replaces a masked word (mode token).")


class BackTranslationConfig(_Strict):
    """Back-translation source -> pivot -> source through deep-translator or two local models."""

    service: Literal["google", "mymemory", "libre", "deepl", "local"] = Field(
        "google", description="Translation service; local = two local seq2seq model directories (offline)."
    )
    source_lang: str = Field("en", min_length=2, description="Language of the sentences (ISO code).")
    pivot_lang: str = Field("de", min_length=2, description="Language translated to and back from (ISO code).")
    url: Optional[str] = Field(
        None, pattern=r"^https?://", description="libre only: base URL of the LibreTranslate server (default: public)."
    )
    api_key_env: Optional[str] = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="NAME of the environment variable holding the API key (libre, deepl); never the key itself.",
    )
    use_free_api: bool = Field(True, description="libre, deepl: use the service's free endpoint.")
    requests_per_second: float = Field(2.0, gt=0, description="Rate limit on calls to the service (both directions).")
    retries: int = Field(
        4, ge=0, description="Retries of a call after a network error (429, 5xx, connection, timeout)."
    )
    backoff_base_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled for each further one.")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest wait between two retries.")
    backoff_jitter: float = Field(0.5, ge=0, le=1, description="Share of each wait drawn at random.")
    request_timeout_s: float = Field(30.0, gt=0, description="Timeout of one HTTP request.")
    give_up_after_failures: int = Field(
        20, ge=1, description="Sentences failing in a row with network errors before the stage stops (service down)."
    )
    local_forward_model_dir: Optional[Path] = Field(
        None, description="local only: model directory translating source -> pivot (e.g. a MarianMT en-de)."
    )
    local_backward_model_dir: Optional[Path] = Field(
        None, description="local only: model directory translating pivot -> source (e.g. a MarianMT de-en)."
    )
    local_batch_size: int = Field(16, ge=1, description="local only: sentences per generate call.")
    local_max_new_tokens: int = Field(256, ge=1, description="local only: longest translation, in tokens.")

    @model_validator(mode="after")
    def _settings_match_service(self) -> "BackTranslationConfig":
        problems = []
        local_dirs = (self.local_forward_model_dir, self.local_backward_model_dir)
        if self.service == "local" and None in local_dirs:
            problems.append("service local needs local_forward_model_dir and local_backward_model_dir")
        if self.service != "local" and any(d is not None for d in local_dirs):
            problems.append(f"local_*_model_dir is only used with service local, not {self.service}")
        if self.url is not None and self.service != "libre":
            problems.append(f"url is only used with service libre, not {self.service}")
        if self.service == "deepl" and self.api_key_env is None:
            problems.append("service deepl needs api_key_env (the name of the variable holding the key)")
        if self.api_key_env is not None and self.service not in ("libre", "deepl"):
            problems.append(f"api_key_env is only used with services libre and deepl, not {self.service}")
        if self.source_lang == self.pivot_lang:
            problems.append("pivot_lang must differ from source_lang")
        if problems:
            raise ValueError("back_translation: " + "; ".join(problems))
        return self


class AugmentConfig(_Strict):
    """Training-set augmentation (EDA, back-translation, masking); validation and test are never touched."""

    enabled: bool = Field(True, description="Run augmentation at all.")
    factor: float = Field(1.5, ge=1.0, description="Size of the augmented train set over the original (1.5 = +50%).")
    methods: dict[AugmentMethod, float] = Field(
        default_factory=lambda: {m: 1.0 for m in AUGMENT_METHODS if m != "back_translation"},
        description="Mix: each method's weight; its share of the new sentences is weight / sum of weights "
        "(0 or absent = off). A list means equal weights.",
    )
    seed: int = Field(0, description="Seed of the augmentation (which sources, which methods, which words).")
    synonym: WordRateConfig = Field(WordRateConfig(), description="EDA synonym replacement (WordNet).")
    random_insert: WordRateConfig = Field(WordRateConfig(), description="EDA random insertion of synonyms (WordNet).")
    random_swap: WordRateConfig = Field(WordRateConfig(), description="EDA random swap of two words.")
    random_delete: WordRateConfig = Field(WordRateConfig(), description="EDA random deletion of words.")
    random_mask: MaskConfig = Field(MaskConfig(), description="Random masking of words.")
    back_translation: BackTranslationConfig = Field(BackTranslationConfig(), description="Back-translation settings.")
    nltk_data_dir: Optional[Path] = Field(
        None, description="nltk data folder holding corpora/wordnet; else NLTK_DATA, ~/nltk_data, /usr/share/wordnet."
    )
    max_source_chars: int = Field(1000, ge=10, description="Longer sentences are kept but not augmented (counted).")
    check_english: bool = Field(True, description="Skip (keep, count) sentences that do not look English.")
    max_attempts: int = Field(5, ge=1, description="Draws per new sentence before giving up on a copy or duplicate.")

    @field_validator("methods", mode="before")
    @classmethod
    def _list_means_equal_weights(cls, value):
        if isinstance(value, (list, tuple)):
            return {name: 1.0 for name in value}
        return value

    @model_validator(mode="after")
    def _some_method_on(self) -> "AugmentConfig":
        negative = sorted(m for m, w in self.methods.items() if w < 0)
        if negative:
            raise ValueError(f"augment.methods: weights must be >= 0; negative: {negative}")
        if self.enabled and self.factor > 1.0 and sum(self.methods.values()) <= 0:
            raise ValueError("augment.methods: give at least one method a weight > 0 (or set enabled: false)")
        return self


class ZooSize(_Strict):
    """Shape of one small checkpoint."""

    hidden_size: int = Field(..., ge=8, description="Model width.")
    num_layers: int = Field(..., ge=1, description="Decoder layers.")
    num_heads: int = Field(..., ge=1, description="Attention heads.")
    num_kv_heads: int = Field(..., ge=1, description="Key/value heads (grouped-query attention when fewer).")
    intermediate_size: int = Field(..., ge=8, description="MLP width.")


# Real models' layer widths are multiples of 64, and 4-bit kernels rely on it: on a CPU with AVX512-BF16,
# bitsandbytes repacks 4-bit weights in blocks of 32 output features (its assertion: "N must be divisible
# by block_n"). Zoo models keep to the same rule, so the demo and the tests exercise what hub models meet.
LAYER_WIDTH_MULTIPLE = 64
KV_WIDTH_MULTIPLE = 32


def zoo_size_problems(size: ZooSize, where: str) -> list[str]:
    """Every reason ``size`` cannot be built, each prefixed with ``where``."""
    problems = []
    for field in ("hidden_size", "intermediate_size"):
        value = getattr(size, field)
        if value % LAYER_WIDTH_MULTIPLE:
            problems.append(
                f"{where}: {field} {value} is not a multiple of {LAYER_WIDTH_MULTIPLE} (4-bit kernels need layer "
                f"widths as real models have them; use {_round_up(value, LAYER_WIDTH_MULTIPLE)})")
    if size.hidden_size % size.num_heads:
        problems.append(f"{where}: hidden_size {size.hidden_size} is not divisible by num_heads {size.num_heads}")
    elif (size.hidden_size // size.num_heads) % 2:
        # Rotary embeddings rotate pairs of dimensions.
        problems.append(f"{where}: head size {size.hidden_size // size.num_heads} must be even (rotary embeddings)")
    elif size.num_heads % size.num_kv_heads == 0 and (
            size.hidden_size // size.num_heads * size.num_kv_heads) % KV_WIDTH_MULTIPLE:
        width = size.hidden_size // size.num_heads * size.num_kv_heads
        problems.append(
            f"{where}: the key/value projections are {width} wide (head size x num_kv_heads), not a multiple of "
            f"{KV_WIDTH_MULTIPLE} (4-bit kernels need it); use more num_kv_heads or fewer num_heads")
    if size.num_heads % size.num_kv_heads:
        problems.append(f"{where}: num_heads {size.num_heads} is not divisible by num_kv_heads {size.num_kv_heads}")
    return problems


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class ZooFamily(_Strict):
    """One model family of the offline zoo: a student and a larger teacher sharing a tokenizer."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Family name used in model names.")
    architecture: Architecture = Field(..., description="transformers config class the family is built from.")
    student: ZooSize
    teacher: ZooSize


class ZooConfig(_Strict):
    """Small Hugging Face checkpoints built and pretrained offline."""

    families: tuple[ZooFamily, ...] = Field(..., min_length=1, description="Families to build.")
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary of each family's tokenizer.")
    corpus_file: Optional[Path] = Field(None, description="General pretraining corpus (.txt); generated when unset.")
    corpus_sentences: int = Field(3000, ge=100, description="Sentences generated (or read, at most) for pretraining.")
    pretrain_steps: int = Field(200, ge=1, description="Optimizer steps of pretraining per model.")
    teacher_pretrain_steps: Optional[int] = Field(
        None, ge=1, description="Optimizer steps of each teacher's first pretraining round (and of each extra "
        "round). Unset: scaled with the teacher's size, pretrain_steps x sqrt(teacher parameters / student "
        "parameters), rounded (the demo's teachers, 3.5-5.2x their students: 1.9-2.3x the steps). A larger model needs "
        "more tokens to reach its better loss (compute-optimal training grows them in proportion to its size); "
        "the square root keeps the offline zoo's CPU time reasonable, and the zoo checks the result on the task's "
        "selection split (teacher_margin).")
    teacher_extra_rounds: int = Field(
        2, ge=0, description="When a teacher does not beat its student on the task's selection split by "
        "teacher_margin after pretraining, the zoo pretrains it at most this many more rounds of its steps, "
        "checking after each (0: check and report only).")
    teacher_margin: float = Field(
        0.05, ge=0, lt=1, description="How much lower the teacher's selection-split PPL must be than its "
        "student's for the zoo to call it a teacher: teacher PPL <= (1 - margin) x student PPL (0.05: 5% lower). "
        "A teacher ahead by less is as good as its student and has little to teach it.")
    task_text: bool = Field(
        True, description="Add the task's training split (never its validation or test sentences) to the "
        "pretraining corpus. The zoo stands in for hub models, which were pretrained on text like the task's; the "
        "generated corpus is not real language, so without this the zoo's models barely read a real task.")
    batch_size: int = Field(32, ge=1, description="Pretraining batch size.")
    learning_rate: float = Field(3e-3, gt=0, description="Pretraining peak learning rate.")
    max_length: int = Field(64, ge=8, description="Longest pretraining sequence, in tokens.")
    seed: int = Field(0, description="Seed of tokenizer training, initialisation and pretraining.")

    @model_validator(mode="after")
    def _buildable_sizes(self) -> "ZooConfig":
        problems = [problem for family in self.families for role in ("student", "teacher")
                    for problem in zoo_size_problems(getattr(family, role), f"zoo.families[{family.name}].{role}")]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ModelSpec(_Strict):
    """A candidate model: a hub id or a local checkpoint directory."""

    name: str = Field(..., description="Short name used in run names and tables.")
    path: str = Field(..., description="Hub id (org/name) or a local directory with config and weights.")
    family: str = Field(..., description="Family name; selection picks a family, distillation stays inside one.")
    precision: Precision | Literal["auto"] = Field(
        "auto", description="Weights precision; auto = fp32 if it fits the memory budget, else bf16/fp16, else nf4."
    )
    trust_remote_code: bool = Field(False, description="Allow the repository's own code (off unless you trust it).")


class BenchmarkConfig(_Strict):
    """Perplexity scoring of every candidate."""

    batch_size: int | Literal["auto"] = Field(
        "auto", description="Sentences per forward pass; auto = the largest the memory plan says fits (and lowered "
        "to that when a fixed size is predicted over the budget).")
    logits_chunk_tokens: int = Field(
        1024, ge=0, description="Scored positions whose logits exist at once in every perplexity scoring (benchmark, "
        "validation during training, test) and in the teacher pass of distillation: the LM head is applied to this many tokens at a time, so the logits' "
        "peak is chunk x vocab x 8 bytes instead of batch x length x vocab x (dtype + 8); the memory plan charges "
        "it. 0 = the model's full logits (for a model whose forward transforms its logits in a way ftflow does not "
        "reproduce; scoring says so).")

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("batch_size must be >= 1 or 'auto'")
        return value


class MemoryConfig(_Strict):
    """The memory plan made before any model is loaded."""

    allow_nf4: bool = Field(True, description="Let precision: auto fall back to 4-bit NF4 when 16-bit does not fit.")
    batch_size_cap: int = Field(256, ge=1, description="Largest evaluation batch size batch_size: auto may choose.")
    cuda_margin_gb: float = Field(
        1.0, ge=0, description="On CUDA, every stage that plans memory measures what is free at its start and plans "
        "against min(budget, free - this margin): kernels loaded on first use, cuBLAS workspaces and the allocator's "
        "fragmentation, which no prediction counts (ftflow/plan/budget.py).")


class SelectConfig(_Strict):
    """How the family, teacher and student are chosen."""

    metric: Literal["bits_per_byte", "perplexity"] = Field(
        "bits_per_byte", description="Validation metric; bits per byte is fair across tokenizers."
    )
    student_max_params: int = Field(
        2_500_000_000, ge=1, description="Largest parameter count a student may have (the ~2B analog)."
    )


PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Rate = Annotated[float, Field(ge=0, lt=1)]
Weight = Annotated[float, Field(ge=0, le=1)]


def _as_tuple(value):
    """A grid field accepts one value or a list of values."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


def _unique_grid(section: str, **axes: tuple) -> None:
    for axis, values in axes.items():
        if not values:
            raise ValueError(f"{section}.{axis}: give at least one value")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{section}.{axis}: values repeat ({repeated}); each grid value once")


class LoraConfig(_Strict):
    """LoRA: a grid on the teacher; its best combination is then used for LoRA and QLoRA on every compared model."""

    r: tuple[PositiveInt, ...] = Field((8,), min_length=1, description="Ranks of the update (one value or a list: grid axis).")
    alpha: tuple[PositiveFloat, ...] = Field((16.0,), min_length=1, description="Scaling numerators (update scaled by alpha / r); grid axis.")
    dropout: tuple[Rate, ...] = Field((0.05,), min_length=1, description="Dropout on the LoRA input; grid axis.")
    learning_rate: tuple[PositiveFloat, ...] = Field((2e-4,), min_length=1, description="Peak learning rates; grid axis.")
    target_modules: str | tuple[str, ...] = Field("all-linear", description="Modules that get adapters.")
    epochs: int = Field(2, ge=1, description="Training epochs; the best on the selection split is kept.")
    batch_size: int = Field(8, ge=1, description="Training batch size.")

    @field_validator("r", "alpha", "dropout", "learning_rate", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _as_tuple(value)

    @model_validator(mode="after")
    def _valid_grid(self) -> "LoraConfig":
        _unique_grid("lora", r=self.r, alpha=self.alpha, dropout=self.dropout, learning_rate=self.learning_rate)
        return self


class QLoraConfig(_Strict):
    """QLoRA: the best LoRA combination on a 4-bit model (bitsandbytes), on every compared model."""

    enabled: bool = Field(True, description="Run QLoRA next to LoRA.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="dtype of the 4-bit matmuls.")


class PrefixConfig(_Strict):
    """Prefix tuning (PEFT): a grid of virtual-token counts and learning rates on the teacher."""

    enabled: bool = Field(True, description="Run the prefix-tuning grid.")
    num_virtual_tokens: tuple[PositiveInt, ...] = Field((4, 8), min_length=1, description="Prefix lengths; grid axis.")
    learning_rate: tuple[PositiveFloat, ...] = Field((1e-4,), min_length=1, description="Peak learning rates; grid axis.")
    epochs: int = Field(2, ge=1, description="Training epochs; the best on the selection split is kept.")
    batch_size: int = Field(8, ge=1, description="Training batch size.")

    @field_validator("num_virtual_tokens", "learning_rate", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _as_tuple(value)

    @model_validator(mode="after")
    def _valid_grid(self) -> "PrefixConfig":
        _unique_grid("prefix", num_virtual_tokens=self.num_virtual_tokens, learning_rate=self.learning_rate)
        return self


class DistillConfig(_Strict):
    """Distillation from the best teacher run (any method) into the student, over a grid of variants.

    The teacher is the teacher model's run with the lowest selection-split
    perplexity, whatever its method. By default the student is distilled
    whenever the two tokenizers allow it, and the report's paired comparison
    with full fine-tuning at equal steps says whether it helped; the report
    also says how the teacher compared with the student's own best.
    """

    loss: tuple[Literal["topk", "sampled"], ...] = Field(
        ("topk",), min_length=1, description="What the teacher's targets are: `topk` (its top-k ids and the mass "
        "of the rest as one bucket) or `sampled` (k ids drawn from it, random-sampling distillation, Anshumann et "
        "al. 2025); each stored once per teacher and training set, with top_k ids per position; grid axis.")
    top_k: tuple[PositiveInt, ...] = Field((10,), min_length=1, description="Teacher ids kept per position (the study: 10, 100); "
                                   "stored once at the largest k and sliced for the others; grid axis.")
    temperature: tuple[PositiveFloat, ...] = Field((1.0,), min_length=1, description="Softening temperatures T; grid axis.")
    alpha: tuple[Weight, ...] = Field((0.5,), min_length=1, description="Weights of the KL term (1 - alpha weighs "
                                     "cross-entropy); grid axis.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    epochs: int = Field(2, ge=1, description="Training epochs; the best on the selection split is kept.")
    batch_size: int = Field(8, ge=1, description="Training batch size.")
    teacher_batch_size: int | Literal["auto"] = Field(
        "auto", description="Sentences per forward pass of the teacher pass; auto = the largest that its memory "
        "plan (ftflow.plan.predict.predict_teacher_pass: the teacher run as loaded, its longest training sentence, "
        "benchmark.logits_chunk_tokens) says fits memory_budget_gb, up to memory.batch_size_cap; a fixed size "
        "predicted over the budget is lowered to that. The stored targets do not depend on it.")

    require_better_teacher: bool = Field(False, description="Distil only from a teacher that beats the student's "
                                         "own best on the selection split (else skip distillation, saying why). Off "
                                         "by default: a teacher worse on that split can still help the student, and "
                                         "the equal-steps comparison with full fine-tuning measures whether it did.")

    @field_validator("loss", "top_k", "temperature", "alpha", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _as_tuple(value)

    @field_validator("teacher_batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("teacher_batch_size must be >= 1 or 'auto'")
        return value

    @model_validator(mode="after")
    def _valid_grid(self) -> "DistillConfig":
        _unique_grid("distill", loss=self.loss, top_k=self.top_k, temperature=self.temperature, alpha=self.alpha)
        return self


class FinetuneConfig(_Strict):
    """Full fine-tuning of every compared model at or under a size."""

    max_params: int = Field(2_500_000_000, ge=1, description="Largest model (parameters) fine-tuned in full.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    epochs: int = Field(2, ge=1, description="Training epochs; the best on the selection split is kept.")
    batch_size: int = Field(8, ge=1, description="Training batch size.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")


class CompareConfig(_Strict):
    """Which models the per-model methods (LoRA, QLoRA, full fine-tuning) are run on."""

    models: Literal["family", "all"] = Field(
        "family", description="family = teacher and student of the selected family; all = every benchmarked model."
    )


class AblationConfig(_Strict):
    """The measured effect of augmentation: one model trained on each training set (issue: study section 3.4)."""

    enabled: bool = Field(False, description="Train the ablation runs.")
    method: Literal["lora", "full"] = Field(
        "lora", description="lora = the teacher with the best LoRA combination; full = the student fine-tuned in full."
    )
    per_method: bool = Field(True, description="Besides none vs the configured mix, one run per augmentation method.")
    recommend_controls: bool = Field(
        False, description="Rank the ablation's control runs (trained on another set than the pipeline's: the "
        "original set, the same steps on it, one method alone) among the candidates and let one be recommended. "
        "Off: they are listed below the candidates, labelled as controls, in their own table.")


FitTechnique = Literal["micro_batch", "checkpointing", "optimizer_8bit", "half_weights", "paged_optimizer"]
"""A way to make a training run fit its memory budget (ftflow/plan/fit.py says what each does)."""
DEFAULT_FIT_ORDER: tuple[str, ...] = ("micro_batch", "checkpointing", "optimizer_8bit", "half_weights",
                                      "paged_optimizer")


class TrainingConfig(_Strict):
    """How every training run is carried out (not what it computes)."""

    checkpoint_steps: int = Field(
        50, ge=1, description="PEFT runs (lora, qlora, prefix): a Trainer checkpoint every N optimizer steps and "
        "at every epoch end. Full-weight runs (full, distill) checkpoint at epoch ends only, whatever N: each of "
        "their checkpoints holds every weight and its optimizer state (a 2.5B model with fp32 AdamW: ~30 GB), and "
        "one every N steps would write terabytes over a study. One checkpoint is kept per run; an interrupted run "
        "resumes from it.")
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="How training batches are formed. auto = packed where exact (lora, qlora, full, "
        "distill: a batch's sentences in one row without pads, positions restarting and no attention across "
        "sentences; models with remote code stay padded) and length-grouped padded batches for prefix tuning, "
        "which cannot be packed; on = packed for every model (prefix tuning refused); off = random padded "
        "batches. Each run's manifest records its batching (packed, length-grouped or padded).")
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=list, description="Where the Trainer also logs each run's curves (training loss, learning "
        "rate, selection-split PPL per epoch, by step): [] = nowhere; [tensorboard] = TensorBoard event files, "
        "offline, in the run's work directory while it trains and then in artifacts/train/<key>/tensorboard/ "
        "(view with: tensorboard --logdir artifacts/train). Not part of a run's cache key: it changes which "
        "files a run writes, never its numbers, so a run cached without curves keeps none until it reruns.")
    memory_budget_gb: Optional[float] = Field(
        None, gt=0, description="Memory budget of every training run in GB (10^9 bytes); unset = memory_budget_gb "
        "(the scoring budget). Each run is planned against it before anything is loaded (ftflow/plan/fit.py).")
    tf32: Literal["auto", "on", "off"] = Field(
        "auto", description="fp32 matrix products of the training steps in TF32 on the GPU's tensor cores (a 10-bit "
        "mantissa on their inputs, fp32 sums: several times faster for the fp32 models): auto = on where the GPU "
        "has it (compute capability 8.0, Ampere, or newer), off elsewhere; on = the same, with a warning where the "
        "device has no TF32; off = never. Scoring (benchmark, selection split, test) never uses TF32, also inside "
        "a training run. Each training run's manifest records it (tf32).")
    fit_order: tuple[FitTechnique, ...] = Field(
        DEFAULT_FIT_ORDER, description="Techniques tried, in this order, while a run is predicted over the training "
        "budget: micro_batch (the batch_size becomes the effective batch: the largest micro-batch that fits, "
        "gradient accumulation making up the rest), checkpointing (gradient checkpointing), optimizer_8bit "
        "(bitsandbytes 8-bit AdamW state), half_weights (full fine-tuning: bf16 trained weights instead of fp32, "
        "updated so small steps are kept), paged_optimizer (8-bit state in CUDA unified memory). Each is kept only "
        "when the run does not fit without it; a run that does not fit with all of them is skipped with the "
        "figure. [] only checks.")

    @field_validator("fit_order", mode="before")
    @classmethod
    def _fit_order_once(cls, value):
        if isinstance(value, (list, tuple)):
            repeated = sorted({v for v in value if list(value).count(v) > 1})
            if repeated:
                raise ValueError(f"fit_order: each technique at most once; repeated: {repeated}")
        return value


GRID_AXES = {"lora": ("r", "alpha", "dropout", "learning_rate"), "prefix": ("num_virtual_tokens", "learning_rate"),
             "distill": ("loss", "top_k", "temperature", "alpha")}
"""The axes of each searched grid (its config section's lists), which ``search.stratify`` may name."""


class SearchConfig(_Strict):
    """How each grid (the LoRA grid, the prefix grid, the distillation variants) is searched (docs/halving.md)."""

    strategy: Literal["grid", "halving"] = Field(
        "grid", description="grid = every combination trained to the end; halving = successive halving: every "
        "combination trains to the first rung, the best 1/eta on the selection split go on to the next rung from "
        "their checkpoint, and so on to the end (the survivors' final figures equal grid mode's).")
    eta: int = Field(3, description="halving: 1/eta of a rung's combinations (at least one) go on to the next "
                     "rung; >= 2.")
    rungs: tuple[float, ...] = Field(
        (0.25, 0.5), min_length=1, description="halving: where each rung stops, as fractions of each run's own "
        "steps (strictly increasing, each in (0, 1)); the last rung trains to the end.")

    stratify: dict[Literal["lora", "prefix", "distill"], tuple[str, ...]] = Field(
        default_factory=lambda: {"distill": ("temperature", "alpha")},
        description="halving: per grid (lora, prefix, distill), the axes whose combinations are only compared "
        "with the same values at an intermediate rung: each stratum keeps its own best 1/eta, and the strata meet "
        "at the end. Default: the distillation variants by temperature and alpha (the loss's mix: its runs follow "
        "different learning curves, docs/halving.md); {} compares every combination of a grid at every rung.")

    @field_validator("rungs", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _as_tuple(value)

    @field_validator("stratify", mode="before")
    @classmethod
    def _axes_one_or_many(cls, value):
        return {k: _as_tuple(v) for k, v in value.items()} if isinstance(value, dict) else value

    def axes(self, method: str) -> tuple[str, ...]:
        """The ``stratify`` axes of a grid of ``method``'s runs (none: the grid competes as one)."""
        return self.stratify.get(method, ())

    @model_validator(mode="after")
    def _valid_halving(self) -> "SearchConfig":
        problems = []
        if self.eta < 2:
            problems.append(f"eta must be >= 2 (1/eta of the combinations go on at each rung), got {self.eta}")
        outside = [f for f in self.rungs if not 0 < f < 1]
        if outside:
            problems.append(f"rungs are fractions of a run's steps, each in (0, 1) (the end, 1.0, is always the "
                            f"last rung); got {list(outside)}")
        if any(b <= a for a, b in zip(self.rungs, self.rungs[1:])):
            problems.append(f"rungs must be strictly increasing, got {list(self.rungs)}")
        for method, axes in self.stratify.items():
            for axis in axes:
                if axis not in GRID_AXES[method]:
                    close = difflib.get_close_matches(axis, GRID_AXES[method], n=1, cutoff=0.6)
                    problems.append(f"stratify.{method}: {axis!r} is not an axis of the {method} grid"
                                    + (f"; did you mean {close[0]!r}?" if close else "")
                                    + f" (its axes: {', '.join(GRID_AXES[method])})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RunnerConfig(_Strict):
    """Where mapped work (benchmark candidates, grid combinations) runs; the rest runs in the flow's process."""

    kind: Literal["local", "dask"] = Field(
        "local", description="local = one task at a time in the flow's process; dask = prefect-dask's DaskTaskRunner."
    )
    address: Optional[str] = Field(
        None, description="dask only: scheduler address of an existing cluster (tcp://host:8786); unset = start a "
        "LocalCluster on this machine."
    )
    n_workers: int = Field(2, ge=1, description="dask LocalCluster only: worker processes.")
    threads_per_worker: int = Field(1, ge=1, description="dask LocalCluster only: threads per worker.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="dask only: resources each mapped task claims, e.g. {GPU: 1}; workers "
        "must be started with them (dask-worker --resources GPU=1)."
    )

    @model_validator(mode="after")
    def _dask_only_settings(self) -> "RunnerConfig":
        if self.kind == "local" and (self.address is not None or self.resources):
            raise ValueError("runner: address and resources are only used with kind: dask")
        return self


class PipelineConfig(_Strict):
    """The whole pipeline."""

    name: str = Field("ftflow", description="Run name shown in Prefect and the report.")
    artifacts_dir: Path = Field(Path("artifacts"), description="Where every stage writes (relative: to the config).")
    seed: int = Field(0, description="Seed of model training.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    max_length: int = Field(2048, ge=2, description="Longest sequence scored or trained on, start token included.")
    memory_budget_gb: float = Field(
        20.0, gt=0, description="GPU memory budget in GB (10^9 bytes): `ftflow plan` predicts against it; "
        "on CUDA each model's measured scoring peak is checked against it."
    )
    selection_split: Literal["validation", "test"] = Field(
        "validation", description="Split every choice is made on; 'test' reproduces the study's protocol."
    )
    data: DataConfig
    augment: AugmentConfig = AugmentConfig()
    zoo: Optional[ZooConfig] = Field(None, description="Build offline checkpoints (the demo); excludes models.")
    models: tuple[ModelSpec, ...] = Field((), description="Candidate models by hub id or directory; excludes zoo.")
    memory: MemoryConfig = MemoryConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    select: SelectConfig = SelectConfig()
    lora: LoraConfig = LoraConfig()
    qlora: QLoraConfig = QLoraConfig()
    prefix: PrefixConfig = PrefixConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distill: DistillConfig = DistillConfig()
    compare: CompareConfig = CompareConfig()
    ablation: AblationConfig = AblationConfig()
    training: TrainingConfig = TrainingConfig()
    search: SearchConfig = SearchConfig()
    runner: RunnerConfig = RunnerConfig()

    @property
    def training_budget_gb(self) -> float:
        """The training runs' memory budget: ``training.memory_budget_gb``, else ``memory_budget_gb``."""
        return self.training.memory_budget_gb or self.memory_budget_gb

    @model_validator(mode="after")
    def _one_model_source(self) -> "PipelineConfig":
        if self.zoo is not None and self.models:
            raise ValueError("give either zoo (offline checkpoints) or models (hub ids), not both")
        if self.zoo is None and not self.models:
            raise ValueError("no candidate models: add a zoo section or a list of models")
        if self.ablation.enabled and not (self.augment.factor > 1.0 and sum(self.augment.methods.values()) > 0):
            raise ValueError("ablation.enabled compares training sets with and without augmentation: it needs "
                             "augment.factor > 1 and a method with weight > 0 (augment.enabled may be false: then "
                             "the pipeline trains on the original split and augments for the comparison only)")
        if self.training.packing == "on" and self.prefix.enabled:
            raise ValueError("training.packing: on cannot apply to prefix tuning (PEFT prepends its virtual tokens "
                             "to every row): set training.packing to auto (prefix tuning then trains on "
                             "length-grouped batches) or prefix.enabled to false")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        return self


class ConfigError(UserError, ValueError):
    """A configuration file that cannot be used; the message lists every problem."""


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Make the config's relative paths relative to the config file's folder."""

    def fix(section: dict | None, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            path = Path(section[key]).expanduser()
            section[key] = str((path if path.is_absolute() else base / path).resolve())

    raw.setdefault("artifacts_dir", "artifacts")
    fix(raw, "artifacts_dir")
    fix(raw.get("data"), "train_file")
    fix(raw.get("data"), "test_file")
    fix(raw.get("zoo"), "corpus_file")
    fix(raw.get("augment"), "nltk_data_dir")
    fix((raw.get("augment") or {}).get("back_translation"), "local_forward_model_dir")
    fix((raw.get("augment") or {}).get("back_translation"), "local_backward_model_dir")
    for model in raw.get("models") or []:
        # A hub id looks like a relative path; only rewrite what exists on disk.
        if isinstance(model, dict) and isinstance(model.get("path"), str):
            candidate = Path(model["path"]).expanduser()
            if not candidate.is_absolute() and (base / candidate).exists():
                model["path"] = str(base / candidate)
    return raw


class Overrides(dict):
    """``--set`` overrides as a nested mapping that remembers what the user typed, to name it in errors."""

    def __init__(self, value: dict, given: dict[tuple[str, ...], str]) -> None:
        super().__init__(value)
        self.given = given  # dotted key's parts -> the KEY=VALUE text


def parse_config(raw: dict, base_dir: Path, source: str = "<config>", overrides: dict | None = None,
                 file_raw: dict | None = None) -> PipelineConfig:
    """Validate a config mapping; relative paths are taken from ``base_dir``.

    ``overrides`` (already merged into ``raw``) and ``file_raw`` (the file's own mapping) only serve to say
    which problems come from a ``--set`` rather than from the file.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    resolved = _resolve_paths(dict(raw), base_dir)
    try:
        return PipelineConfig.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(_problems_text(source, schema_problems(exc, resolved, overrides, file_raw),
                                         overrides)) from None


def _read(path: str | Path, overrides: dict | None) -> tuple[dict, dict]:
    """The config file's mapping with ``overrides`` merged in, and the file's own mapping."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        hint = f" (it holds {', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found else ""
        raise ConfigError(f"config {path} is a directory{hint}; pass the path of a YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return (deep_merge(raw, overrides) if overrides else raw), raw


def load_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Read, merge ``overrides`` into, and validate a YAML config file."""
    merged, file_raw = _read(path, overrides)
    return parse_config(merged, Path(path).resolve().parent, source=str(path), overrides=overrides,
                        file_raw=file_raw)


def load_checked_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """:func:`load_config`, and every path the config names checked (:func:`path_problems`), all in one pass.

    Raises:
        ConfigError: listing every problem at once: the schema's, and those of every path that a section
            which validates on its own names (a bad zoo width does not hide a missing data file).
    """
    merged, file_raw = _read(path, overrides)
    resolved = _resolve_paths(dict(merged), Path(path).resolve().parent)
    try:
        cfg = PipelineConfig.model_validate(resolved)
        problems = path_problems(cfg)
    except ValidationError as exc:
        cfg = None
        problems = schema_problems(exc, resolved, overrides, file_raw) + _section_path_problems(resolved)
    if problems:
        raise ConfigError(_problems_text(str(path), problems, overrides))
    return cfg


def _problems_text(source: str, problems: list[str], overrides: dict | None) -> str:
    given = getattr(overrides, "given", None)
    sets = f" with {' '.join(f'--set {t}' for t in given.values())}" if given else ""
    return f"{source}{sets} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)


def schema_problems(exc: ValidationError, raw: dict, overrides: dict | None = None,
                    file_raw: dict | None = None) -> list[str]:
    """One ``"<field>: <problem>"`` line per problem pydantic found, said for a person who wrote YAML.

    An unknown field says which known one it is closest to; a value that came from a ``--set`` names it; a
    one-value grid axis (``learning_rate: -1``) is named as written, and its emptied list is not a second problem.
    """
    errors = exc.errors()
    failed_items = {tuple(e["loc"][:-1]) for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
    lines = []
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and loc in failed_items:
            continue  # the list is short because its item failed: that item's problem says it
        shown = loc
        if shown and isinstance(shown[-1], int) and not isinstance(_raw_at(raw, shown[:-1]), list):
            shown = shown[:-1]  # one value where a grid axis takes a list: name it as written
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = _unknown_field_message(loc)
        origin = _override_origin(loc, overrides, file_raw)
        lines.append(f"{'.'.join(str(p) for p in shown) or '<top>'}{origin}: {message}")
    return lines


_MISSING = object()


def _raw_at(raw: Any, loc: tuple) -> Any:
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return _MISSING
    return node


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The config model class that the mapping at ``loc`` is validated by, or None."""
    model: Optional[type[BaseModel]] = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: the list's element type was taken already
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The BaseModel class an annotation holds (itself, ``Optional[X]``, ``tuple[X, ...]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        if (found := _model_in(argument)) is not None:
            return found
    return None


def _unknown_field_message(loc: tuple) -> str:
    name, where = str(loc[-1]), loc[:-1]
    model = _model_at(where)
    section = f"section {'.'.join(str(p) for p in where)}" if where else "the config"
    if model is None:
        return f"{name!r} is not a field of {section}"
    fields = list(model.model_fields)
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"{name!r} is not a field of {section}; did you mean {close[0]!r}?"
    return f"{name!r} is not a field of {section} (its fields: {', '.join(fields)})"


def _override_origin(loc: tuple, overrides: dict | None, file_raw: dict | None) -> str:
    """`` (from --set KEY=VALUE)`` when the problem at ``loc`` is in a value a ``--set`` gave, else empty."""
    if not overrides:
        return ""
    node: Any = overrides
    for depth, part in enumerate(loc):
        if not isinstance(node, dict):
            break  # inside a value the override set
        if str(part) not in node:
            return ""
        node = node[str(part)]
    else:
        depth = len(loc)
        if isinstance(node, dict) and _raw_at(file_raw or {}, loc) is not _MISSING:
            return ""  # a section both the file and an override fill: the problem may be either's
    given = getattr(overrides, "given", {})
    path = tuple(str(p) for p in loc[:depth])
    texts = [text for key, text in given.items() if key[:len(path)] == path or path[:len(key)] == key]
    return f" (from --set {', --set '.join(texts)})" if texts else " (from the overrides)"


def _file_problem(path: Path, what: str) -> Optional[str]:
    """Why ``path`` cannot be read as a file, or None."""
    if not path.exists():
        return f"{what} {path} does not exist"
    if not path.is_file():
        return f"{what} {path} is not a file"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"{what} {path} cannot be read ({exc.strerror}); check its permissions"
    return None


def _model_dir_problem(path: Path, shown: str | Path | None = None) -> Optional[str]:
    """Why ``path`` is not a Hugging Face model directory (one holding a readable config.json), or None."""
    shown = path if shown is None else shown
    if not path.exists():
        return f"model directory {shown} does not exist"
    if not path.is_dir():
        return f"model directory {shown} is not a directory"
    if not (path / "config.json").is_file():
        return (f"{shown} is not a model directory: it has no config.json (a checkpoint written by "
                "save_pretrained has one)")
    return _file_problem(path / "config.json", "model config")


def _looks_like_a_path(value: str) -> bool:
    """A model path that can only mean a directory: absolute, ./ ../ ~, or deeper than org/name."""
    return value.startswith(("/", "./", "../", "~", ".\\")) or "\\" in value or value.count("/") > 1


def model_path_problem(value: str) -> Optional[str]:
    """Why a ``models[].path`` is neither a model directory nor a well-formed hub id, or None.

    A value naming an existing directory, or written as a path (``/...``, ``./...``,
    ``~/...``, more than one ``/``), must be a model directory holding a config.json;
    anything else is taken as a hub id and must be well formed (``org/name``; whether
    the hub has it is only known when it is loaded).
    """
    path = Path(value).expanduser()
    if path.exists() or _looks_like_a_path(value):
        return _model_dir_problem(path, value)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        return (f"{value!r} is neither a model directory nor a well-formed hub id (org/name): "
                f"{str(exc).splitlines()[0]}")
    return None


def path_problems(cfg: PipelineConfig) -> list[str]:
    """Every path the config names that cannot be used, as ``"<field>: <problem>"`` lines (empty when all are fine).

    Data and corpus files must exist and be readable, with a format ftflow reads; model
    directories must hold a config.json; hub ids must be well formed. Nothing is loaded.
    """
    return _path_problems(cfg.data, cfg.zoo, cfg.augment, list(cfg.models), cfg.artifacts_dir)


def _section_path_problems(raw: dict) -> list[str]:
    """:func:`path_problems` of a config that does not validate: the paths of every section that does on its own."""

    def section(model: type[BaseModel], value: Any) -> Any:
        try:
            return model.model_validate(value)
        except ValidationError:
            return None

    artifacts_dir = raw.get("artifacts_dir")
    zoo = section(ZooConfig, raw["zoo"]) if raw.get("zoo") is not None else None
    problems = _path_problems(
        section(DataConfig, raw["data"]) if "data" in raw else None, zoo,
        section(AugmentConfig, raw.get("augment") or {}),
        [section(ModelSpec, m) for m in raw.get("models") or []] if isinstance(raw.get("models"), list) else [],
        Path(artifacts_dir) if isinstance(artifacts_dir, str) else None)
    # A zoo whose widths fail still names its corpus file: said now, not once the widths are fixed.
    corpus = raw["zoo"].get("corpus_file") if zoo is None and isinstance(raw.get("zoo"), dict) else None
    if isinstance(corpus, (str, Path)) and (problem := _file_problem(Path(corpus), "corpus file")):
        problems.append(f"zoo.corpus_file: {problem}")
    return problems


def _path_problems(data: Optional[DataConfig], zoo: Optional[ZooConfig], augment: Optional[AugmentConfig],
                   models: list[Optional[ModelSpec]], artifacts_dir: Optional[Path]) -> list[str]:
    """The path problems of these sections (None: a section that did not validate, so has none to check)."""
    problems = []
    for field_name in ("train_file", "test_file") if data is not None else ():
        path = getattr(data, field_name)
        if path is None:
            continue
        problem = _file_problem(path, "data file")
        if problem is None and path.suffix.lower() not in FORMATS:
            problem = f"data file {path} has an unknown extension {path.suffix!r}; use one of {sorted(FORMATS)}"
        if problem:
            problems.append(f"data.{field_name}: {problem}")
    if zoo is not None and zoo.corpus_file is not None:
        problem = _file_problem(zoo.corpus_file, "corpus file")
        if problem:
            problems.append(f"zoo.corpus_file: {problem}")
    if augment is not None and augment.nltk_data_dir is not None and not augment.nltk_data_dir.is_dir():
        problems.append(f"augment.nltk_data_dir: {augment.nltk_data_dir} is not a directory")
    translation = augment.back_translation if augment is not None else None
    for field_name in ("local_forward_model_dir", "local_backward_model_dir") if translation is not None else ():
        path = getattr(translation, field_name)
        if path is not None and (problem := _model_dir_problem(path)):
            problems.append(f"augment.back_translation.{field_name}: {problem}")
    for index, spec in enumerate(models):
        if spec is not None and (problem := model_path_problem(spec.path)):
            problems.append(f"models.{index}.path ({spec.name}): {problem}")
    if artifacts_dir is not None and artifacts_dir.exists() and not artifacts_dir.is_dir():
        problems.append(f"artifacts_dir: {artifacts_dir} exists and is not a directory")
    return problems


def check_paths(cfg: PipelineConfig, source: str = "<config>") -> PipelineConfig:
    """``cfg`` if every path it names can be used (see :func:`path_problems`), else a ConfigError listing them all."""
    problems = path_problems(cfg)
    if problems:
        raise ConfigError(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
