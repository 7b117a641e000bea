"""What ftflow does to the device around the stages: memory handed back between them.

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
"""

from __future__ import annotations

import gc

import torch


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
