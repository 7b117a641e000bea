"""Perplexity effect of training-set augmentation, on real sentences (SST-2).

    python bench/augment_effect.py [--out DIR] [--seeds N] [--epochs E] [--hidden-size H --layers L]
                                   [--translator-url URL | --bt-forward-model-dir D --bt-backward-model-dir D]

The study (``../shared/seed/report.md``, section 3.4) enlarged its ~2k-sentence
training set by 1.5x with EDA, back-translation and random masking and found
that test perplexity got worse. This bench repeats that comparison with
ftflow's own code on ``../shared/data/sst2`` (2000 train, 1752 test sentences):

1. A small checkpoint is pretrained offline on the general review corpus
   (``../shared/data/reviews/corpus.txt``, another domain): a byte-level BPE
   tokenizer from :func:`ftflow.models.zoo.train_tokenizer`, a model from
   :func:`ftflow.models.zoo.model_config` pretrained with :func:`ftflow.models.zoo.pretrain`
   (not :func:`ftflow.models.zoo.build_zoo`, which always pretrains a teacher as well).
2. Validation is held out of train (:func:`ftflow.data.splits.hold_out_validation`,
   10%) before anything is augmented; validation and test are never augmented.
3. For every condition the remaining train set is augmented by
   :func:`ftflow.data.augment.augment_sentences` (factor 1.5 as in the study, seed
   fixed): ``none`` (the original set), ``all`` (every available method mixed
   with equal weights, as the study and the demo do) and each method alone:
   synonym, random_insert, random_swap, random_delete, random_mask, and
   back_translation when a LibreTranslate-compatible ``--translator-url`` or
   two local model directories are given (else listed as skipped, with the
   reason). WordNet comes from :mod:`ftflow.data.wordnet` (offline).
4. The same checkpoint is fine-tuned on each set with the same settings
   (:func:`ftflow.train.trainer.train_full`, or ``--train-method lora`` for
   :func:`ftflow.train.trainer.train_lora`); the epoch with the best validation
   perplexity is kept and scored on test with
   :func:`ftflow.perplexity.score_sentences` (corpus PPL).

Reported per condition: epochs and optimizer steps, train sentences (original
+ new), validation PPL of the kept epoch and its change against ``none``, test
PPL, and test PPL minus the ``none`` condition's (absolute and relative;
positive = augmentation made it worse). With ``--seeds N`` every condition is
fine-tuned with N seeds (the augmented set stays the same): means are shown,
differences are paired by seed, and ``test sd`` (the spread across seeds) tells
a difference from seed noise. A ``base`` row gives the checkpoint before
fine-tuning. Everything is seeded: the same command on the same machine prints
the same numbers. The table is printed and written to ``--out`` as
``augment_effect.csv`` and ``augment_effect.md``, with each augmented train set
(``augmented/<condition>.jsonl``, with provenance) and the Trainer's log.

How to read it: with the same number of epochs (the study's protocol, columns
``test Δ``) an augmented set also gets ``factor`` times the optimizer steps;
a small model that is still improving at its last epoch gains from the steps
whatever the sentences are. ``none-same-steps`` trains on the original set for
``round(epochs * factor)`` epochs, about as many steps, and ``test Δ% same
steps`` compares with it: that is the effect of the augmented sentences
themselves. Only the fine-tuning seed varies with ``--seeds``; the augmented
set is drawn once (``--seed``).

Measured here (2026-11-28, 2-core Intel Xeon @ 2.80GHz, CPU only, shared with
other jobs: load average 1.6-5 during the runs):

    python bench/augment_effect.py

    condition         epochs  steps  train sents  new  val PPL  val Δ%  test PPL  test Δ  test Δ%  test Δ% same steps  best epoch  time  note
    base                                               139.485           144.319                                                         before fine-tuning
    none                   2    226         1800    0   65.501            68.548                                                2   11s
    none-same-steps        3    339         1800    0   59.791  -8.72%    62.586  -5.962   -8.70%                               3   14s
    all                    2    338         2698  898   60.447  -7.72%    63.376  -5.172   -7.55%              +1.26%           2   16s  2 of 900 not made: 2 copies or duplicates
    synonym                2    338         2697  897   60.610  -7.47%    63.403  -5.145   -7.51%              +1.30%           2   15s  3 of 900 not made: 3 copies or duplicates
    random_insert          2    338         2698  898   60.459  -7.70%    63.302  -5.247   -7.65%              +1.14%           2   20s  2 of 900 not made: 2 copies or duplicates
    random_swap            2    338         2698  898   60.651  -7.41%    63.478  -5.070   -7.40%              +1.43%           2   28s  2 of 900 not made: 2 copies or duplicates
    random_delete          2    338         2698  898   60.524  -7.60%    63.501  -5.047   -7.36%              +1.46%           2   24s  2 of 900 not made: 2 copies or duplicates
    random_mask            2    338         2698  898   61.527  -6.07%    64.496  -4.052   -5.91%              +3.05%           2   19s  2 of 900 not made: 2 copies or duplicates
    back_translation                                                                                                                     skipped: needs --translator-url or --bt-*-model-dir

189 s in all (215-357 s in three earlier runs of the same command under heavier
load); all four printed identical numbers. With ``--seeds 3`` (663 s) the mean
test PPLs were within 0.13 of these, their standard deviation across seeds
0.015 (none) to 0.106 (random_mask), and ``test Δ% same steps`` +1.39% (all),
+1.25% (synonym), +1.26% (random_insert), +1.52% (random_swap), +1.59%
(random_delete), +3.28% (random_mask). So at equal epochs every method
lowered test perplexity (by 6-8%), but only because of the extra steps: at
equal steps every method raised it, by 1-3%, far beyond the seed noise,
random masking most. That is the study's direction (augmentation hurt), on a
much smaller model; back-translation was not measured here (no translator).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

from ftflow.config import AUGMENT_METHODS, AugmentConfig, BackTranslationConfig, ZooSize  # noqa: E402
from ftflow.data.augment import WORDNET_METHODS, augment_sentences  # noqa: E402
from ftflow.data.splits import hold_out_validation, read_sentences, write_split  # noqa: E402
from ftflow.models import zoo  # noqa: E402
from ftflow.perplexity import score_sentences  # noqa: E402
from ftflow.study.report import markdown_table  # noqa: E402
from ftflow.train.trainer import TrainSettings, encode_dataset, train_full, train_lora  # noqa: E402

SHARED_DATA = REPO_ROOT.parent / "shared/data"
DEFAULT_TRAIN = SHARED_DATA / "sst2/train.txt"
DEFAULT_TEST = SHARED_DATA / "sst2/test.txt"
DEFAULT_CORPUS = SHARED_DATA / "reviews/corpus.txt"
DEFAULT_OUT = REPO_ROOT / "bench/out/augment_effect"
METHODS_OFFLINE = tuple(m for m in AUGMENT_METHODS if m != "back_translation")


@dataclass(frozen=True)
class Condition:
    """One training run: ``methods`` is the augmentation mix (empty: the original set)."""

    name: str
    methods: dict[str, float]
    epochs: int
    skipped: str = ""


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--train", type=Path, default=DEFAULT_TRAIN, help="training sentences (.txt/.jsonl/.csv)")
    data.add_argument("--test", type=Path, default=DEFAULT_TEST, help="test sentences, only scored")
    data.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="general pretraining corpus (.txt)")
    data.add_argument("--validation-fraction", type=float, default=0.1, help="share of train held out")
    data.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the CSV, Markdown and sets are written")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--factor", type=float, default=1.5, help="augmented train size over the original")
    aug.add_argument("--methods", nargs="+", choices=AUGMENT_METHODS, default=list(AUGMENT_METHODS),
                     help="methods to run alone (all available ones are also mixed in the 'all' condition)")
    aug.add_argument("--translator-url", default=None,
                     help="LibreTranslate-compatible server for back-translation (en -> de -> en)")
    aug.add_argument("--translator-api-key-env", default=None,
                     help="name of the environment variable holding the server's API key")
    aug.add_argument("--bt-forward-model-dir", type=Path, default=None, help="local en -> de model directory")
    aug.add_argument("--bt-backward-model-dir", type=Path, default=None, help="local de -> en model directory")
    aug.add_argument("--translator-rps", type=float, default=BackTranslationConfig().requests_per_second,
                     help="rate limit on calls to --translator-url (requests per second, both directions)")
    aug.add_argument("--pivot-lang", default="de", help="back-translation pivot language")

    base = parser.add_argument_group("base checkpoint (pretrained here, offline)")
    base.add_argument("--architecture", choices=("llama", "granite", "qwen2"), default="llama")
    base.add_argument("--hidden-size", type=int, default=64)
    base.add_argument("--layers", type=int, default=2)
    base.add_argument("--heads", type=int, default=4)
    base.add_argument("--kv-heads", type=int, default=4)
    base.add_argument("--intermediate-size", type=int, default=0, help="MLP width (0: 2 x hidden size)")
    base.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary")
    base.add_argument("--corpus-sentences", type=int, default=20000, help="corpus lines read for pretraining")
    base.add_argument("--pretrain-steps", type=int, default=400)
    base.add_argument("--pretrain-batch-size", type=int, default=32)
    base.add_argument("--pretrain-learning-rate", type=float, default=3e-3)

    fine = parser.add_argument_group("fine-tuning (the same for every condition)")
    fine.add_argument("--train-method", dest="train_method", choices=("full", "lora"), default="full")
    fine.add_argument("--epochs", type=int, default=2, help="epochs; the best on validation is kept")
    fine.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (full 1e-3, lora 3e-3)")
    fine.add_argument("--batch-size", type=int, default=16)
    fine.add_argument("--max-length", type=int, default=64, help="tokens kept per sentence, start token included")
    fine.add_argument("--eval-batch-size", type=int, default=64)
    fine.add_argument("--lora-r", type=int, default=8)
    fine.add_argument("--lora-alpha", type=float, default=16)
    fine.add_argument("--lora-dropout", type=float, default=0.05)
    fine.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per condition (seed, seed+1, ...)")
    fine.add_argument("--no-same-steps", dest="same_steps", action="store_false",
                      help="skip the 'none-same-steps' run (original set for round(epochs x factor) epochs)")

    parser.add_argument("--seed", type=int, default=0, help="seed of the split, augmentation and pretraining")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    # One thread by default: the models are too small to gain from more, spare threads only wait on each
    # other when other processes keep the cores busy, and the figures then do not depend on the core count.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = 1e-3 if args.train_method == "full" else 3e-3
    if not args.intermediate_size:
        args.intermediate_size = 2 * args.hidden_size
    problems = []
    for name in ("train", "test", "corpus"):
        if not getattr(args, name).is_file():
            problems.append(f"--{name} {getattr(args, name)} is not a file")
    if (args.bt_forward_model_dir is None) != (args.bt_backward_model_dir is None):
        problems.append("give both --bt-forward-model-dir and --bt-backward-model-dir, or neither")
    if args.translator_url and args.bt_forward_model_dir:
        problems.append("give --translator-url or the local model directories, not both")
    if args.seeds < 1 or args.epochs < 1:
        problems.append("--seeds and --epochs must be >= 1")
    if args.factor <= 1.0:
        problems.append("--factor must be > 1 (1 adds nothing)")
    if problems:
        parser.error("; ".join(problems))
    return args


# ----------------------------------------------------------------------------- stages


def build_base(args: argparse.Namespace, directory: Path) -> tuple[Path, dict]:
    """Tokenizer and model pretrained on the general corpus, saved as an ordinary HF checkpoint."""
    corpus = zoo.read_corpus_file(args.corpus, args.corpus_sentences)
    tokenizer = zoo.train_tokenizer(corpus, args.vocab_size, seed=args.seed,
                                    with_bos=args.architecture != "qwen2")
    size = ZooSize(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                   num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size)
    config = zoo.model_config(args.architecture, size, tokenizer, zoo.DECLARED_CONTEXT)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
        losses = zoo.pretrain(model, tokenizer, corpus, steps=args.pretrain_steps, batch_size=args.pretrain_batch_size,
                              learning_rate=args.pretrain_learning_rate, max_length=args.max_length, seed=args.seed,
                              device=args.device)
    path = directory / "base"
    zoo.save_checkpoint(model, tokenizer, path)
    info = {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
            "corpus_sentences": len(corpus), "loss_first": losses[0],
            "loss_last10": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.perf_counter() - started}
    return path, info


def back_translation_settings(args: argparse.Namespace) -> BackTranslationConfig | None:
    """Back-translation from the command line, or None when no translator was given."""
    if args.translator_url:
        return BackTranslationConfig(service="libre", url=args.translator_url, api_key_env=args.translator_api_key_env,
                                     requests_per_second=args.translator_rps, pivot_lang=args.pivot_lang)
    if args.bt_forward_model_dir:
        return BackTranslationConfig(service="local", local_forward_model_dir=args.bt_forward_model_dir,
                                     local_backward_model_dir=args.bt_backward_model_dir, pivot_lang=args.pivot_lang)
    return None


def conditions(args: argparse.Namespace, back_translation: BackTranslationConfig | None) -> list[Condition]:
    """``none``, ``none-same-steps``, ``all`` (every available method, equal weights), then each method alone.

    With a fixed number of epochs an augmented set gets ``factor`` times the
    optimizer steps of the original one, and a small model that is still
    learning gains from the extra steps whatever the sentences are.
    ``none-same-steps`` trains on the original set for ``round(epochs *
    factor)`` epochs, about as many steps as the augmented runs, so the two
    effects can be told apart.
    """
    no_translator = "skipped: needs --translator-url or --bt-*-model-dir"
    available = list(METHODS_OFFLINE) + (["back_translation"] if back_translation else [])
    chosen = [Condition("none", {}, args.epochs)]
    if args.same_steps:
        chosen.append(Condition("none-same-steps", {}, max(1, round(args.epochs * args.factor))))
    chosen.append(Condition("all", {m: 1.0 for m in available}, args.epochs))
    for method in args.methods:
        if method == "back_translation" and back_translation is None:
            chosen.append(Condition(method, {method: 1.0}, args.epochs, skipped=no_translator))
        else:
            chosen.append(Condition(method, {method: 1.0}, args.epochs))
    return chosen


def augment(train: tuple[str, ...], condition: Condition, args: argparse.Namespace, wordnet,
            back_translation: BackTranslationConfig | None, back_translator) -> tuple[list[str], list[dict], dict]:
    """The training set of one condition: the original sentences, then the new ones, with provenance."""
    provenance = [{"source_id": i, "method": "original", "params": {}} for i in range(len(train))]
    if not condition.methods:
        return list(train), provenance, {"made": 0}
    extra = {"back_translation": back_translation} if back_translation is not None else {}
    config = AugmentConfig(factor=args.factor, methods=condition.methods, seed=args.seed, **extra)
    new, stats = augment_sentences(train, config, wordnet=wordnet, back_translator=back_translator)
    provenance += [{"source_id": a.source_id, "method": a.method, "params": a.params} for a in new]
    return list(train) + [a.text for a in new], provenance, stats


def finetune_and_score(base: Path, train: list[str], validation: tuple[str, ...], test: tuple[str, ...],
                       args: argparse.Namespace, epochs: int, seed: int, work: Path) -> dict:
    """Fine-tune ``base`` on ``train``; the best-on-validation epoch's test PPL."""
    from ftflow.models.loading import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(str(base))
    settings = TrainSettings(epochs=epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
                             max_length=args.max_length, seed=seed, device=args.device,
                             eval_batch_size=args.eval_batch_size, progress=False)
    saved = work / "best"
    if args.train_method == "full":
        result = train_full(str(base), tokenizer, encode_dataset(tokenizer, train, args.max_length), validation,
                            settings=settings, work_dir=work / "trainer", model_dir=saved)
        model = load_model(str(saved), "fp32", args.device)
    else:
        result = train_lora(str(base), tokenizer, train, validation, r=args.lora_r, alpha=args.lora_alpha,
                            dropout=args.lora_dropout, target_modules="all-linear", settings=settings,
                            work_dir=work / "trainer", adapter_dir=saved)
        model = load_model(str(base), "fp32", args.device, adapter=str(saved))
    test_result = score_sentences(model, tokenizer, test, batch_size=args.eval_batch_size,
                                  max_length=args.max_length, progress=False)
    return {"validation_ppl": result["best_validation_ppl"], "test_ppl": test_result.corpus_ppl,
            "best_epoch": result["best_epoch"], "steps": result["history"][-1]["step"],
            "history": result["history"], "baseline_validation_ppl": result["baseline_validation"]["corpus_ppl"],
            "seconds": time.perf_counter() - started}


