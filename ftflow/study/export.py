"""The winner, ready to use: a finished run's model written as a standalone checkpoint (``ftflow export``).

What is written, by how the run was trained:

* LoRA: the adapter merged into the base weights (PEFT's ``merge_and_unload``), at the precision the base was
  trained and scored in (fp32, or bf16 for the study's 7B/8B): an ordinary checkpoint, no PEFT needed.
* QLoRA: the 4-bit (NF4) base dequantized (transformers' ``dequantize``: bitsandbytes' ``dequantize_4bit``) to the
  run's compute dtype, the precision its 4-bit layers computed in, and the adapter merged into it: the same
  function the run computed, in 16 (or 32) bits per weight instead of 4.
* Prefix tuning: its PEFT adapter as it is (virtual key/values cannot be merged into weights); the card names the
  base model, which ``PeftModel`` / ``AutoPeftModelForCausalLM`` load it onto.
* Full fine-tuning and distillation: the checkpoint as it is. A base model (no run beat it): its weights at the
  precision it was scored in.

Always with the tokenizer, weights in safetensors, and a model card (``README.md``) with the run's figures and
their 95% intervals. The directory is written beside ``DIR`` and renamed into place when complete, so an
interrupted export leaves nothing that looks finished; an existing, non-empty ``DIR`` is refused.

Memory: the export loads one model at the precision it writes (LoRA: the base at its precision; QLoRA: the 4-bit
base, then each layer dequantized in turn, which replaces its 4-bit copy). Before loading, the weights' size is
checked against what the device has free (CPU: ``MemAvailable``; CUDA: free memory less
``memory.cuda_margin_gb``), so an 8B model in bf16 (16 GB) is refused with the figures where it cannot fit.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import yaml

from ftflow.artifacts import read_json, read_manifest
from ftflow.errors import UserError
from ftflow.study.recommend import loading_lines

GB = 1e9
BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MERGED_TOLERANCE = {"lora": "1e-4 relative in fp32 (merging only reorders the same products' sums; tested)",
                    "qlora": "1e-5 relative when the 4-bit layers computed in fp32, 1e-2 in bf16 (tested): the "
                             "merged weights are the same dequantized ones plus the adapter's product, rounded "
                             "once to the compute dtype where the run rounded the two apart"}


class ExportError(UserError):
    """An export that cannot be made: the message names the problem and the fix."""


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_run` wrote.

    Attributes:
        name: the exported model's name (a leaderboard row).
        kind: how it was trained (``baseline``, ``lora``, ``qlora``, ``prefix``, ``full``, ``distill``).
        directory: where it was written.
        precision: the precision of the written weights (``fp32``, ``bf16``...; prefix: the adapter's base).
        how: one line on what was written (merged, dequantized, copied).
        load: the two lines of Python that load it.
    """

    name: str
    kind: str
    directory: Path
    precision: str
    how: str
    load: list[str]


def find_model(evaluation: Mapping, name: Optional[str]) -> tuple[str, dict, dict]:
    """``(name, leaderboard row, stage manifest)`` of the model to export: ``name``, or the recommended one."""
    models = evaluation.get("models")
    if models is None:
        raise ExportError("this run's report was written by an older ftflow, which did not record where each model "
                          "is: run it again (`ftflow run CONFIG`; only the report is recomputed) and export then")
    if name is None:
        name = (evaluation.get("recommendation") or {}).get("name")
        if name is None:
            raise ExportError("the run recommends no model (none has a test score within the budget): name the "
                              "one to export (a name from the leaderboard)")
    if name not in models:
        known = sorted(models)
        close = [n for n in known if name.lower() in n.lower()][:5]
        raise ExportError(f"no model named {name!r} in this run's leaderboard"
                          + (f"; did you mean {', '.join(close)}?" if close else "")
                          + f" ({len(known)} models have a test score: `ftflow run CONFIG` prints them)")
    row = next(r for r in evaluation["leaderboard"] if r["name"] == name)
    manifest = read_manifest(Path(models[name]["stage_dir"]))
    if manifest is None:
        raise ExportError(f"{models[name]['stage_dir']} has no readable manifest: run the config again (`ftflow run "
                          "CONFIG` recomputes what is missing) and export then")
    return name, row, manifest


