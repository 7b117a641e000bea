"""Distillation against full fine-tuning at equal steps, on real sentences (SST-2).

    nice python bench/distill_effect.py [--out DIR] [--seeds N] [--k K] [--quick]

The study distilled granite-3.3-8b + LoRA into granite-3.3-2b and got a worse
perplexity than fine-tuning the student in full (top-10 7.756, top-100 7.057,
full FT 6.883). This bench asks whether distillation can beat full
fine-tuning when the teacher is worth learning from, with ftflow's own code,
on ``../shared/data/sst2`` (2000 train, 1752 test sentences):

1. One family is pretrained offline on the general review corpus
   (``../shared/data/reviews/corpus.txt``, another domain) by the zoo's own
   build (:func:`ftflow.models.zoo.build_zoo`, the task's text left out): a
   byte-level BPE tokenizer shared by a student and a larger teacher (the
   teacher gets more steps, as the zoo gives it). The zoo's check scores both
   on the validation split (10% of train, held out) and pretrains the teacher
   more rounds while it does not beat its student (``--teacher-extra-rounds``);
   the bench prints the check and stops if the teacher still loses.
2. The teacher is fine-tuned in full on the train split (best epoch on
   validation): the teacher the pipeline would pick (its best run, any method).
3. Its targets are stored once per variant, with the same ``--k`` ids per
   position (equal storage): ``topk`` (top-k with the tail bucket,
   :func:`ftflow.distill.losses.kd_loss`) and ``sampled`` (random-sampling
   distillation, Anshumann et al., ACL 2025: k draws from the teacher,
   :func:`ftflow.distill.losses.sampled_kd_loss`).
4. For each seed, the student is fine-tuned in full and distilled with each
   variant, all with the same epochs, batch size and learning rate, so the
   same optimizer steps on the same sentences; the best epoch on validation
   is kept and scored on test (corpus PPL, :func:`ftflow.perplexity.score_sentences`).

Printed per condition: steps, validation and test PPL (mean over seeds and
their standard deviation), and the test PPL over the full fine-tune's,
paired by seed (mean and standard deviation of the ratio; below 1 =
distillation better). The verdict line says whether the best variant beats
full fine-tuning by more than the seed spread (the full fine-tune's test sd
and the variant's, the larger of the two). Written to ``--out`` as
``distill_effect.csv`` / ``.md`` and ``run.json``.

Measured here (2026-12-03, 2-core AMD EPYC, CPU only, one torch thread, beside one other job for part of
the run):

    python bench/distill_effect.py

    zoo check, family bench: teacher validation PPL 133.3025 vs student 146.6691 before fine-tuning
    (teacher pretrained 800 steps; student 400): the teacher beats its student
    teacher full FT: validation PPL 52.610, test PPL 55.417
    condition             steps  val PPL  test PPL  test sd  test / full FT  ratio sd  best epoch
    full FT                 226   65.943    68.864    0.028          1.0000    0.0000       2/2/2
    distill topk k=12       226   64.488    67.397    0.122          0.9787    0.0015       2/2/2
    distill sampled k=12    226   63.960    66.728    0.071          0.9690    0.0007       2/2/2
    best variant distill sampled k=12: test PPL 66.728 vs full FT 68.864 (ratio 0.9690 ± 0.0007); gain +2.136
    > seed spread 0.071: distillation beats full fine-tuning beyond the seed noise

325 s in all (the teacher's 800 pretraining steps 169 s of it); ``--quick`` took 141 s beside the pipeline.
So with a teacher that beats the student before fine-tuning (133.3 vs 146.7) and is fine-tuned in full
(52.6), both variants beat the student's own full fine-tune at equal steps, by far more than the seed
spread: top-k with its tail bucket by 2.1%, random sampling by 3.1%, at the same 12 ids a position.
Random sampling beat top-k in every seed (66.798/66.655/66.732 vs 67.530/67.291/67.369), as the paper
found. The study's failure (its students worse than full fine-tuning) came with a LoRA teacher that was
worse than the fully fine-tuned student.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

from ftflow.config import ZooConfig, ZooFamily, ZooSize  # noqa: E402
from ftflow.data.splits import hold_out_validation, read_sentences  # noqa: E402
from ftflow.distill.losses import VARIANTS  # noqa: E402
from ftflow.distill.store import TeacherTopK  # noqa: E402
from ftflow.distill.teacher import compute_teacher_topk  # noqa: E402
from ftflow.distill.trainer import DistillationCollator, DistillationTrainer  # noqa: E402
from ftflow.models import zoo  # noqa: E402
from ftflow.perplexity import score_sentences  # noqa: E402
from ftflow.tokens import pad_token_id  # noqa: E402
from ftflow.train.trainer import TrainSettings, batching_for, encode_dataset, train_full  # noqa: E402

SHARED_DATA = REPO_ROOT.parent / "shared/data"
if not SHARED_DATA.is_dir():  # a worktree under /work/wt: the data sit beside the main checkout
    SHARED_DATA = REPO_ROOT.parents[1] / "shared/data"
DEFAULT_OUT = REPO_ROOT / "bench/out/distill_effect"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=SHARED_DATA / "sst2/train.txt")
    parser.add_argument("--test", type=Path, default=SHARED_DATA / "sst2/test.txt")
    parser.add_argument("--corpus", type=Path, default=SHARED_DATA / "reviews/corpus.txt")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    family = parser.add_argument_group("the family (pretrained here, offline)")
    family.add_argument("--architecture", choices=("llama", "granite", "qwen2"), default="llama")
    family.add_argument("--vocab-size", type=int, default=1024)
    family.add_argument("--corpus-sentences", type=int, default=20000)
    family.add_argument("--student", default="64,2,4,4,128",
                        help="hidden,layers,heads,kv_heads,intermediate of the student")
    family.add_argument("--teacher", default="128,4,4,4,256", help="the same for the teacher")
    family.add_argument("--student-pretrain-steps", type=int, default=400)
    family.add_argument("--teacher-pretrain-steps", type=int, default=800)
    family.add_argument("--teacher-extra-rounds", type=int, default=2,
                        help="more rounds of teacher pretraining while it does not beat its student (the zoo's)")
    family.add_argument("--pretrain-batch-size", type=int, default=32)
    family.add_argument("--pretrain-learning-rate", type=float, default=3e-3)
    fine = parser.add_argument_group("fine-tuning and distillation (the same for every condition)")
    fine.add_argument("--epochs", type=int, default=2)
    fine.add_argument("--learning-rate", type=float, default=1e-3)
    fine.add_argument("--batch-size", type=int, default=16)
    fine.add_argument("--max-length", type=int, default=64)
    fine.add_argument("--eval-batch-size", type=int, default=64)
    fine.add_argument("--k", type=int, default=12, help="teacher ids stored per position, for both variants")
    fine.add_argument("--temperature", type=float, default=1.0)
    fine.add_argument("--alpha", type=float, default=0.5)
    fine.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, tokenizer, pretraining, draws")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 300 train sentences, short pretraining, 1 epoch, 2 seeds")
    args = parser.parse_args(argv)
    if args.quick:
        args.student_pretrain_steps, args.teacher_pretrain_steps = 40, 80
        args.epochs, args.seeds, args.corpus_sentences = 1, 2, 2000
    problems = [f"--{n} {getattr(args, n)} is not a file" for n in ("train", "test", "corpus")
                if not getattr(args, n).is_file()]
    for role in ("student", "teacher"):
        try:
            setattr(args, role, ZooSize(**dict(zip(("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                     "intermediate_size"), map(int, getattr(args, role).split(","))))))
        except (ValueError, TypeError) as exc:
            problems.append(f"--{role}: give five integers hidden,layers,heads,kv_heads,intermediate ({exc})")
    if args.seeds < 1 or args.epochs < 1 or args.k < 1:
        problems.append("--seeds, --epochs and --k must be >= 1")
    if problems:
        parser.error("; ".join(problems))
    return args


def _settings(args, seed: int) -> TrainSettings:
    return TrainSettings(epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
                         max_length=args.max_length, seed=seed, device=args.device,
                         eval_batch_size=args.eval_batch_size, progress=False)


def build_family(args, corpus: list[str], validation, directory: Path) -> tuple[dict, dict]:
    """Student and teacher built as the zoo stage builds a family (:func:`ftflow.models.zoo.build_zoo`), with its check.

    The zoo scores both on the validation split and pretrains the teacher more rounds while it does not beat
    its student (``--teacher-extra-rounds``). Returns the checkpoints' paths and, per role, its parameters,
    pretraining steps and validation PPL before fine-tuning, plus the check (``"check"``).
    """
    sizes = {"student": args.student, "teacher": args.teacher}
    cfg = ZooConfig(families=[ZooFamily(name="bench", architecture=args.architecture, **sizes)],
                    vocab_size=args.vocab_size, corpus_sentences=len(corpus),
                    pretrain_steps=args.student_pretrain_steps, teacher_pretrain_steps=args.teacher_pretrain_steps,
                    teacher_extra_rounds=args.teacher_extra_rounds, batch_size=args.pretrain_batch_size,
                    learning_rate=args.pretrain_learning_rate, max_length=args.max_length, seed=args.seed,
                    task_text=False)
    started = time.perf_counter()
    built = zoo.build_zoo(cfg, corpus, directory, check=zoo.TeacherCheck(validation, "validation", args.max_length),
                          device=args.device, progress=False, log=lambda line: print(line, flush=True))
    (family,) = built["families"]
    check = family["teacher_check"]
    paths, info = {}, {"check": check, "seconds": time.perf_counter() - started}
    for member in family["members"]:
        paths[member["role"]] = Path(member["path"])
        info[member["role"]] = {"parameters": member["parameters"], "pretrain_steps": member["pretrain_steps"],
                                "validation_ppl": check[f"{member['role']}_ppl"]}
    return paths, info


def finetune(args, path: Path, train, validation, test, seed: int, work: Path, variant: str | None = None,
             store: TeacherTopK | None = None) -> dict:
    """Full fine-tune (``variant`` None) or distill ``path``; the best-on-validation epoch's scores."""
    from ftflow.models.loading import load_model, load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(str(path))
    extra = {}
    if variant is not None:
        batching = batching_for("auto", "distill")
        extra = dict(batching=batching, trainer_cls=DistillationTrainer,
                     collator=DistillationCollator(pad_token_id(tokenizer), store, packed=batching == "packed"),
                     trainer_kwargs={"alpha": args.alpha, "temperature": args.temperature,
                                     "vocab_size": store.vocab_size, "variant": variant})
    result = train_full(str(path), tokenizer, encode_dataset(tokenizer, train, args.max_length), validation,
                        settings=_settings(args, seed), work_dir=work / "trainer", model_dir=work / "best", **extra)
    model = load_model(str(work / "best"), "fp32", args.device)
    test_ppl = score_sentences(model, tokenizer, test, batch_size=args.eval_batch_size, max_length=args.max_length,
                               progress=False).corpus_ppl
    return {"validation_ppl": result["best_validation_ppl"], "test_ppl": test_ppl,
            "best_epoch": result["best_epoch"], "steps": result["history"][-1]["step"],
            "seconds": time.perf_counter() - started}


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per condition: means and spreads over seeds, and the test PPL over full FT's, paired by seed."""
    reference = runs["full FT"]
    rows = []
    for name, seeded in runs.items():
        test = [r["test_ppl"] for r in seeded]
        ratios = [r["test_ppl"] / ref["test_ppl"] for r, ref in zip(seeded, reference)]
        rows.append({"condition": name, "steps": seeded[0]["steps"],
                     "validation_ppl": statistics.fmean(r["validation_ppl"] for r in seeded),
                     "test_ppl": statistics.fmean(test), "test_sd": _sd(test),
                     "ratio": statistics.fmean(ratios), "ratio_sd": _sd(ratios),
                     "best_epochs": "/".join(str(r["best_epoch"]) for r in seeded),
                     "seconds": sum(r["seconds"] for r in seeded)})
    return rows


