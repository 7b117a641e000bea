"""What a training run leaves in memory, at the real width of the study's 8B teacher.

    python bench/run_lifecycle.py [--layers 1] [--precision bf16]

A Granite model of granite-3.3-8b-base's shapes (hidden 4096, MLP 12800, 32
heads with 8 key/value heads, a 49,159-token vocabulary tied to the LM head:
:func:`ftflow.models.architecture.model_config_for`, offline), cut to ``--layers`` decoder
layers, random weights, saved in ``--precision`` to a temporary folder with
a word-level tokenizer. One LoRA job (r 16 on every linear layer, batch 4,
8 short sentences, one epoch) goes through :func:`ftflow.train.runner.run_job`,
the path every pipeline run takes: load, train, save the best epoch, reload
the trained model for the test split, score it.

In a forked child with Python's default garbage-collector settings (nothing
here collects), the resident set (``VmRSS``) is read before the run, when
training has returned (at the entry of the test split's reload,
:func:`ftflow.models.loading.load_trained`) and after ``run_job`` returns, and the
peak (``VmHWM``, reset through ``/proc/self/clear_refs`` before the run) is
read at the end. glibc serves every block over 64 KiB with ``mmap`` and
MKL's buffer cache is off (as ``bench/memory_accuracy.py`` does), so freed
tensors leave the resident set at once.

The trained model must be gone when the reload starts: PASS when the
resident set at that point is less than half the model's weights above the
baseline, and the peak less than 1.5 model weights above it (one model at a
time, plus training state and activations), else FAIL (exit 1).

Measured here (2-core CPU shared with other jobs; 1 layer: 801 MB of weights in bf16, 1602 MB in fp32;
bf16 about 8-10 minutes, fp32 about 2):

    code                                  alive at the reload   peak over run_job
    bf16, this version                         0 MB (0.00 x)     838 MB (1.05 x)
    bf16, before (validation.trainer cycle)  816 MB (1.02 x)    1632 MB (2.04 x)
    fp32, this version                         1 MB (0.00 x)    1640 MB (1.02 x)
    fp32, before                            1617 MB (1.01 x)    3239 MB (2.02 x)

Before, the trained model was still resident when the test split's reload began, and after ``run_job``
returned: for granite-3.3-8b in bf16, 16.4 GB old weights beside 16.4 GB new ones on a 20 GB card.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
try:  # large blocks through mmap, so the resident set follows live tensors (see bench/memory_accuracy.py)
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    _LIBC.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
except OSError:
    _LIBC = None

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MB = 10**6
SENTENCES = [
    "the cat sat on the mat", "a dog ran fast", "the film was very good", "the plot is dull and the acting is bad",
    "a big red bird", "the movie was fun", "a small blue cat sat", "the story is very good and the acting was fun",
]


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def build(directory: Path, layers: int, precision: str, **shape) -> tuple[dict, int]:
    """The cut model and its tokenizer in ``directory``, as run_job's model dict; and its weights' bytes."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ftflow.models.architecture import model_config_for
    from ftflow.models.loading import DTYPES

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = model_config_for("ibm-granite/granite-3.3-8b-base")
    config.num_hidden_layers = layers
    for key, value in shape.items():  # the warm-up's micro model
        setattr(config, key, value)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 2, 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[precision])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return {"name": "granite-8b-width", "path": str(directory), "family": "granite", "precision": precision,
            "trust_remote_code": False}, weights


def measure(directory: Path, layers: int, precision: str, out) -> None:
    """In the child: build, run one LoRA job, write the figures to ``out`` (a pipe)."""
    import json

    import ftflow.train.runner
    from ftflow.config import LoraConfig
    from ftflow.train.runner import lora_grid, run_job

    lora = LoraConfig(r=16, alpha=32, dropout=0.0, learning_rate=1e-4, epochs=1, batch_size=4)
    # The same run once on a micro model of the same architecture first: libraries imported, kernels and thread
    # pools set up, so the baseline holds them and what is measured is the run's own memory.
    micro, _ = build(directory / "micro", 1, precision, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64)
    (directory / "micro-out").mkdir()
    run_job(lora_grid(lora, micro)[0], train_sentences=SENTENCES, validation_sentences=SENTENCES[:4],
            test_sentences=SENTENCES[4:], seed=0, max_length=32, device="cpu", eval_batch_size=4,
            work_dir=directory / "micro-work", out_dir=directory / "micro-out", progress=False)
    model, weights = build(directory / "base", layers, precision)
    job = lora_grid(lora, model)[0]
    figures = {"weights": weights}
    load_trained = ftflow.models.loading.load_trained

    def at_reload(*args, **kwargs):
        figures["rss_at_reload"] = _status("VmRSS")
        return load_trained(*args, **kwargs)

    ftflow.models.loading.load_trained = at_reload
    (directory / "out").mkdir()
    figures["rss_before"] = _status("VmRSS")
    _reset_peak()
    run_job(job, train_sentences=SENTENCES, validation_sentences=SENTENCES[:4], test_sentences=SENTENCES[4:],
            seed=0, max_length=32, device="cpu", eval_batch_size=4, work_dir=directory / "work",
            out_dir=directory / "out", progress=False)
    figures["rss_after"] = _status("VmRSS")
    figures["peak"] = _status("VmHWM")
    os.write(out, json.dumps(figures).encode())
    os.close(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args(argv)
    import json

    import torch  # noqa: F401  (imported before the fork: the child's baseline then holds it)

    read, write = os.pipe()
    with tempfile.TemporaryDirectory(prefix="ftflow-lifecycle-") as tmp:
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                measure(Path(tmp), args.layers, args.precision, write)
                os._exit(0)
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(1)
        os.close(write)
        data = b"".join(iter(lambda: os.read(read, 65536), b""))
        _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        print("the measuring child failed", file=sys.stderr)
        return 1
    f = json.loads(data)
    weights = f["weights"]
    at_reload = f["rss_at_reload"] - f["rss_before"]
    peak = f["peak"] - f["rss_before"]
    print(f"granite-3.3-8b width, {args.layers} layer(s), {args.precision}: weights {weights / MB:.0f} MB")
    print(f"  resident above the baseline when training has returned (the reload starts): {at_reload / MB:8.0f} MB "
          f"({at_reload / weights:.2f} x weights)")
    print(f"  peak above the baseline over run_job:                                     {peak / MB:8.0f} MB "
          f"({peak / weights:.2f} x weights)")
    print(f"  resident above the baseline after run_job:                                "
          f"{(f['rss_after'] - f['rss_before']) / MB:8.0f} MB")
    ok = at_reload < 0.5 * weights and peak < 1.5 * weights
    print("PASS" if ok else "FAIL: the trained model is still alive when the next one loads")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
