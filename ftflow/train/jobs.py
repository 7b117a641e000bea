"""Training jobs, typed: one class per fine-tuning method, each with its own hyperparameters.

A job says *what* one training run trains: a method with its hyperparameters
on one model and one training set. :data:`Job` is the discriminated union of
:class:`LoraJob`, :class:`QLoraJob`, :class:`PrefixJob`, :class:`FullJob` and
:class:`DistillJob` (``method`` tells them apart); :func:`parse_job` reads one
back from a run's manifest. The constructors below expand the config's grids
into jobs; *which* jobs the study runs is decided in :mod:`ftflow.study.design`.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ftflow.config import DistillConfig, FinetuneConfig, LoraConfig, PrefixConfig, QLoraConfig


class _Job(BaseModel):
    """What every job has: the model, the optimizer's settings and the training set.

    ``model`` is a benchmarked model (``name``, ``path``, ``family``,
    ``precision``, ``trust_remote_code``). ``train_set`` names the training
    sentences: ``main`` (the pipeline's training set: augmented as configured,
    or the original split when augmentation is off) or, in the augmentation
    ablation, ``original``, ``augmented``, ``original-steps`` or one augmentation method.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: dict[str, Any]
    learning_rate: float
    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    train_set: str = "main"

    @property
    def precision(self) -> str:
        """Weights precision of the base model during training (nf4 for QLoRA)."""
        return self.model["precision"]

    @property
    def hyper(self) -> dict[str, Any]:
        """The method's own hyperparameters, by name (the model card's table)."""
        common = set(_Job.model_fields) | {"method"}
        return {k: v for k, v in self.model_dump().items() if k not in common}

    def _label_parts(self) -> list[str]:
        return []

    def memory_options(self) -> dict[str, Any]:
        """What the memory planner needs besides the method (:func:`ftflow.plan.predict.predict_training`'s options)."""
        return {}

    @property
    def settings_label(self) -> str:
        """The hyperparameters, short: ``r16,a32,d0.05,lr0.0002``."""
        parts = self._label_parts() + [f"lr{self.learning_rate:g}"]
        if self.train_set != "main":
            parts.append(f"data={self.train_set}")
        return ",".join(parts)

    @property
    def title(self) -> str:
        """Run name: ``lora[granite-teacher|r16,a32,d0.05,lr0.0002]``."""
        return f"{self.method}[{self.model['name']}|{self.settings_label}]"

    @property
    def name(self) -> str:
        """Name of the trained model in tables: ``granite-teacher+lora[r16,a32,d0.05,lr0.0002]``."""
        return f"{self.model['name']}+{self.method}[{self.settings_label}]"


class LoraJob(_Job):
    """LoRA (PEFT): rank ``r`` adapters scaled by ``alpha / r`` on ``target_modules``, the base frozen."""

    method: Literal["lora"] = "lora"
    r: int
    alpha: float
    dropout: float
    target_modules: Union[str, tuple[str, ...]]

    def _label_parts(self) -> list[str]:
        return [f"r{self.r}", f"a{self.alpha:g}", f"d{self.dropout:g}"]

    def memory_options(self) -> dict[str, Any]:
        return {"lora_r": self.r, "lora_dropout": self.dropout}


class QLoraJob(LoraJob):
    """QLoRA: LoRA on the base model loaded in 4 bits by bitsandbytes."""

    method: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"]
    double_quant: bool
    compute_dtype: Literal["bf16", "fp16", "fp32"]

    @property
    def precision(self) -> str:
        return "nf4"

    @property
    def quantization(self) -> dict[str, Any]:
        """The 4-bit loading settings (:func:`ftflow.models.loading.load_model`'s ``quantization``)."""
        return {"quant_type": self.quant_type, "double_quant": self.double_quant, "compute_dtype": self.compute_dtype}

    def _label_parts(self) -> list[str]:
        return super()._label_parts() + [self.quant_type]


class PrefixJob(_Job):
    """Prefix tuning (PEFT): ``num_virtual_tokens`` trained key/value vectors per layer."""

    method: Literal["prefix"] = "prefix"
    num_virtual_tokens: int

    def _label_parts(self) -> list[str]:
        return [f"p{self.num_virtual_tokens}"]

    def memory_options(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens}


