"""Model cards: a short README.md beside every trained adapter or checkpoint.

The card follows the Hugging Face convention (YAML metadata block, then
Markdown) so hub tooling reads it, and says what a person needs to trust or
reproduce the result: base model, method, hyperparameters, the data it was
trained and judged on (content fingerprints), and its perplexities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import yaml

from ftflow.train.jobs import parse_job

CARD = "README.md"


def oom_retry_line(retry: Mapping) -> str:
    """One out-of-memory retry of a training run (an entry of ``oom_retries`` in its manifest), in words."""
    if retry.get("next") is None:
        return f"{retry['error']} with {retry['failed']}: nothing left to try"
    state = {"resumed": "optimizer state resumed", "restarted": "optimizer state restarted"}.get(
        retry.get("optimizer_state"), "started over")
    where = f"resumed from {retry['resume_from']}" if retry.get("resume_from") else "no checkpoint yet"
    return f"{retry['change']}; {where}, {state}"


def _loading_snippet(summary: dict) -> str:
    base = summary["base_model"]["path"]
    if summary["method"] in ("lora", "qlora", "prefix"):
        quant = ""
        if summary["method"] == "qlora":
            quant = ("\nfrom transformers import BitsAndBytesConfig\n"
                     "# QLoRA: load the base in 4 bits as it was trained (see the hyperparameters above)\n")
        return (
            f"```python{quant}\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            "model = PeftModel.from_pretrained(base, \"<this directory>\")\n```"
        )
    return ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")\n```")


def render_model_card(summary: dict, facts: dict) -> str:
    """The card's text for a run summary (see :func:`ftflow.train.runner.run_job`) and extra facts."""
    base = summary["base_model"]
    peft = summary["method"] in ("lora", "qlora", "prefix")
    meta = {
        "base_model": base["path"],
        "library_name": "peft" if peft else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["ftflow", summary["method"]],
    }
    job = parse_job(summary["job"])
    hyper = {**job.hyper, "learning_rate": job.learning_rate, "epochs": job.epochs,
             "batch_size": job.batch_size, "weight_decay": job.weight_decay, "precision": summary["precision"]}
    plan = summary.get("precision_plan")
    if plan:  # how the weights were kept and updated (see ftflow.train.trainer.plan_precision)
        hyper.update({"trained weights": plan["trained_weights"], "autocast": plan["autocast"] or "none",
                      "loss scaling": plan["loss_scaling"], "optimizer": plan["optimizer"]})
    if summary.get("batching"):  # packed, length-grouped or padded (see ftflow.train.trainer.batching_for)
        hyper["batching"] = summary["batching"]
    if summary.get("tf32"):  # training steps' fp32 matrix products (ftflow.device.resolve_tf32); scoring never
        hyper["TF32 (training steps)"] = "on" if summary["tf32"]["training"] else "off"
    fit = summary.get("fit_plan")
    if fit:  # micro-batches, checkpointing, optimizer state chosen to fit the memory budget (ftflow/plan/fit.py)
        hyper.update({"micro-batch x accumulation": f"{fit['micro_batch_size']} x {fit['accumulation_steps']}",
                      "gradient checkpointing": fit["gradient_checkpointing"],
                      "memory fit": summary.get("fit_summary", "")})
    retries = summary.get("oom_retries") or []  # the run ran out of device memory and was retried (ftflow/plan/fit.py)
    if retries:
        hyper["out-of-memory retries"] = " / ".join(r["line"] for r in retries)
    selection, test = summary["selection"], summary["test"]
    baseline = summary["baseline_validation"]["corpus_ppl"]
    improved = summary.get("improved", True)
    epoch = summary.get("best_trained_epoch", summary["best_epoch"])
    verdict = [] if improved else [
        f"**No epoch beat the base model on the selection split** (base model {baseline:.4f}; the best trained "
        f"epoch, {epoch}, reached {selection['corpus_ppl']:.4f}): the base model `{base['path']}` is the better "
        f"one; this {'adapter' if peft else 'checkpoint'} is the best trained epoch, kept to show what training "
        "reached.", ""]
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {summary['name']}",
        "",
        f"{summary['method']} of `{base['path']}` ({base['name']}, family {base['family']}), trained by ftflow.",
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in hyper.items()],
        "",
        "## Data",
        "",
        f"- training set: `{summary['train_set']}`, {summary['train_sentences']} sentences",
        *[f"- {k}: `{v}`" for k, v in facts.items()],
        "",
        "## Results",
        "",
        *verdict,
        "| split | PPL | bits/byte | tokens |",
        "|---|---|---|---|",
        f"| selection ({facts.get('selection_split', 'validation')}), before training (the base model) | "
        f"{baseline:.4f} | {summary['baseline_validation']['bits_per_byte']:.4f} | "
        f"{summary['baseline_validation']['scored_tokens']} |",
        f"| selection, best {'' if improved else 'trained '}epoch ({epoch}) | {selection['corpus_ppl']:.4f} | "
        f"{selection['bits_per_byte']:.4f} | {selection['scored_tokens']} |",
        f"| test | {test['corpus_ppl']:.4f} | {test['bits_per_byte']:.4f} | {test['scored_tokens']} |",
        "",
        "Perplexity is token-weighted over the split (exp of total NLL / scored tokens). The best epoch was chosen "
        "on the selection split; test was scored once, afterwards.",
        "",
        "## Loading",
        "",
        _loading_snippet(summary),
        "",
    ]
    return "\n".join(lines)


def write_model_card(model_dir: Path, summary: dict, facts: dict) -> Path:
    """Write ``README.md`` into ``model_dir``; returns its path."""
    path = Path(model_dir) / CARD
    path.write_text(render_model_card(summary, facts), encoding="utf-8")
    return path


def read_card_metadata(model_dir: Path) -> dict:
    """The YAML metadata block of a card."""
    text = (Path(model_dir) / CARD).read_text(encoding="utf-8")
    _, block, _ = text.split("---", 2)
    return yaml.safe_load(block)
