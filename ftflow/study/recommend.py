"""The answer a user acts on: the recommended model, the runner-up, and one finding per study section.

Pure: every function takes the stages' results (leaderboard candidates, run
manifests) and the test split's per-sentence scores (:class:`Evidence`), and
returns plain values and text; :mod:`tasks.evaluate` reads the files and
writes the report.

* :func:`recommend`: the model with the lowest test perplexity among the
  candidates whose predicted and measured peaks fit the budget (across
  families, whose perplexities are in other tokens, by bits per byte);
  ablation controls only when the user asks (``ablation.recommend_controls``).
  Then the runner-up, and whether the two are separable: the paired bootstrap
  interval of their difference (:func:`ftflow.study.uncertainty.paired_difference`).
* :func:`study_findings`: one line per study section with its conclusion,
  its figure and the interval that says whether the conclusion holds.
* :func:`answer_text`: all of it as the Markdown that opens the report, the
  terminal output of ``ftflow run`` and ``ftflow status`` on a finished run.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from ftflow.study.uncertainty import (DEFAULT_RESAMPLES, DEFAULT_SEED, Comparison, Interval, NotPairedError,
                                      SentenceScores, comparable_metric, interval, paired_difference)

GB = 1e9
CONTROL = "ablation control"
CANDIDATE = "candidate"
METHOD_WORDS = {"baseline": "the base model, not fine-tuned", "lora": "LoRA", "qlora": "QLoRA (LoRA on a 4-bit base)",
                "prefix": "prefix tuning", "full": "full fine-tuning", "distill": "distillation"}


class Evidence:
    """Every evaluated model's test-sentence scores, by name, and the intervals and comparisons made from them.

    All figures use one set of resamples (``resamples``, ``seed``), so a
    model's interval and its comparisons agree with each other.
    """

    def __init__(self, scores: Mapping[str, SentenceScores], resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_SEED) -> None:
        self.scores = dict(scores)
        self.resamples, self.seed = resamples, seed
        self.refused: list[str] = []  # pairs that could not be compared (other sentences), with the reason
        self._memo: dict[tuple, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.scores

    def interval(self, name: str, metric: str = "ppl") -> Optional[Interval]:
        """The model's test figure and its 95% bootstrap interval; None without per-sentence scores."""
        if name not in self.scores:
            return None
        key = ("interval", name, metric)
        if key not in self._memo:
            self._memo[key] = interval(self.scores[name], metric, resamples=self.resamples, seed=self.seed)
        return self._memo[key]

    def compare(self, a: str, b: str, metric: Optional[str] = None) -> Optional[Comparison]:
        """``a`` against ``b`` on the same sentences (paired); None when either has no scores or they differ."""
        if a not in self.scores or b not in self.scores:
            return None
        key = ("compare", a, b, metric)
        if key not in self._memo:
            try:
                self._memo[key] = paired_difference(self.scores[a], self.scores[b], metric,
                                                    resamples=self.resamples, seed=self.seed)
            except NotPairedError as exc:
                self.refused.append(f"{a} vs {b}: {exc}")
                self._memo[key] = None
        return self._memo[key]

    def same_tokens(self, names: Sequence[str]) -> bool:
        """Whether every named model scored the sentences in the same tokens (one tokenizer): PPL compares them."""
        known = [self.scores[n] for n in names if n in self.scores]
        return all(comparable_metric(known[0], other) == "ppl" for other in known[1:])


def _gb(value: Optional[float]) -> str:
    return "?" if value is None else f"{value / GB:.2f} GB"


