"""The memory budget a stage plans against: the configured one, or on CUDA what is really free, less a margin.

The planner's peaks (:mod:`ftflow.plan.predict`) count weights, activations, logits, optimizer state and a fixed
CUDA context (:data:`ftflow.plan.predict.RUNTIME_OVERHEAD_BYTES`). A real card also holds what other processes use, a
context of its own size, the kernels CUDA loads on first use, cuBLAS workspaces, and the caching allocator's
reserved-but-unused blocks, which packed batches (a new shape every step) fragment. So on CUDA each planning stage
measures the card at its start (``torch.cuda.mem_get_info`` once the context exists and this process's cached
blocks are returned) and plans against ``min(configured budget, free + planned context - margin)``: the free
figure has already lost the real context, which the peaks count again as the planned one, so that one is added
back; the margin (``memory.cuda_margin_gb``, :data:`DEFAULT_CUDA_MARGIN_GB`) covers what no figure counts. On a
CPU the configured budget is used as is. The figure used is logged and recorded in the stage's manifest.

The caching allocator fragments less with expandable segments, so :func:`use_expandable_segments` asks for them
(``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) unless the user configured the allocator; the CLI and the
flows call it first, before CUDA starts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ftflow.plan.predict import GB, RUNTIME_OVERHEAD_BYTES

DEFAULT_CUDA_MARGIN_GB = 1.0
"""GB kept free on CUDA besides every predicted peak: kernels loaded lazily as a run reaches them (a few hundred
MB over a training run), cuBLAS/cuBLASLt workspaces (tens of MB per stream) and the caching allocator's
reserved-but-unused blocks (a few percent of the peak, less with expandable segments). 5% of a 20 GB card."""

ALLOC_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
"""The allocator's settings: the CUDA-specific variable, and torch's newer name for it."""
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def use_expandable_segments(environ: Optional[dict] = None) -> str:
    """Ask the CUDA caching allocator for expandable segments, unless the user set its configuration.

    Must run before CUDA is initialised (the allocator reads the variable once); call it first in the CLI and at
    a flow's start. Returns the configuration in effect (the user's own when they set one).
    """
    environ = os.environ if environ is None else environ
    for name in ALLOC_CONF_VARIABLES:
        if environ.get(name):
            return environ[name]
    environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return EXPANDABLE_SEGMENTS


@dataclass(frozen=True)
class StageBudget:
    """The budget one stage planned against, and where it came from (recorded in its manifest).

    Attributes:
        budget_bytes: what the stage plans against.
        configured_bytes: the config's budget.
        device: ``cuda`` or ``cpu``.
        free_bytes: CUDA: free memory measured at the stage's start, after the context exists (None on a CPU).
        total_bytes: CUDA: the card's memory.
        context_bytes: CUDA: the context the planner's peaks already count (added back to the free figure).
        margin_bytes: CUDA: what is kept free besides the peaks.
    """

    budget_bytes: int
    configured_bytes: int
    device: str
    free_bytes: Optional[int] = None
    total_bytes: Optional[int] = None
    context_bytes: int = 0
    margin_bytes: int = 0

    @property
    def measured(self) -> bool:
        return self.free_bytes is not None

    def line(self) -> str:
        """One line for the log: the figure used and how it was reached."""
        if not self.measured:
            return f"memory budget {self.budget_bytes / GB:.2f} GB (configured; {self.device})"
        available = self.free_bytes + self.context_bytes - self.margin_bytes
        which = "the measured one" if self.budget_bytes < self.configured_bytes else "the configured one"
        return (f"memory budget {self.budget_bytes / GB:.2f} GB, {which}: configured {self.configured_bytes / GB:.2f}"
                f" GB; measured on CUDA {available / GB:.2f} GB = {self.free_bytes / GB:.2f} GB free of "
                f"{self.total_bytes / GB:.2f} GB + {self.context_bytes / GB:.2f} GB context the peaks count - "
                f"{self.margin_bytes / GB:.2f} GB margin (memory.cuda_margin_gb)")

    def to_dict(self) -> dict:
        return {**asdict(self), "line": self.line()}


def measure_cuda_free() -> tuple[int, int]:
    """``(free, total)`` bytes of the current CUDA device once this process's context exists.

    The context is created first (its memory is then no longer free, as for every stage that loads a model); then
    the blocks this process keeps cached (an earlier stage's, freed) go back to the driver, so the figure is what a
    new model can take.
    """
    import gc

    torch.cuda.synchronize()  # creates this process's context on the current device, if it has none yet
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def stage_budget(configured_gb: float, device: str, margin_gb: float = DEFAULT_CUDA_MARGIN_GB) -> StageBudget:
    """The budget a stage plans against on ``device`` (see the module's docstring).

    Args:
        configured_gb: the config's budget (``memory_budget_gb`` or the training one), GB of 10**9 bytes.
        device: ``cuda`` (measured) or ``cpu`` (the configured budget).
        margin_gb: kept free on CUDA besides every predicted peak.
    """
    configured = int(configured_gb * GB)
    if device != "cuda" or not torch.cuda.is_available():
        return StageBudget(budget_bytes=configured, configured_bytes=configured, device=device)
    free, total = measure_cuda_free()
    context, margin = RUNTIME_OVERHEAD_BYTES["cuda"], int(margin_gb * GB)
    return StageBudget(budget_bytes=max(0, min(configured, free + context - margin)), configured_bytes=configured,
                       device=device, free_bytes=free, total_bytes=total, context_bytes=context, margin_bytes=margin)
