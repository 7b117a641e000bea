"""What ftflow does to the device around the stages: memory handed back between them, TF32 switched per pass.

Memory. A model, its gradients and its optimizer state must be gone when a
stage (or a training attempt) ends, before the next model is loaded: on a 20
GB card an 8B model in bf16 (16.4 GB) cannot be loaded while the last one is
still alive. Reference counting frees what nothing points to as soon as the
last name goes; what a reference cycle holds waits for Python's cyclic
collector, which runs when *allocation counts* say so, not when the device is
full. ftflow keeps its own code free of such cycles, but the libraries make
some: bitsandbytes' 4-bit weights point back at their layer
(``Params4bit.module``), accelerate's mixed-precision wrapper binds the
model's ``forward`` onto the model itself, and bitsandbytes' 8-bit optimizer
closes over itself in ``load_state_dict``. :func:`free_memory` collects those
and hands the CUDA caching allocator's free blocks back to the driver; it is
called at the end of every function that held a model and before every load.
A full collection walks every object of the process: :func:`freeze_long_lived_objects`
takes the import-time ones (torch's, transformers', Prefect's) out of its walk before the
first stage.

TF32. On Ampere and newer GPUs fp32 matrix products can run on tensor cores
in TF32 (fp32's range, a 10-bit mantissa on the inputs, fp32 sums): several
times faster for the study's fp32 models, and no coarser than the bf16
autocast (8-bit mantissa) its larger models train under. Reported scores are
computed without it: :func:`tf32` switches it on around the Trainer's steps
only, and scoring (:func:`ftflow.perplexity.score_sentences`) turns it off
for its own passes, also inside a training run.
"""

from __future__ import annotations

import gc
import importlib
import logging
import warnings
from contextlib import contextmanager
from typing import Iterator, Literal

import torch

log = logging.getLogger(__name__)

Tf32Setting = Literal["auto", "on", "off"]


_FROZEN = False
TRAINING_LIBRARIES = ("transformers.trainer", "peft", "datasets")
"""Imported by a training run on first use (the Trainer, PEFT with bitsandbytes, datasets with pyarrow): about
140,000 objects more. :func:`freeze_long_lived_objects` imports them before it freezes, else every collection of
every later run walks them (successive halving's rungs run several short stages each)."""


def freeze_long_lived_objects() -> None:
    """Move every object alive now out of the cyclic collector's reach, once per process.

    A process that runs stages holds some 600,000 objects before its first
    model exists: the modules, classes and functions of torch, transformers,
    PEFT and Prefect. Every :func:`free_memory` (and accelerate's own
    ``gc.collect()`` when a Trainer starts) would walk them all, about 0.5 s a
    time on a CPU core, several times per training run. :func:`gc.freeze`
    leaves them to reference counting only, so a collection walks just what
    was made after; call this where nothing a stage makes is alive yet (before
    a process's first stage), after collecting what is already garbage, and
    after importing :data:`TRAINING_LIBRARIES`, so that theirs are frozen too. A
    frozen object is still freed when its last reference goes; only a
    reference cycle among frozen objects would stay, and import-time objects
    live as long as the process anyway.
    """
    global _FROZEN
    if _FROZEN:
        return
    with warnings.catch_warnings():
        # Their import-time deprecation notices (transformers.trainer: torch.jit.script_method, 14 times), which
        # Python's default filters hide outside tests, are not this process's to show before any stage asked.
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in TRAINING_LIBRARIES:
            importlib.import_module(name)
    gc.collect()
    gc.freeze()
    _FROZEN = True


def free_memory(device: str = "cpu") -> None:
    """Collect what reference cycles still hold and, on CUDA, give the allocator's cached blocks back.

    Call it once the caller's own names for the model (and trainer, optimizer) are gone: it cannot free
    what a live variable, or an exception's traceback being handled, still points to.

    Args:
        device: the device the freed objects lived on (``cuda`` also empties CUDA's cache).
    """
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def tf32_available(device: str) -> bool:
    """Whether ``device`` has TF32 matrix products: a CUDA GPU of compute capability 8.0 (Ampere) or newer."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def resolve_tf32(setting: Tf32Setting, device: str) -> tuple[bool, str]:
    """Whether training runs with TF32, and why (recorded in each training manifest as ``tf32``).

    Args:
        setting: ``training.tf32``: ``auto`` (on where the GPU has it), ``on`` or ``off``.
        device: the run's device.

    Returns:
        ``(enabled, reason)``; ``on`` on a device without TF32 (a CPU, a GPU older than Ampere) is off, said so.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"tf32 must be auto, on or off, got {setting!r}")
    if setting == "off":
        return False, "off (training.tf32: off)"
    if tf32_available(device):
        return True, f"on (training.tf32: {setting}; fp32 matrix products in TF32 while training, never when scoring)"
    why = f"{device} has no TF32: it needs a CUDA GPU of compute capability 8.0 or newer"
    if setting == "on":
        log.warning("training.tf32 is on, but %s; training runs without it", why)
    return False, f"off ({why})"


def _tf32_state() -> tuple:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the legacy allow_tf32 flags must not be mixed in
        return ("precision", matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    return ("allow", matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def _set_tf32_state(state: tuple) -> None:
    kind, matmul, conv = state
    if kind == "precision":
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


def tf32_enabled() -> bool:
    """Whether CUDA's fp32 matrix products currently run in TF32."""
    kind, matmul, _ = _tf32_state()
    return matmul == "tf32" if kind == "precision" else bool(matmul)


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """CUDA's fp32 matrix products (and convolutions) in TF32 or in full fp32 inside the block; restored after.

    Scoped rather than global (transformers' ``TrainingArguments.tf32`` sets it for the rest of the process,
    and refuses on a GPU without it), so a run's scoring after training is not computed in TF32.
    """
    before = _tf32_state()
    kind = before[0]
    if kind == "precision":
        _set_tf32_state((kind, "tf32" if enabled else "ieee", "tf32" if enabled else "ieee"))
    else:
        _set_tf32_state((kind, enabled, enabled))
    try:
        yield
    finally:
        _set_tf32_state(before)