def memory_fit(candidate: Mapping, decisions: Mapping[str, Mapping], budget_gb: float,
               measured: Mapping[str, Optional[int]]) -> tuple[bool, str]:
    """Whether a candidate's predicted and measured peaks fit the budget, and one line with the figures.

    Args:
        candidate: a leaderboard candidate (``base``, ``precision``, and for a run ``fit_plan``).
        decisions: the memory plan's decision per model (``peak_bytes``: the predicted scoring peak at its
            precision and batch size).
        budget_gb: the scoring budget (``memory_budget_gb``).
        measured: measured scoring peak per model (CUDA; None on a CPU).

    Returns:
        ``(fits, line)``: False when a predicted or measured peak is over its budget.
    """
    parts, fits = [], True
    decision = decisions.get(candidate.get("base") or candidate["name"]) or {}
    scoring = decision.get("peak_bytes")
    if scoring is not None:
        fits &= scoring <= budget_gb * GB
        parts.append(f"predicted {_gb(scoring)} to score ({decision.get('precision')}, batch "
                     f"{decision.get('batch_size')})")
    plan = candidate.get("fit_plan") or {}
    if plan.get("peak_bytes") is not None:
        fits &= bool(plan.get("fits", True)) and plan["peak_bytes"] <= plan["budget_bytes"]
        parts.append(f"{_gb(plan['peak_bytes'])} to train (training budget {plan['budget_bytes'] / GB:g} GB)")
    peak = candidate.get("peak_memory_bytes") or measured.get(candidate.get("base") or candidate["name"])
    if peak:
        fits &= peak <= budget_gb * GB
        parts.append(f"measured {_gb(peak)} scoring on CUDA")
    else:
        parts.append("not measured (no CUDA)")
    return fits, "; ".join(parts) + f"; budget {budget_gb:g} GB"


def loading_lines(candidate: Mapping) -> list[str]:
    """The two lines of Python that load the candidate as it was scored (imports, then the model)."""
    where = candidate.get("model_dir") or candidate.get("base_path") or candidate["name"]
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(candidate.get("base_precision") or
                                                                           candidate.get("precision") or "", None)
    dtype_arg = f", dtype=\"{dtype}\"" if dtype else ""
    kind = candidate["kind"]
    if kind in ("lora", "prefix"):
        return ["from peft import AutoPeftModelForCausalLM",
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{where}\"{dtype_arg})"]
    if kind == "qlora":
        q = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16", **(candidate.get("quantization") or {})}
        compute = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[q["compute_dtype"]]
        return ["from peft import AutoPeftModelForCausalLM; from transformers import BitsAndBytesConfig",
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{where}\", quantization_config=BitsAndBytesConfig("
                f"load_in_4bit=True, bnb_4bit_quant_type=\"{q['quant_type']}\", bnb_4bit_use_double_quant="
                f"{q['double_quant']}, bnb_4bit_compute_dtype=\"{compute}\"), dtype=\"{compute}\")"]
    return ["from transformers import AutoModelForCausalLM",
            f"model = AutoModelForCausalLM.from_pretrained(\"{where}\"{dtype_arg})"]


# Stands for the model's directory in the stored load lines: the manifest stores ``model_dir`` relative to
# artifacts_dir, so the lines follow a copied or moved directory where a path inside code text would not.
MODEL_DIR_FIELD = "<model_dir>"


def _loading_lines_at_model_dir(candidate: Mapping) -> list[str]:
    if not (candidate.get("model_dir") or candidate.get("base_path")):
        return loading_lines(candidate)
    return loading_lines({**candidate, "model_dir": MODEL_DIR_FIELD})


def _order_key(candidate: Mapping, metric: str) -> tuple:
    test = candidate["test"]
    return (test["corpus_ppl"] if metric == "ppl" else test["bits_per_byte"], candidate["name"])