def run_condition(condition: Condition, train: tuple[str, ...], validation: tuple[str, ...], test: tuple[str, ...],
                  base: Path, args: argparse.Namespace, out: Path, work: Path, wordnet,
                  back_translation: BackTranslationConfig | None, back_translator) -> dict:
    """Augment (or not), fine-tune with every seed, score; the condition's record for the table."""
    from ftflow.data.translate import TranslationServiceDown

    record = {"condition": condition.name, "methods": "+".join(condition.methods) or "-",
              "epochs": None if condition.skipped else condition.epochs, "train_sentences": None,
              "new_sentences": None, "note": condition.skipped}
    if condition.skipped:
        print(f"{condition.name}: {condition.skipped}")
        return record
    started = time.perf_counter()
    try:
        sentences, provenance, stats = augment(train, condition, args, wordnet, back_translation, back_translator)
    except TranslationServiceDown as exc:  # recorded in the table (no numbers), the other conditions go on
        record["note"] = f"augmentation failed: {exc}"[:200]
        print(f"{condition.name}: {record['note']}")
        return record
    if condition.methods or condition.name == "none":  # none-same-steps trains on none's set
        write_split(out / "augmented" / f"{condition.name}.jsonl", sentences, provenance)
    record.update(train_sentences=len(sentences), new_sentences=len(sentences) - len(train),
                  augment_stats=stats, runs=[])
    if condition.methods:
        made = {m: v["made"] for m, v in stats["per_method"].items()}
        print(f"{condition.name}: {len(sentences) - len(train)} new sentences {made} in "
              f"{time.perf_counter() - started:.0f}s", flush=True)
        if stats["made"] < stats["wanted"]:  # fewer than planned: say why
            failed = sum(stats["translation_failed"].values())
            record["note"] = (f"{stats['wanted'] - stats['made']} of {stats['wanted']} not made: "
                              f"{stats['gave_up']} copies or duplicates"
                              + (f", {failed} translations failed" if failed else ""))
    for seed in range(args.seed, args.seed + args.seeds):
        log_path = out / "logs" / f"{condition.name}-seed{seed}.log"
        # The Trainer prints its loss dicts to stdout when tqdm is off: they go to the log.
        with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            run = finetune_and_score(base, sentences, validation, test, args, condition.epochs, seed,
                                     work / f"{condition.name}-seed{seed}")
        record["runs"].append(run)
        print(f"{condition.name} (seed {seed}): {len(sentences)} train sentences, {condition.epochs} epochs "
              f"({run['steps']} steps), validation PPL {run['validation_ppl']:.3f} (best epoch {run['best_epoch']}), "
              f"test PPL {run['test_ppl']:.3f}; {run['seconds']:.0f}s", flush=True)
    record["seconds"] = time.perf_counter() - started
    return record