class FullJob(_Job):
    """Full fine-tuning: every weight trained."""

    method: Literal["full"] = "full"


class DistillJob(_Job):
    """Distillation into the student: ``(1 - alpha) CE + alpha T^2 KL`` against ``top_k`` teacher ids a position.

    ``loss``: ``topk`` (the teacher's top-k and a tail bucket) or ``sampled``
    (``top_k`` ids drawn from the teacher; see :mod:`ftflow.distill`).
    """

    method: Literal["distill"] = "distill"
    loss: Literal["topk", "sampled"] = "topk"
    top_k: int
    temperature: float
    alpha: float

    def _label_parts(self) -> list[str]:
        ids = f"top{self.top_k}" if self.loss == "topk" else f"sample{self.top_k}"
        return [ids, f"T{self.temperature:g}", f"a{self.alpha:g}"]


Job = Annotated[Union[LoraJob, QLoraJob, PrefixJob, FullJob, DistillJob], Field(discriminator="method")]
"""Any training job; ``method`` says which class."""

_JOB = TypeAdapter(Job)


def parse_job(value: dict | _Job) -> Job:
    """The typed job of a manifest's ``job`` (a dict as :meth:`model_dump` wrote it), or the job itself."""
    return value if isinstance(value, _Job) else _JOB.validate_python(value)


# ----------------------------------------------------------------------------- grids -> jobs


def lora_grid(config: LoraConfig, model: dict) -> list[LoraJob]:
    """One LoRA job per combination of rank, alpha, dropout and learning rate, in a fixed order."""
    return [
        LoraJob(model=model, learning_rate=lr, epochs=config.epochs, batch_size=config.batch_size, r=r, alpha=alpha,
                dropout=dropout, target_modules=config.target_modules)
        for r, alpha, dropout, lr in itertools.product(config.r, config.alpha, config.dropout, config.learning_rate)
    ]


def lora_like(best: LoraJob, model: dict, train_set: str = "main") -> LoraJob:
    """The best LoRA combination on another model (or another training set)."""
    return best.model_copy(update={"model": model, "train_set": train_set})


def qlora_like(best: LoraJob, model: dict, config: QLoraConfig) -> QLoraJob:
    """The best LoRA combination as QLoRA: the base model in 4 bits (bitsandbytes)."""
    lora = {k: v for k, v in best.model_dump().items() if k != "method"}
    return QLoraJob(**{**lora, "model": model, "quant_type": config.quant_type, "double_quant": config.double_quant,
                       "compute_dtype": config.compute_dtype})


def prefix_grid(config: PrefixConfig, model: dict) -> list[PrefixJob]:
    """One prefix-tuning job per prefix length and learning rate."""
    return [
        PrefixJob(model=model, learning_rate=lr, epochs=config.epochs, batch_size=config.batch_size,
                  num_virtual_tokens=n)
        for n, lr in itertools.product(config.num_virtual_tokens, config.learning_rate)
    ]


def full_job(config: FinetuneConfig, model: dict, train_set: str = "main") -> FullJob:
    """Full fine-tuning of one model."""
    return FullJob(model=model, learning_rate=config.learning_rate, epochs=config.epochs,
                   batch_size=config.batch_size, weight_decay=config.weight_decay, train_set=train_set)


def distill_grid(config: DistillConfig, student: dict, loss: str | None = None) -> list[DistillJob]:
    """One distillation job per loss, top-k, temperature and alpha (``loss`` given: that loss's jobs only)."""
    losses = config.loss if loss is None else (loss,)
    return [
        DistillJob(model=student, learning_rate=config.learning_rate, epochs=config.epochs,
                   batch_size=config.batch_size, loss=variant, top_k=k, temperature=t, alpha=a)
        for variant, k, t, a in itertools.product(losses, config.top_k, config.temperature, config.alpha)
    ]


def best_run(runs: Sequence[dict]) -> dict:
    """The run with the lowest selection-split perplexity (ties: the earlier one); skipped runs are ignored."""
    trained = [r for r in runs if not r.get("skipped")]
    if not trained:
        raise ValueError("no run finished, so there is no best one: " +
                         "; ".join(f"{r['name']}: {r.get('skipped')}" for r in runs))
    return min(trained, key=lambda r: r["best_validation_ppl"])
