"""Training speed without pads: packed batches against today's padded ones, side by side.

    python bench/train_speed.py [--quick] [--batch-size 16] [--epochs 2] [--limit N] [--threads 1] [--device cpu]
                                [--longest-rows]

A ~25M-parameter Llama (hidden 512 x 9 layers, MLP 1024, a 1024-token BPE
vocabulary trained on ``../shared/data/reviews``, briefly pretrained there:
:func:`bench.augment_effect.build_base`) is fine-tuned in full on
``../shared/data/sst2/train.txt`` (10% held out for validation) with the same
seed and settings on random right-padded batches (``training.packing: off``,
the behaviour before packing) and packed (``training.packing: auto``: each
batch's sentences in rows without pads between them, positions restarting
at every sentence, no attention across sentences, rows of the budget
:func:`ftflow.tokens.packed_row_tokens` chooses; see
:func:`ftflow.train.trainer.batching_for`). ``--longest-rows`` adds a third run
packed into rows of the batch's longest sentence (the layout before that
budget). All go through :func:`ftflow.train.trainer.train_full`, the Trainer
ftflow runs.

The runs go side by side in processes of their own and take turns step by
step (:func:`turn_taking_trainer`), so what else loads the machine hits each
alike. Printed for each: real (non-pad) training tokens per second over the
training steps (forward, backward, clipping and optimizer update, plus the
collator's time; not the validations, nor the other runs' turns, nor the
Trainer's checkpoint at the end), the tokens the model computed (pads
included), the pad share, achieved FLOP/s (6 x parameters x real tokens/s:
forward and backward) and the validation PPL of the last epoch; then the
speed ratio and the PPL agreement. Targets: packed >= 1.6x the padded real
tokens/s at batch 16, validation PPLs within 1%. Prints PASS or FAIL and
exits 1 on FAIL.

Measured here (2026-12-03, 2-core CPU shared with other jobs, load average
6, ``--threads 1``, 24.7M parameters, max_length 128, batch 16, 480
sentences, 1 epoch, 30 steps; about 12 minutes under that load):

    python bench/train_speed.py --quick --longest-rows

    batching       steps  real tok  computed   pads  train s collate s real tok/s  GFLOP/s   val PPL
    padded            30     18981     37264  49.1%    179.7      0.07      105.6     15.6  257.6546
    packed            30     18981     19491   2.6%     93.5      0.21      203.1     30.0  257.6546
    packed-longest    30     18981     21070   9.9%    104.7      0.06      181.3     26.8  257.6546

    packed into rows of the longest sentence / padded real tokens/s: 1.72x (computed tokens 1.77x fewer)
    packed / padded real tokens/s: 1.92x (target >= 1.6x at batch 16; computed tokens 1.91x fewer); validation
    PPL differs by 6.00e-09 relative (target <= 1%)

The same command again, under a heavier load (load average 10-11; 232.6 s
padded, 131.8 s packed, 135.1 s packed-longest, the same token counts and
PPLs): 1.77x packed, 1.72x packed into rows of the longest sentence. And
``--quick`` alone (padded and packed, load average 7-10): 202.4 s padded,
111.0 s packed, 1.82x, the same token counts and PPLs.

Why the ratio is what it is: the time goes where the computed tokens are.
In a torch.profiler trace of these steps (padded and packed alike) matrix
products (the linear layers, forward and backward) take 78-80% of the time,
attention (SDPA's CPU flash kernel, forward and backward, with the packed
block-diagonal or the padding mask) 6%, the AdamW update 3-5%, element-wise
ops the rest; building the masks does not show. Every computed token costs
the same in both (264.8 and 263.5 computed tokens/s over 11 alternating
steps of forward and backward), so the speedup is the ratio of computed
tokens, less the fixed per-step costs (the optimizer update). About half of
a padded batch of sst2 at batch 16 is pads, so dropping them all would at
most double the speed; rows of the longest sentence left 9.9% pads at the
ends of short rows, the chosen budget (rows somewhat wider, attention still
no dearer than the padded batch's) leaves 2.6%.

Before the runs took turns and were timed by their steps, they went one
after the other, timed by the Trainer's run time (its setup and its
checkpoint at the end of training included: 283 MB, 1.0-1.6 s here); that
read 1.48x on an idle machine and 1.57x or 2.97x on a loaded one for the
layout that reads 1.72x in both runs above. Which part of that gap the load
changing between the runs made, and which the Trainer's own costs, was not
isolated.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere

from bench.augment_effect import DEFAULT_CORPUS, DEFAULT_TRAIN, build_base  # noqa: E402
from ftflow.data.splits import hold_out_validation, read_sentences  # noqa: E402
from ftflow.models.loading import load_tokenizer  # noqa: E402
from ftflow.tokens import pack_batch, pad_token_id  # noqa: E402
from ftflow.train.trainer import PackCollator, PadCollator, TrainSettings, encode_dataset, train_full  # noqa: E402

SPEEDUP_TARGET = 1.6
PPL_RTOL = 0.01


class Counting:
    """Wraps a collator; counts the real and computed (pads included) tokens of the batches it makes, and its time."""

    def __init__(self, collator):
        self.collator = collator
        self.batching = collator.batching
        self.real_tokens = 0
        self.computed_tokens = 0
        self.seconds = 0.0

    def __call__(self, rows):
        started = time.perf_counter()
        batch = self.collator(rows)
        self.seconds += time.perf_counter() - started
        self.real_tokens += sum(len(row["input_ids"]) for row in rows)
        self.computed_tokens += batch["input_ids"].numel()
        return batch


def turn_taking_trainer(ready, mine, following, failed):
    """A Trainer class whose optimizer steps take turns with the other runs', timed.

    The runs go step for step, round robin, in processes of their own: a run
    holds the turn from the start of a step through everything until its next
    step (logging, the next batch's collation, a validation or checkpoint at
    an epoch's end), then hands it to the following run (``following``) and
    waits for ``mine``. So only one of them computes at a time, and what else
    loads the machine hits all alike. ``step_seconds`` sums each step's
    forward, backward, gradient clipping and optimizer update
    (``on_step_begin`` to ``on_step_end``): the training itself, without the
    other runs' turns, the validations or the Trainer's checkpoint at the end.
    A run that fails sets ``failed`` (and breaks the ``ready`` barrier), so
    the others stop instead of waiting for their turn forever.
    """
    from transformers import Trainer, TrainerCallback

    def take_turn():
        while not mine.wait(timeout=5):
            if failed.is_set():
                raise RuntimeError("train_speed: another run failed (its error is reported first)")
        mine.clear()

    class Turns(TrainerCallback):
        step_seconds = 0.0
        steps = 0
        started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            ready.wait()  # all set up (their baselines scored) before the first step
            take_turn()

        def on_step_begin(self, args, state, control, **kwargs):
            if self.steps:
                following.set()
                take_turn()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds += time.perf_counter() - self.started
            self.steps += 1

        def on_train_end(self, args, state, control, **kwargs):
            following.set()

    turns = Turns()

    class TurnTakingTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(turns)

    return TurnTakingTrainer, turns


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
    parser.add_argument("--longest-rows", action="store_true",
                        help="a third run packed into rows of the batch's longest sentence (the layout before "
                             "ftflow.tokens.packed_row_tokens), for comparison")
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


class LongestRowsCollator(PackCollator):
    """Packed into rows of the batch's longest sentence: ftflow's layout before :func:`packed_row_tokens`."""

    def __call__(self, rows: list[dict]) -> dict:
        batch_ids = [list(row["input_ids"]) for row in rows]
        return pack_batch(batch_ids, self.pad_id, max(len(ids) for ids in batch_ids))


RUNS = {"padded": "off", "packed": "auto", "packed-longest": "auto"}
"""Each run's ``training.packing``."""


def run(base: Path, train: list[str], validation: list[str], args: argparse.Namespace, name: str,
        work: Path, turns: tuple) -> dict:
    """Fine-tune ``base`` with one batching (in a process of its own); its speed, token counts and validation PPL."""
    quiet(args)
    tokenizer = load_tokenizer(str(base))
    settings = TrainSettings(epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
                             max_length=args.max_length, seed=args.seed, device=args.device, eval_batch_size=64,
                             progress=False, checkpoint_steps=10**6, packing=RUNS[name])
    pad_id = pad_token_id(tokenizer)
    collator = Counting({"padded": PadCollator, "packed": PackCollator,
                         "packed-longest": LongestRowsCollator}[name](pad_id))
    trainer_cls, timer = turn_taking_trainer(*turns)
    try:
        result = train_full(str(base), tokenizer, encode_dataset(tokenizer, train, args.max_length), validation,
                            settings=settings, work_dir=work / name / "trainer", model_dir=work / name / "model",
                            collator=collator, batching=collator.batching, trainer_cls=trainer_cls)
    except BaseException:
        ready, _, _, failed = turns
        failed.set()
        ready.abort()
        raise
    seconds = timer.step_seconds + collator.seconds
    return {"name": name, "seconds": seconds, "collate_seconds": collator.seconds, "real_tokens": collator.real_tokens,
            "computed_tokens": collator.computed_tokens,
            "pad_share": 1 - collator.real_tokens / collator.computed_tokens,
            "tokens_per_second": collator.real_tokens / seconds,
            "validation_ppl": result["history"][-1]["validation"]["corpus_ppl"],
            "steps": result["history"][-1]["step"]}


def quiet(args: argparse.Namespace) -> None:
    """Thread count and quiet transformers, in every process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet(args)
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
        # The runs in processes of their own, their steps taking turns (turn_taking_trainer); padded goes first.
        names = ["padded", "packed"] + (["packed-longest"] if args.longest_rows else [])
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(len(names), mp_context=context) as pool:
            ready, failed, turns = manager.Barrier(len(names)), manager.Event(), [manager.Event() for _ in names]
            turns[0].set()
            futures = {name: pool.submit(run, base, train, validation, args, name, work,
                                         (ready, turns[i], turns[(i + 1) % len(names)], failed))
                       for i, name in enumerate(names)}
            errors = {name: future.exception() for name, future in futures.items()}
            # The failure itself first, not the others' stopping for it.
            first = next((e for e in errors.values() if e is not None
                          and not isinstance(e, threading.BrokenBarrierError) and "another run failed" not in str(e)),
                         next((e for e in errors.values() if e is not None), None))
            if first is not None:
                raise first
            results = {name: future.result() for name, future in futures.items()}
    print(f"\n{'batching':<14} {'steps':>5} {'real tok':>9} {'computed':>9} {'pads':>6} {'train s':>8} "
          f"{'collate s':>9} {'real tok/s':>10} {'GFLOP/s':>8} {'val PPL':>9}")
    for r in results.values():
        flops = 6 * parameters * r["tokens_per_second"]
        print(f"{r['name']:<14} {r['steps']:>5} {r['real_tokens']:>9} {r['computed_tokens']:>9} "
              f"{r['pad_share']:>6.1%} {r['seconds']:>8.1f} {r['collate_seconds']:>9.2f} "
              f"{r['tokens_per_second']:>10.1f} {flops / 1e9:>8.1f} {r['validation_ppl']:>9.4f}")
    if "packed-longest" in results:
        longest = results["packed-longest"]
        print(f"\npacked into rows of the longest sentence / padded real tokens/s: "
              f"{longest['tokens_per_second'] / results['padded']['tokens_per_second']:.2f}x "
              f"(computed tokens {results['padded']['computed_tokens'] / longest['computed_tokens']:.2f}x fewer)")
    padded, packed = results["padded"], results["packed"]
    speedup = packed["tokens_per_second"] / padded["tokens_per_second"]
    ppl_gap = abs(packed["validation_ppl"] / padded["validation_ppl"] - 1)
    print(f"packed / padded real tokens/s: {speedup:.2f}x (target >= {SPEEDUP_TARGET}x at batch 16; computed tokens "
          f"{padded['computed_tokens'] / packed['computed_tokens']:.2f}x fewer); "
          f"validation PPL differs by {ppl_gap:.2e} relative (target <= {PPL_RTOL:.0%})")
    ok = speedup >= SPEEDUP_TARGET and ppl_gap <= PPL_RTOL and math.isfinite(packed["validation_ppl"])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
