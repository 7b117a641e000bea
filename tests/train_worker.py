"""A training run in its own process, for the kill-and-resume test: ``python -m tests.train_worker DIR [SLEEP]``.

Trains a tiny Llama in full for 4 epochs of 6 steps, a checkpoint at every epoch end (full-weight runs
checkpoint at epoch ends only), ``work_dir`` = DIR/work. SLEEP seconds are spent at every log event so a test
has time to kill the process between checkpoints. Prints the result as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from ftflow.config import FinetuneConfig
from ftflow.train.runner import full_job, run_job
from tests.tiny import SENTENCES, tiny_model, tiny_tokenizer


def main(directory: Path, sleep: float) -> dict:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    base = directory / "base"
    if not base.exists():
        tiny_model("llama", hidden_size=32).save_pretrained(base)
        tiny_tokenizer().save_pretrained(base)
    model = {"name": "tiny", "path": str(base), "family": "tiny", "precision": "fp32", "trust_remote_code": False}
    job = full_job(FinetuneConfig(learning_rate=1e-3, epochs=4, batch_size=4), model)
    out = directory / f"out-{time.time_ns()}"
    out.mkdir()
    return run_job(job, train_sentences=SENTENCES * 2, validation_sentences=SENTENCES[:5],
                   test_sentences=SENTENCES[5:], seed=0, max_length=32, device="cpu", eval_batch_size=4,
                   work_dir=directory / "work", out_dir=out, checkpoint_steps=4, progress=False,
                   on_progress=lambda event: time.sleep(sleep))


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
    print(json.dumps({k: result[k] for k in ("history", "best_epoch", "best_validation_ppl", "resumed_from")}))