def recommend(candidates: Sequence[Mapping], evidence: Evidence, *, budget_gb: float,
              decisions: Mapping[str, Mapping], include_controls: bool = False) -> dict:
    """The recommended model and its runner-up, from every leaderboard candidate.

    Eligible: a candidate with a test score (not failed, not skipped), that is
    not an ablation control (unless ``include_controls``), whose predicted and
    measured peaks fit (:func:`memory_fit`). The lowest test PPL wins when all
    eligible models share one tokenization; otherwise the lowest test bits per
    byte, the only figure comparable across tokenizers.

    Args:
        candidates: the leaderboard candidates (``name``, ``kind``, ``role``, ``family``, ``base``, ``test``...).
        evidence: the test-sentence scores.
        budget_gb: the scoring budget.
        decisions: the memory plan's decisions (predicted scoring peaks).
        include_controls: let ablation controls be recommended (``ablation.recommend_controls``).

    Returns:
        JSON-ready: ``name`` (None when nothing is eligible), ``metric`` (``ppl`` or ``bits_per_byte``),
        ``winner`` and ``runner_up`` (candidate summaries), ``comparison`` (winner vs runner-up, paired),
        ``eligible`` (count), ``excluded`` (name -> why), ``controls_excluded`` (count).
    """
    measured = {c["name"]: c.get("peak_memory_bytes") for c in candidates if c["kind"] == "baseline"}
    eligible, excluded, controls = [], {}, 0
    for c in candidates:
        if not c.get("test") or c.get("error"):
            continue
        if c.get("role") == CONTROL and not include_controls:
            controls += 1
            continue
        fits, line = memory_fit(c, decisions, budget_gb, measured)
        if fits:
            eligible.append((c, line))
        else:
            excluded[c["name"]] = f"over the budget: {line}"
    names = [c["name"] for c, _ in eligible]
    families = {c.get("family") for c, _ in eligible}
    metric = "ppl" if len(families) <= 1 and evidence.same_tokens(names) else "bits_per_byte"
    eligible.sort(key=lambda pair: _order_key(pair[0], metric))
    out: dict[str, Any] = {"name": None, "metric": metric, "winner": None, "runner_up": None, "comparison": None,
                           "eligible": len(eligible), "excluded": excluded, "controls_excluded": controls,
                           "include_controls": include_controls, "budget_gb": budget_gb}
    if not eligible:
        return out
    winner, fit_line = eligible[0]
    out.update(name=winner["name"], winner=_summary(winner, evidence, fit_line))
    if len(eligible) > 1:
        runner, runner_line = eligible[1]
        out["runner_up"] = _summary(runner, evidence, runner_line)
        # In PPL when the two share a tokenizer (even when the ranking needed bits per byte), else bits per byte.
        comparison = evidence.compare(winner["name"], runner["name"])
        out["comparison"] = comparison.to_dict() if comparison else None
    return out


def _summary(candidate: Mapping, evidence: Evidence, fit_line: str) -> dict:
    ppl = evidence.interval(candidate["name"], "ppl")
    bpb = evidence.interval(candidate["name"], "bits_per_byte") if _has_bytes(evidence, candidate["name"]) else None
    return {
        "name": candidate["name"], "kind": candidate["kind"], "role": candidate.get("role", CANDIDATE),
        "family": candidate.get("family"), "base": candidate.get("base"), "precision": candidate.get("precision"),
        "settings": candidate.get("settings"), "hyperparameters": candidate.get("hyperparameters") or {},
        "test_ppl": candidate["test"]["corpus_ppl"], "test_bits_per_byte": candidate["test"]["bits_per_byte"],
        "test_ppl_interval": [ppl.low, ppl.high] if ppl else None,
        "test_bits_per_byte_interval": [bpb.low, bpb.high] if bpb else None,
        "test_sentences": candidate["test"].get("n_sentences"),
        "selection_ppl": (candidate.get("selection") or {}).get("corpus_ppl"),
        "memory": fit_line, "model_dir": candidate.get("model_dir") or candidate.get("base_path"),
        "load": _loading_lines_at_model_dir(candidate), "quantization": candidate.get("quantization"),
    }


def _has_bytes(evidence: Evidence, name: str) -> bool:
    return evidence.has(name) and evidence.scores[name].bytes is not None


def _interval_text(value: float, bounds: Optional[Sequence[float]], digits: int = 4) -> str:
    if not bounds:
        return f"{value:.{digits}f} (no interval: per-sentence scores not kept)"
    return f"{value:.{digits}f} [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def comparison_text(comparison: Optional[Mapping]) -> str:
    """``test PPL -1.20% [-2.10%, -0.31%], separable: ...`` (a dict from :meth:`Comparison.to_dict`)."""
    if not comparison:
        return "no paired comparison (per-sentence scores not kept)"
    metric = "test PPL" if comparison["metric"] == "ppl" else "test bits/byte"
    verdict = ("within noise: the test set cannot tell them apart" if comparison["within_noise"]
               else "separable: the 95% interval excludes 0")
    return (f"{metric} {comparison['percent']:+.2f}% [{comparison['percent_low']:+.2f}%, "
            f"{comparison['percent_high']:+.2f}%], {verdict}")