# ----------------------------------------------------------------------------- table


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _paired(runs: list[dict], reference: dict | None, key: str, relative: bool) -> float | None:
    """Mean over seeds of ``runs[key]`` minus (or over) the reference's run with the same seed."""
    if reference is None or not reference.get("runs"):
        return None
    pairs = list(zip(runs, reference["runs"]))
    if relative:
        return 100 * _mean([x[key] / y[key] - 1 for x, y in pairs])
    return _mean([x[key] - y[key] for x, y in pairs])


def summarise(results: list[dict], base_row: dict, n_seeds: int) -> list[dict]:
    """One row per condition: means over seeds, differences to the references (paired by seed, then averaged)."""
    none = next((r for r in results if r["condition"] == "none"), None)
    same_steps = next((r for r in results if r["condition"] == "none-same-steps"), None)
    rows = [base_row]
    for r in results:
        row = {key: r[key] for key in ("condition", "methods", "epochs", "train_sentences", "new_sentences", "note")}
        runs = r.get("runs", [])
        if runs:
            row["steps"] = runs[0]["steps"]
            row["validation_ppl"] = _mean([x["validation_ppl"] for x in runs])
            row["test_ppl"] = _mean([x["test_ppl"] for x in runs])
            row["best_epochs"] = "/".join(str(x["best_epoch"]) for x in runs)
            if n_seeds > 1:
                row["test_ppl_sd"] = statistics.stdev([x["test_ppl"] for x in runs])
            if r is not none:
                row["validation_delta_pct"] = _paired(runs, none, "validation_ppl", relative=True)
                row["test_delta"] = _paired(runs, none, "test_ppl", relative=False)
                row["test_delta_pct"] = _paired(runs, none, "test_ppl", relative=True)
            if r["condition"] not in ("none", "none-same-steps"):
                row["test_delta_same_steps_pct"] = _paired(runs, same_steps, "test_ppl", relative=True)
            row["seconds"] = r["seconds"]
        rows.append(row)
    return rows