COLUMNS = {"condition": "condition", "steps": "steps", "validation_ppl": "val PPL", "test_ppl": "test PPL",
           "test_sd": "test sd", "ratio": "test / full FT", "ratio_sd": "ratio sd", "best_epochs": "best epoch",
           "seconds": "time"}


def text_table(rows: list[dict]) -> str:
    def cell(key, value):
        if isinstance(value, float):
            return f"{value:.0f}s" if key == "seconds" else f"{value:.4f}" if key.startswith("ratio") else f"{value:.3f}"
        return str(value)

    shown = [{k: cell(k, r[k]) for k in COLUMNS} for r in rows]
    widths = {k: max(len(COLUMNS[k]), *(len(r[k]) for r in shown)) for k in COLUMNS}
    line = lambda cells: "  ".join(cells[k].ljust(widths[k]) if k == "condition" else cells[k].rjust(widths[k])  # noqa: E731
                                    for k in COLUMNS)
    return "\n".join([line(COLUMNS), *(line(r) for r in shown)])


def verdict(rows: list[dict]) -> str:
    """Whether the best variant beats full FT by more than the seed spread."""
    full = rows[0]
    best = min(rows[1:], key=lambda r: r["test_ppl"])
    gain = full["test_ppl"] - best["test_ppl"]
    spread = max(full["test_sd"], best["test_sd"])
    beats = gain > spread
    return (f"best variant {best['condition']}: test PPL {best['test_ppl']:.3f} vs full FT {full['test_ppl']:.3f} "
            f"(ratio {best['ratio']:.4f} ± {best['ratio_sd']:.4f}); gain {gain:+.3f} "
            f"{'>' if beats else '<='} seed spread {spread:.3f}: distillation "
            f"{'beats' if beats else 'does NOT beat'} full fine-tuning beyond the seed noise")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")

    train_all = read_sentences(args.train).sentences
    test = read_sentences(args.test).sentences
    train, validation = hold_out_validation(train_all, args.validation_fraction, args.seed)
    if args.quick:
        train, test = train[:300], test[:200]
    print(f"data: {len(train)} train + {len(validation)} validation, {len(test)} test", flush=True)
    corpus = zoo.read_corpus_file(args.corpus, args.corpus_sentences)

    with tempfile.TemporaryDirectory(prefix="ftflow-distillbench-") as tmp:
        work = Path(tmp)
        paths, family = build_family(args, corpus, validation, work)
        if not family["check"]["beats"]:  # the zoo printed why, with both figures
            return 1
        teacher = finetune(args, paths["teacher"], train, validation, test, args.seed, work / "teacher-ft")
        print(f"teacher full FT: validation PPL {teacher['validation_ppl']:.3f}, test PPL {teacher['test_ppl']:.3f} "
              f"({teacher['seconds']:.0f}s)", flush=True)

        from ftflow.models.loading import load_model, load_tokenizer

        teacher_model = load_model(str(work / "teacher-ft/best"), "fp32", args.device)
        tokenizer = load_tokenizer(str(paths["teacher"]))
        stores = {}
        for variant in VARIANTS:
            stores[variant] = compute_teacher_topk(teacher_model, tokenizer, train, k=args.k,
                                                   max_length=args.max_length, batch_size=args.eval_batch_size,
                                                   progress=False, variant=variant, seed=args.seed)
        del teacher_model

        runs: dict[str, list[dict]] = {"full FT": []}
        runs.update({f"distill {v} k={args.k}": [] for v in VARIANTS})
        for seed in range(args.seed, args.seed + args.seeds):
            runs["full FT"].append(finetune(args, paths["student"], train, validation, test, seed,
                                            work / f"full-{seed}"))
            for variant in VARIANTS:
                runs[f"distill {variant} k={args.k}"].append(finetune(
                    args, paths["student"], train, validation, test, seed, work / f"{variant}-{seed}", variant,
                    stores[variant]))
            print(f"seed {seed}: " + ", ".join(f"{n} {r[-1]['test_ppl']:.3f}" for n, r in runs.items()), flush=True)

    rows = summarise(runs)
    header = (f"distill_effect: {args.architecture} student {family['student']['parameters']:,} / teacher "
              f"{family['teacher']['parameters']:,} parameters (validation PPL before fine-tuning "
              f"{family['student']['validation_ppl']:.3f} / {family['teacher']['validation_ppl']:.3f}; teacher "
              f"after full FT {teacher['validation_ppl']:.3f}, test {teacher['test_ppl']:.3f}); {args.epochs} "
              f"epochs, lr {args.learning_rate:g}, batch {args.batch_size}, k {args.k}, T {args.temperature:g}, "
              f"alpha {args.alpha:g}, {args.seeds} seeds; {time.perf_counter() - started:.0f}s in all")
    table, line = text_table(rows), verdict(rows)
    print(f"\n{header}\n{table}\n{line}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "distill_effect.csv", index=False)
    (out / "distill_effect.md").write_text(f"{header}\n\n```\n{table}\n```\n\n{line}\n", encoding="utf-8")
    (out / "run.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "family": family,
                                              "teacher": teacher, "runs": runs}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
