"""bitsandbytes' 8-bit AdamW, with updates of bf16 weights that keep small steps (stochastic rounding).

The fit planner (:mod:`ftflow.fit`) picks 8-bit optimizer state when fp32
AdamW moments do not fit. bitsandbytes computes each update in fp32 and
writes it back in the weights' dtype with round-to-nearest: on bf16 weights,
an update smaller than half a bf16 step (about 0.2% of the weight) is lost
every time, which at fine-tuning learning rates is most of them. The
Kahan-compensated update that ftflow uses otherwise
(:func:`ftflow.training.kahan_adamw`) needs one more bf16 buffer per weight,
which is what does not fit when 8-bit state is chosen (a 2.5B model in full:
weights, gradients, 8-bit state and a buffer are 20.3 GB). So here the fp32
result is rounded to bf16 *stochastically*: up with probability equal to
the fraction of the bf16 step it covers. The expected weight after the step
is then exactly the fp32 result, so small updates accumulate in expectation
instead of vanishing, at no memory cost beyond one fp32 copy of the tensor
being updated.

bitsandbytes is imported here, when an 8-bit optimizer is built (CPU runs
of its 8-bit optimizers work from bitsandbytes 0.45 on; paging needs CUDA and
falls back to plain state on a CPU).
"""

from __future__ import annotations

from typing import Optional

import torch


def stochastic_round_to_bf16(values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random so that the expected result is ``values``.

    A bf16 number is the upper 16 bits of an fp32 one. Adding a uniform random
    integer in [0, 2**16) to the fp32 bit pattern and truncating the lower 16
    bits rounds up with probability (lower bits) / 2**16: exactly the fraction
    of the bf16 step between the two neighbours. Values that are already bf16
    are unchanged; infinities and NaNs pass through as truncation gives them.

    Args:
        values: fp32 tensor, any shape.
        generator: random source (None: torch's default for the tensor's device).

    Returns:
        A bf16 tensor of the same shape.
    """
    if values.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16 takes fp32 values, got {values.dtype}")
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    finite = torch.isfinite(values)
    rounded = torch.where(finite, bits + noise, bits) & -65536  # keep the upper 16 bits (0xFFFF0000)
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the lower 16 bits are zero


def adamw_8bit_class():
    """bitsandbytes' ``AdamW8bit`` subclassed to round bf16 weights stochastically (see the module docstring)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(f"8-bit optimizer state needs bitsandbytes: pip install bitsandbytes ({exc})") from None

    class AdamW8bit(bnb.optim.AdamW8bit):
        """8-bit AdamW; bf16 tensors are updated in fp32 and rounded stochastically back to bf16."""

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            if p.dtype != torch.bfloat16:
                return super().update_step(group, p, gindex, pindex)
            weights, grad = p.data, p.grad
            # bitsandbytes' kernels update p in place from p.grad (same dtype): give them fp32 copies of this
            # one tensor, then write the fp32 result back into the bf16 storage, rounded stochastically.
            p.grad = None
            p.data = weights.float()
            p.grad = grad.float()
            try:
                super().update_step(group, p, gindex, pindex)
                weights.copy_(stochastic_round_to_bf16(p.data))
            finally:
                p.grad = None
                p.data = weights
                p.grad = grad

    return AdamW8bit


def adamw_8bit(learning_rate: float, *, paged: bool = False, weight_decay: float = 0.0):
    """``(optimizer class, kwargs)`` for the Trainer's ``optimizer_cls_and_kwargs``: bitsandbytes 8-bit AdamW.

    The Trainer's AdamW defaults (betas 0.9/0.999, eps 1e-8), so the 8-bit run optimises what the fp32 one does.
    ``paged`` keeps the state in CUDA unified memory (bitsandbytes' paged optimizers).
    """
    return adamw_8bit_class(), {"lr": learning_rate, "betas": (0.9, 0.999), "eps": 1e-8,
                                "weight_decay": weight_decay, "is_paged": paged}