COLUMNS = {
    "condition": "condition",
    "epochs": "epochs",
    "steps": "steps",
    "train_sentences": "train sents",
    "new_sentences": "new",
    "validation_ppl": "val PPL",
    "validation_delta_pct": "val Δ%",
    "test_ppl": "test PPL",
    "test_ppl_sd": "test sd",
    "test_delta": "test Δ",
    "test_delta_pct": "test Δ%",
    "test_delta_same_steps_pct": "test Δ% same steps",
    "best_epochs": "best epoch",
    "seconds": "time",
    "note": "note",
}


def _display(rows: list[dict]) -> list[dict]:
    """The rows as strings: PPLs to 3 decimals, differences signed."""
    shown = []
    for row in rows:
        cells = {}
        for key in COLUMNS:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells[key] = ""
            elif key in ("test_delta",):
                cells[key] = f"{value:+.3f}"
            elif key.endswith("_pct"):
                cells[key] = f"{value:+.2f}%"
            elif key == "seconds":
                cells[key] = f"{value:.0f}s"
            elif isinstance(value, float):
                cells[key] = f"{value:.3f}"
            else:
                cells[key] = str(value)
        shown.append(cells)
    return shown


def text_table(rows: list[dict]) -> str:
    """A fixed-width table for the terminal (only columns with a value somewhere)."""
    shown = _display(rows)
    keep = [k for k in COLUMNS if any(r[k] for r in shown)]
    widths = {k: max(len(COLUMNS[k]), *(len(r[k]) for r in shown)) for k in keep}
    left = ("condition", "note")
    line = lambda cells: "  ".join(cells[k].ljust(widths[k]) if k in left else cells[k].rjust(widths[k])  # noqa: E731
                                    for k in keep).rstrip()
    return "\n".join([line(COLUMNS), *(line(r) for r in shown)])


