"""Training speed without pads: packed batches against today's padded ones, side by side.

    python bench/train_speed.py [--quick] [--batch-size 16] [--epochs 2] [--limit N] [--threads 1] [--device cpu]

A ~25M-parameter Llama (hidden 512 x 9 layers, MLP 1024, a 1024-token BPE
vocabulary trained on ``../shared/data/reviews``, briefly pretrained there:
:func:`bench.augment_effect.build_base`) is fine-tuned in full on
``../shared/data/sst2/train.txt`` (10% held out for validation) twice with the
same seed and settings: once on random right-padded batches
(``training.packing: off``, the behaviour before packing) and once packed
(``training.packing: auto``: each batch's sentences in one row without pads,
positions restarting at every sentence, no attention across sentences; see
:func:`ftflow.training.batching_for`). Both go through
:func:`ftflow.training.train_full`, the Trainer ftflow runs.

Printed for each: real (non-pad) training tokens per second (the Trainer's
run time less the validations between epochs, ``train_seconds``), the tokens
the model computed (pads included), the pad share, achieved FLOP/s (6 x
parameters x real tokens/s: forward and backward) and the validation PPL of
the last epoch; then the speed ratio and the PPL agreement. Targets: packed
>= 1.6x the padded real tokens/s at batch 16, validation PPLs within 1%.
Prints PASS or FAIL and exits 1 on FAIL.

Measured here (2026-12-03, 2-core CPU shared with other jobs, load average
3-5, ``--threads 1``, 24.7M parameters, max_length 128, batch 16, 480
sentences, 1 epoch, 30 steps; about 5 minutes each):

    python bench/train_speed.py --quick

    batching  steps  real tok  computed   pads  train s real tok/s  GFLOP/s   val PPL
    padded       30     18981     37264  49.1%     98.8      192.1     28.4  257.6546
    packed       30     18981     21070   9.9%     63.0      301.4     44.6  257.6546

    packed / padded real tokens/s: 1.57x (target >= 1.6x at batch 16); validation PPL differs by 2.31e-08
    relative (target <= 1%)

The same command earlier, under a load spike during the padded run, printed
2.97x (padded 108.6 real tokens/s, packed 322.3); the token counts and PPLs
were identical. The ratio of computed tokens, 37264 / 21070 = 1.77x, is
what packing saves when the per-token cost is the same; on this loaded CPU
the measured ratio was 1.57x (not the target's 1.6x) in the quieter run. With
``--max-length 64`` (sentences truncated, 39.8% pads) it was 1.31x. The
pads left (9.9%) are the ends of rows shorter than the longest one.

Why the ratio is what it is: on sst2 at batch 16 about half of a padded
batch's tokens are pads, and the linear layers (most of the arithmetic at
these lengths) cost per token, so dropping them at most doubles the speed.
Attention over a packed row is one [N, N] product with a block-diagonal mask
on SDPA (flash attention's varlen kernel on CUDA with flash_attention_2),
which costs about as much as the padded batch's B x [L, L] ones here.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

from bench.augment_effect import DEFAULT_CORPUS, DEFAULT_TRAIN, build_base  # noqa: E402
from ftflow.data import hold_out_validation, read_sentences  # noqa: E402
from ftflow.models import load_tokenizer  # noqa: E402
from ftflow.tokens import pad_token_id  # noqa: E402
from ftflow.training import PackCollator, PadCollator, TrainSettings, encode_dataset, train_full  # noqa: E402

SPEEDUP_TARGET = 1.6
PPL_RTOL = 0.01


class Counting:
    """Wraps a collator; counts the real and the computed (pads included) tokens of every batch it makes."""

    def __init__(self, collator):
        self.collator = collator
        self.batching = collator.batching
        self.real_tokens = 0
        self.computed_tokens = 0

    def __call__(self, rows):
        batch = self.collator(rows)
        self.real_tokens += sum(len(row["input_ids"]) for row in rows)
        self.computed_tokens += batch["input_ids"].numel()
        return batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=DEFAULT_TRAIN, help="training sentences")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="pretraining corpus (tokenizer, base)")
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes on 2 CPU cores: 480 train sentences, 1 epoch, 10 pretraining steps")
    parser.add_argument("--limit", type=int, default=0, help="train sentences used (0: all; --quick: 480)")
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (0: 2; --quick: 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128,
                        help="tokens kept per sentence, start token included (the demo's 128)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--corpus-sentences", type=int, default=20000)
    parser.add_argument("--pretrain-steps", type=int, default=0, help="0: 100; --quick: 10")
    parser.add_argument("--pretrain-batch-size", type=int, default=16)
    parser.add_argument("--pretrain-learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    # One thread by default (as bench/augment_effect.py): on a shared machine spare threads wait on each other.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    args.architecture = "llama"
    args.limit = args.limit or (480 if args.quick else 0)
    args.epochs = args.epochs or (1 if args.quick else 2)
    args.pretrain_steps = args.pretrain_steps or (10 if args.quick else 100)
    problems = [f"--{name} {getattr(args, name)} is not a file" for name in ("train", "corpus")
                if not getattr(args, name).is_file()]
    if args.batch_size < 2:
        problems.append("--batch-size must be >= 2 (one sentence per batch has no pads to drop)")
    if problems:
        parser.error("; ".join(problems))
    return args


def run(base: Path, train: list[str], validation: list[str], args: argparse.Namespace, packing: str,
        work: Path) -> dict:
    """Fine-tune ``base`` with one batching; its speed, token counts and validation PPL."""
    tokenizer = load_tokenizer(str(base))
    settings = TrainSettings(epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
                             max_length=args.max_length, seed=args.seed, device=args.device, eval_batch_size=64,
                             progress=False, checkpoint_steps=10**6, packing=packing)
    pad_id = pad_token_id(tokenizer)
    collator = Counting(PackCollator(pad_id) if packing == "auto" else PadCollator(pad_id))
    result = train_full(str(base), tokenizer, encode_dataset(tokenizer, train, args.max_length), validation,
                        settings=settings, work_dir=work / packing / "trainer", model_dir=work / packing / "model",
                        collator=collator, batching=collator.batching)
    seconds = result["train_seconds"]
    return {"batching": result["batching"], "seconds": seconds, "real_tokens": collator.real_tokens,
            "computed_tokens": collator.computed_tokens,
            "pad_share": 1 - collator.real_tokens / collator.computed_tokens,
            "tokens_per_second": collator.real_tokens / seconds,
            "validation_ppl": result["history"][-1]["validation"]["corpus_ppl"],
            "steps": result["history"][-1]["step"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    sentences = read_sentences(args.train).sentences
    train, validation = hold_out_validation(sentences, 0.1, args.seed)
    train = list(train[:args.limit] if args.limit else train)
    validation = list(validation[:200] if args.quick else validation)
    print(f"data: {args.train} -> {len(train)} train, {len(validation)} validation sentences; batch "
          f"{args.batch_size}, {args.epochs} epoch(s), {torch.get_num_threads()} thread(s), {args.device}")
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        base, info = build_base(args, work)
        parameters = info["parameters"]
        print(f"base: {parameters / 1e6:.1f}M-parameter Llama, vocabulary {info['vocab']}, pretrained "
              f"{args.pretrain_steps} steps in {time.perf_counter() - started:.0f}s")
        results = {packing: run(base, train, validation, args, packing, work) for packing in ("off", "auto")}
    print(f"\n{'batching':<9} {'steps':>5} {'real tok':>9} {'computed':>9} {'pads':>6} {'train s':>8} "
          f"{'real tok/s':>10} {'GFLOP/s':>8} {'val PPL':>9}")
    for r in results.values():
        flops = 6 * parameters * r["tokens_per_second"]
        print(f"{r['batching']:<9} {r['steps']:>5} {r['real_tokens']:>9} {r['computed_tokens']:>9} "
              f"{r['pad_share']:>6.1%} {r['seconds']:>8.1f} {r['tokens_per_second']:>10.1f} {flops / 1e9:>8.1f} "
              f"{r['validation_ppl']:>9.4f}")
    padded, packed = results["off"], results["auto"]
    speedup = packed["tokens_per_second"] / padded["tokens_per_second"]
    ppl_gap = abs(packed["validation_ppl"] / padded["validation_ppl"] - 1)
    print(f"\npacked / padded real tokens/s: {speedup:.2f}x (target >= {SPEEDUP_TARGET}x at batch 16); "
          f"validation PPL differs by {ppl_gap:.2e} relative (target <= {PPL_RTOL:.0%})")
    ok = speedup >= SPEEDUP_TARGET and ppl_gap <= PPL_RTOL and math.isfinite(packed["validation_ppl"])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