def _check_target(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ExportError(f"{directory} exists and is not an empty directory: export into a new or empty one "
                          "(nothing was written)")


def _available_bytes(device: str, margin_gb: float) -> Optional[int]:
    """What the device has free for the export's weights, or None when it cannot be told."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free - margin_gb * GB)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def planned_bytes(parameters: Optional[int], precision: str) -> Optional[int]:
    """The export's peak, predicted: the weights at the precision written (one model is held at a time)."""
    if not parameters:
        return None
    return int(parameters * BYTES_PER_WEIGHT.get(precision, 4))


def _check_memory(parameters: Optional[int], precision: str, device: str, margin_gb: float) -> None:
    need, free = planned_bytes(parameters, precision), _available_bytes(device, margin_gb)
    if need is not None and free is not None and need > free:
        other = "--device cuda, or a machine with more memory" if device == "cpu" else "--device cpu"
        raise ExportError(f"exporting needs about {need / GB:.1f} GB for the weights in {precision} "
                          f"({parameters:,} parameters) but {device} has {max(free, 0) / GB:.1f} GB free; use "
                          f"{other} (nothing was written)")


def export_precision(run: Mapping, row: Mapping) -> str:
    """The precision the exported weights are written in (see the module docstring)."""
    if row["kind"] == "qlora":
        return (run.get("quantization") or {}).get("compute_dtype", "bf16")
    if row["kind"] == "baseline":
        return run["precision"]
    if row["kind"] in ("lora", "prefix"):
        return run["base_model"]["precision"]
    # A checkpoint is copied as it is: the dtype it was saved in (bf16 when its run had to train bf16 weights).
    config = read_json(Path(run["dir"]) / run["files"]["model"] / "config.json")
    stored = config.get("dtype") or config.get("torch_dtype")
    return {name: short for short, name in DTYPE_NAMES.items()}.get(stored, run.get("precision", "fp32"))


def export_run(evaluation: Mapping, to: Path, name: Optional[str] = None, *, device: str = "cpu",
               cuda_margin_gb: float = 1.0) -> ExportedModel:
    """Write the model ``name`` (default: the recommended one) of a finished run into ``to`` (see the module).

    Args:
        evaluation: the ``evaluate`` stage's manifest of the finished run.
        to: the directory to write (new, or empty).
        name: a leaderboard name; None: the recommended model.
        device: where the model is loaded and merged (``cpu`` or ``cuda``).
        cuda_margin_gb: kept free on CUDA besides the weights.

    Returns:
        The :class:`ExportedModel`.

    Raises:
        ExportError: an unknown name, a non-empty target, or not enough memory (nothing is written).
    """
    to = Path(to).resolve()
    name, row, run = find_model(evaluation, name)
    _check_target(to)
    kind = row["kind"].split(" (")[0]
    row = {**row, "kind": kind}
    precision = export_precision(run, row)
    if kind not in ("prefix", "full", "distill"):  # the others are copied, not loaded
        _check_memory(row.get("parameters"), precision, device, cuda_margin_gb)
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = to.parent / f".{to.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir()
    try:
        how = _write(kind, run, staging, precision, device)
        loader = {"kind": "prefix" if kind == "prefix" else "full", "model_dir": str(to), "precision": precision}
        load = loading_lines(loader)
        (staging / "README.md").write_text(export_card(name, kind, row, run, precision, how, load), encoding="utf-8")
        if to.exists():
            to.rmdir()  # empty, checked above
        os.replace(staging, to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportedModel(name, kind, to, precision, how, load)


def _write(kind: str, run: Mapping, out: Path, precision: str, device: str) -> str:
    """Write the model's files into ``out``; return one line on what was done."""
    from ftflow.models.loading import load_model, load_tokenizer

    if kind in ("full", "distill", "prefix"):
        source = Path(run["dir"]) / run["files"]["model"]
        shutil.copytree(source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
        if kind == "prefix":
            return (f"the prefix-tuning adapter as trained (PEFT; virtual tokens cannot be merged into weights), on "
                    f"the base model {run['base_model']['path']}")
        return f"the {'distilled' if kind == 'distill' else 'fine-tuned'} checkpoint as trained ({precision})"
    base = run["model"] if kind == "baseline" else run["base_model"]
    trust = base.get("trust_remote_code", False)
    tokenizer = load_tokenizer(base["path"], trust)
    if kind == "baseline":
        model = load_model(base["path"], precision, device, trust_remote_code=trust)
        how = f"the base model's weights in {precision}, as scored (no fine-tuning beat it)"
    elif kind == "lora":
        adapter = str(Path(run["dir"]) / run["files"]["model"])
        model = load_model(base["path"], precision, device, adapter=adapter, trust_remote_code=trust)
        model = model.merge_and_unload()
        how = f"LoRA merged into the base weights (PEFT merge_and_unload), {precision}"
    elif kind == "qlora":
        from peft import PeftModel

        adapter = str(Path(run["dir"]) / run["files"]["model"])
        model = load_model(base["path"], "nf4", device, trust_remote_code=trust, quantization=run.get("quantization"))
        model = model.dequantize()  # each 4-bit layer replaced by its dequantized weights, in the compute dtype
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        quantization = run.get("quantization") or {}
        how = (f"QLoRA: the {quantization.get('quant_type', 'nf4')} base dequantized to {precision} (its compute "
               f"dtype) and the adapter merged into it (PEFT merge_and_unload)")
    else:
        raise ExportError(f"cannot export a model of kind {kind!r}")
    model = model.to(dtype=_torch_dtype(precision))
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the weights written are not quantized
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return how


def _torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def export_card(name: str, kind: str, row: Mapping, run: Mapping, precision: str, how: str, load: list[str]) -> str:
    """The exported model's card: what it is, how it was exported, the run's figures with their intervals."""
    base = run["model"] if kind == "baseline" else run["base_model"]
    meta = {"base_model": base["path"], "library_name": "peft" if kind == "prefix" else "transformers",
            "pipeline_tag": "text-generation", "tags": ["ftflow", kind]}
    figures = [f"| test PPL | {row['test_ppl']:.4f} |"]
    if row.get("test_ppl_low") is not None:
        figures.append(f"| test PPL, 95% interval (bootstrap over test sentences) | [{row['test_ppl_low']:.4f}, "
                       f"{row['test_ppl_high']:.4f}] |")
    figures.append(f"| test bits/byte | {row['test_bits_per_byte']:.4f} |")
    if row.get("test_bpb_low") is not None:
        figures.append(f"| test bits/byte, 95% interval | [{row['test_bpb_low']:.4f}, {row['test_bpb_high']:.4f}] |")
    if row.get("selection_ppl") is not None:
        figures.append(f"| selection PPL | {row['selection_ppl']:.4f} |")
    if row.get("delta_ppl_vs_base") is not None:
        figures.append(f"| Δ test PPL vs its base model | {row['delta_ppl_vs_base']:+.4f}"
                       + (f" {row['delta_vs_base_ci']}" if row.get("delta_vs_base_ci") else "") + " |")
    hyper = {**(run.get("job") or {})}
    hyper.pop("model", None)
    tolerance = MERGED_TOLERANCE.get(kind)
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"{kind} of `{base['path']}` ({base['name']}, family {base['family']}), exported by ftflow "
        f"(`ftflow export`){' as the recommended model' if row.get('answer') == 'recommended' else ''}.", "",
        f"- written: {how}",
        f"- weights precision: {precision}" + ("" if kind != "prefix" else " (the base's; the adapter is on top)"),
        *([f"- scores as the run did, within {tolerance}"] if tolerance else []),
        "", "## Figures of the run (test split)", "", "| figure | value |", "|---|---|", *figures, "",
        "Perplexity is token-weighted over the split (exp of total NLL / scored tokens); intervals are 95% "
        "bootstrap intervals over the test sentences (1,000 resamples).", "",
        "## Hyperparameters", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in hyper.items()], "",
        "## Loading", "", "```python", *load, "```", "",
    ]
    return "\n".join(lines)