def answer_text(recommendation: Mapping, findings: Sequence[str], *, config: str = "CONFIG") -> str:
    """The answer as Markdown: recommended model, runner-up, one line per study section."""
    winner = recommendation.get("winner")
    if winner is None:
        why = "; ".join(f"{n}: {r}" for n, r in (recommendation.get("excluded") or {}).items())
        return ("## Answer\n\nNo model can be recommended: no candidate has a test score within the budget"
                + (f" ({why})" if why else "") + ".\n")
    metric = recommendation["metric"]
    by = "test PPL (one tokenizer)" if metric == "ppl" else "test bits per byte (several tokenizers; PPL is per token)"
    method = METHOD_WORDS.get(winner["kind"], winner["kind"])
    settings = ", ".join(f"{k} {v}" for k, v in winner["hyperparameters"].items())
    lines = [
        "## Answer",
        "",
        f"**Recommended: `{winner['name']}`**: {method} of `{winner['base']}` (family {winner['family']}), "
        f"precision {winner['precision']}" + (f"; {settings}" if settings else ""),
        "",
        f"- test PPL **{_interval_text(winner['test_ppl'], winner['test_ppl_interval'])}**, bits/byte "
        f"{_interval_text(winner['test_bits_per_byte'], winner['test_bits_per_byte_interval'])} (95% bootstrap "
        f"intervals over the {winner['test_sentences']} test sentences)",
        f"- peak memory: {winner['memory']}",
        f"- on disk: `{winner['model_dir']}`",
        "- load it:",
        "",
        "```python",
        *(line.replace(MODEL_DIR_FIELD, str(winner["model_dir"])) for line in winner["load"]),
        "```",
        "",
        f"  or write a standalone checkpoint: `ftflow export {config} --to DIR`",
    ]
    runner = recommendation.get("runner_up")
    if runner is not None:
        lines.append(f"- runner-up: `{runner['name']}`, test PPL "
                     f"{_interval_text(runner['test_ppl'], runner['test_ppl_interval'])}; recommended vs runner-up: "
                     f"{comparison_text(recommendation.get('comparison'))}")
    chosen = (f"- chosen by the lowest {by} among {recommendation['eligible']} candidate(s) whose predicted and "
              f"measured peaks fit {recommendation['budget_gb']:g} GB")
    if recommendation.get("controls_excluded"):
        chosen += (f"; {recommendation['controls_excluded']} ablation control(s) not considered "
                   "(ablation.recommend_controls: true to include them)")
    if recommendation.get("excluded"):
        chosen += f"; over the budget: {', '.join(recommendation['excluded'])}"
    lines.append(chosen)
    if findings:
        lines += ["", "### What the study found (paired 95% bootstrap intervals over the test sentences)", "",
                  *[f"- {line}" for line in findings]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the study's findings


def _ppl(run: Mapping) -> float:
    return run["test"]["corpus_ppl"]


def _said(comparison: Optional[Comparison], better: str, worse: str, same: str) -> str:
    """A conclusion worded by the comparison: ``better`` when a < b beyond noise, ``worse`` when a > b, else ``same``
    (also without a comparison: nothing is claimed that was not measured)."""
    if comparison is None or comparison.within_noise:
        return same
    return better if comparison.difference < 0 else worse


def _figure(comparison: Optional[Comparison]) -> str:
    if comparison is None:
        return "no paired comparison (per-sentence scores not kept)"
    return comparison.text()


def _steps(run: Mapping) -> Optional[int]:
    history = run.get("history") or []
    return history[-1]["step"] if history else None


def study_findings(baselines: Sequence[Mapping], runs: Sequence[Mapping], chosen_lora: Optional[str],
                   ablation: Mapping[str, str], teacher: Optional[Mapping], evidence: Evidence,
                   lora_grid: Callable[[Sequence[Mapping], Optional[str]], list] = lambda runs, chosen: []
                   ) -> list[str]:
    """One line per study section: its conclusion, its figure and whether the test set can tell (paired intervals).

    Sections (those the study ran): the best LoRA combination (against the grid's next best on the selection
    split), LoRA against QLoRA (same combination, per model), prefix tuning (its best run against its base model),
    full fine-tuning (against the base model), distillation against full fine-tuning at equal steps (the variant
    chosen on the selection split), augmentation against the original set at equal optimizer steps.

    Args:
        baselines: the benchmark manifests (``name``, ``test``).
        runs: every training run (manifests), ablation runs included.
        chosen_lora: the LoRA grid's best run (its name).
        ablation: the ablation runs' names -> their training set's label.
        teacher: the distillation's teacher choice (:class:`ftflow.study.design.TeacherChoice` as a dict).
        evidence: the test-sentence scores of every model.
        lora_grid: picks the grid's runs (:func:`ftflow.study.design.lora_grid_runs`).
    """
    trained = [r for r in runs if not r.get("skipped") and r.get("test")]
    main = [r for r in trained if r["job"]["train_set"] == "main"]
    by_name = {r["name"]: r for r in trained}
    lines = []

    grid = sorted((r for r in lora_grid(trained, chosen_lora) if not r.get("skipped")),
                  key=lambda r: r["best_validation_ppl"])
    if chosen_lora in by_name:
        best = by_name[chosen_lora]
        line = (f"best LoRA combination ({len(grid)} tried on {best['base_model']['name']}, chosen on the selection "
                f"split): {best['settings_label']}, test PPL {_ppl(best):.4f}")
        if len(grid) > 1:
            nxt = next(r for r in grid if r["name"] != chosen_lora)
            comparison = evidence.compare(best["name"], nxt["name"])
            line += (f"; against the next best, {nxt['settings_label']} ({_ppl(nxt):.4f}): {_figure(comparison)}"
                     + ("" if comparison is None or not comparison.within_noise
                        else " (the grid's choice is not distinguishable from the next best)"))
        base = next((b for b in baselines if b["name"] == best["base_model"]["name"]), None)
        if base is not None:
            line += f"; against its base model: {_figure(evidence.compare(best['name'], base['name']))}"
        lines.append(line)

    pairs = []
    same_combination = ("r", "alpha", "dropout", "learning_rate", "epochs", "batch_size")
    for qlora in (r for r in main if r["method"] == "qlora"):
        lora = next((r for r in main if r["method"] == "lora" and r["base_model"]["name"] == qlora["base_model"]["name"]
                     and all(r["job"][k] == qlora["job"][k] for k in same_combination)), None)
        if lora is None:
            continue
        comparison = evidence.compare(lora["name"], qlora["name"])
        verdict = _said(comparison, "LoRA better", "QLoRA better", "no difference the test set can tell")
        pairs.append(f"{qlora['base_model']['name']}: {_ppl(lora):.4f} vs {_ppl(qlora):.4f}, {verdict} "
                     f"({_figure(comparison)})")
    if pairs:
        lines.append("LoRA vs QLoRA (same combination): " + "; ".join(pairs))

    prefix = [r for r in main if r["method"] == "prefix"]
    if prefix:
        best = min(prefix, key=lambda r: r["best_validation_ppl"])
        base = best["base_model"]["name"]
        comparison = evidence.compare(best["name"], base)
        verdict = _said(comparison, "helps", "hurts", "makes no difference the test set can tell")
        base_ppl = next((b["test"]["corpus_ppl"] for b in baselines if b["name"] == base), None)
        lines.append(f"prefix tuning ({len(prefix)} run(s), best on the selection split {best['settings_label']} on "
                     f"{base}): {verdict}, test PPL {_ppl(best):.4f}"
                     + (f" vs the base model's {base_ppl:.4f}" if base_ppl is not None else "")
                     + f" ({_figure(comparison)})")

    distilled = [r for r in main if r["method"] == "distill"]
    if distilled:
        best = min(distilled, key=lambda r: r["best_validation_ppl"])
        steps = _steps(best)
        reference = next((r for r in main if r["method"] == "full" and r["base_model"]["name"] ==
                          best["base_model"]["name"] and _steps(r) == steps), None)
        if reference is not None:
            comparison = evidence.compare(best["name"], reference["name"])
            verdict = _said(comparison, "distillation helped", "distillation hurt",
                            "distillation made no difference the test set can tell")
            line = (f"distillation vs full fine-tuning at equal steps ({steps}): {verdict}; best variant on the "
                    f"selection split {best['settings_label']}, test PPL {_ppl(best):.4f} vs {_ppl(reference):.4f} "
                    f"({_figure(comparison)})")
        else:
            line = (f"distillation: best variant {best['settings_label']}, test PPL {_ppl(best):.4f}; no full "
                    f"fine-tune of {best['base_model']['name']} at the same steps ({steps}) to compare with")
        if teacher and teacher.get("teacher_name"):
            line += (f"; teacher {teacher['teacher_name']} (selection PPL {teacher['teacher_ppl']:.4f}) vs the "
                     f"student's own best {teacher.get('student_best')} ({teacher['student_ppl']:.4f})"
                     if teacher.get("student_ppl") is not None else f"; teacher {teacher['teacher_name']}")
        lines.append(line)
    elif teacher and not teacher.get("distil"):
        lines.append(f"distillation: not run; {teacher['reason']}")

    full = [r for r in main if r["method"] == "full"]
    if full:
        parts = []
        for model in sorted({r["base_model"]["name"] for r in full}):
            mine = [r for r in full if r["base_model"]["name"] == model]
            run = min(mine, key=lambda r: r["best_validation_ppl"])
            if not evidence.has(model):
                continue
            comparison = evidence.compare(run["name"], model)
            verdict = _said(comparison, "helps", "hurts", "no difference the test set can tell")
            base_ppl = next(b["test"]["corpus_ppl"] for b in baselines if b["name"] == model)
            parts.append(f"{model} {verdict}, test PPL {_ppl(run):.4f} vs its base model's {base_ppl:.4f} "
                         f"({_figure(comparison)})")
        if parts:
            lines.append("full fine-tuning (best run per model on the selection split): " + "; ".join(parts))

    chosen = {name: label for name, label in ablation.items() if name in by_name}
    mix = next((n for n, label in chosen.items() if label.startswith("all methods")), None)
    same_steps = next((n for n, label in chosen.items() if label.startswith("original, same steps")), None)
    original = next((n for n, label in chosen.items() if label == "original"), None)
    if mix is not None and (same_steps or original):
        reference = same_steps or original
        comparison = evidence.compare(mix, reference)
        verdict = _said(comparison, "augmentation helped", "augmentation hurt",
                        "augmentation made no difference the test set can tell")
        what = "the original set trained for as many optimizer steps" if same_steps else \
            "the original set (equal epochs: the augmented set also got more steps)"
        line = (f"augmentation (configured mix) vs {what}: {verdict}, test PPL {_ppl(by_name[mix]):.4f} vs "
                f"{_ppl(by_name[reference]):.4f} ({_figure(comparison)})")
        if same_steps and original:
            line += (f"; at equal epochs vs the original set {_ppl(by_name[original]):.4f}: "
                     f"{_figure(evidence.compare(mix, original))}")
        lines.append(line)
    return lines


def evaluation_answer(evaluation: Mapping, config: str = "CONFIG") -> str:
    """The answer that opens a finished run's report (:func:`answer_text` of its recommendation and findings), with
    the commands naming ``config``; empty for an evaluation written before ftflow made one."""
    if evaluation.get("recommendation") is None:
        return ""
    return answer_text(evaluation["recommendation"], evaluation.get("findings") or [], config=config)