def markdown(rows: list[dict]) -> str:
    import pandas as pd

    shown = _display(rows)
    keep = {k: v for k, v in COLUMNS.items() if any(r[k] for r in shown)}
    return markdown_table(pd.DataFrame(shown), keep)


LEGEND = ("val/test Δ: relative to 'none' (same epochs, the study's protocol); same steps: relative to "
          "'none-same-steps' (original set, about as many optimizer steps); positive = augmentation made it "
          "worse; paired by seed, then averaged")


def write_outputs(out: Path, rows: list[dict], header: str) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    order = ["condition", "methods", *(k for k in COLUMNS if k not in ("condition", "note")), "note"]
    frame = pd.DataFrame(rows)
    for key in ("epochs", "steps", "train_sentences", "new_sentences"):  # integers, blank where absent
        if key in frame.columns:
            frame[key] = frame[key].astype("Int64")
    frame[[k for k in order if k in frame.columns]].to_csv(out / "augment_effect.csv", index=False)
    (out / "augment_effect.md").write_text(f"{header}\n\n{markdown(rows)}\n\n{LEGEND}\n", encoding="utf-8")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")  # library deprecation chatter, once per run otherwise

    out = args.out.resolve()
    (out / "augmented").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)

    train_all = read_sentences(args.train).sentences
    test = read_sentences(args.test).sentences
    train, validation = hold_out_validation(train_all, args.validation_fraction, args.seed)
    print(f"data: {args.train} -> {len(train)} train + {len(validation)} validation; {args.test}: {len(test)} test")

    back_translation = back_translation_settings(args)
    chosen = conditions(args, back_translation)
    used = {m for c in chosen if not c.skipped for m in c.methods}
    wordnet = back_translator = cache = None
    if used & WORDNET_METHODS:
        from ftflow.data.wordnet import load_wordnet

        wordnet = load_wordnet()
    if "back_translation" in used:
        from ftflow.data.translate import build_back_translator

        # Cached beside the results: a rerun never asks the translator twice for one sentence.
        back_translator, cache = build_back_translator(back_translation, out / "translation-cache")

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ftflow-augbench-") as tmp:
        work = Path(tmp)
        base, info = build_base(args, work)
        print(f"base: {args.architecture} hidden {args.hidden_size} x {args.layers} layers, "
              f"{info['parameters']:,} parameters, vocab {info['vocab']}; pretrained {args.pretrain_steps} steps on "
              f"{info['corpus_sentences']} corpus sentences (loss {info['loss_first']:.3f} -> "
              f"{info['loss_last10']:.3f}) in {info['seconds']:.0f}s")
        from ftflow.models.loading import load_model, load_tokenizer

        base_test = score_sentences(load_model(str(base), "fp32", args.device), load_tokenizer(str(base)), test,
                                    batch_size=args.eval_batch_size, max_length=args.max_length, progress=False)
        base_row = {"condition": "base", "note": "before fine-tuning",
                    "test_ppl": base_test.corpus_ppl}

        try:
            for condition in chosen:
                results.append(run_condition(condition, train, validation, test, base, args, out, work,
                                             wordnet, back_translation, back_translator))
        finally:
            if cache is not None:
                cache.close()
        ran = [r for r in results if r.get("runs")]
        if ran:
            base_row["validation_ppl"] = ran[0]["runs"][0]["baseline_validation_ppl"]

    rows = summarise(results, base_row, args.seeds)
    total = time.perf_counter() - started
    header = (f"augment_effect: {args.architecture} {info['parameters']:,} params, {args.train_method} fine-tuning, "
              f"lr {args.learning_rate:g}, batch {args.batch_size}, max_length "
              f"{args.max_length}, factor {args.factor:g}, {args.seeds} seed(s) from {args.seed}; "
              f"{torch.get_num_threads()} torch threads on {args.device}; {total:.0f}s in all")
    print()
    print(header)
    print(text_table(rows))
    print(LEGEND)
    write_outputs(out, rows, header)
    (out / "run.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "base": info,
                                              "results": results}, indent=2, default=str), encoding="utf-8")
    print(f"wrote {out / 'augment_effect.csv'}, {out / 'augment_effect.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
