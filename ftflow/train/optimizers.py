"""bitsandbytes' 8-bit AdamW, with updates of bf16 weights that keep small steps (stochastic rounding).

The fit planner (:mod:`ftflow.plan.fit`) picks 8-bit optimizer state when fp32
AdamW moments do not fit. bitsandbytes computes each update in fp32 and
writes it back in the weights' dtype with round-to-nearest: on bf16 weights,
an update smaller than half a bf16 step (about 0.2% of the weight) is lost
every time, which at fine-tuning learning rates is most of them. The
Kahan-compensated update that ftflow uses otherwise
(:func:`ftflow.train.trainer.kahan_adamw`) needs one more bf16 buffer per weight,
which is what does not fit when 8-bit state is chosen (a 2.5B model in full:
weights, gradients, 8-bit state and a buffer are 20.3 GB). So here the fp32
result is rounded to bf16 *stochastically*: up with probability equal to
the fraction of the bf16 step it covers. The expected weight after the step
is then exactly the fp32 result, so small updates accumulate in expectation
instead of vanishing.

Memory: a tensor with 8-bit state is updated in slices of
:data:`SLICE_ELEMENTS` elements (a multiple of bitsandbytes' 256-element
quantization block, so each slice holds whole blocks of both moments and
their absmax, and bitsandbytes' own kernel updates it exactly as it would the
whole tensor). Only the slice being updated has fp32 copies of its weights
and gradient, the rounding's temporaries and, on a CPU, the fp32 temporaries
of bitsandbytes' reference kernel: the step's extra memory is bounded by the
slice, not by the largest tensor (a 100.7M-element embedding otherwise costs
fp32 copies of weights and gradient plus the rounding's integer temporaries,
about 2 GB at once). See :data:`ftflow.plan.predict.ADAMW_8BIT_STEP_BYTES_PER_ELEMENT`.

bitsandbytes is imported here, when an 8-bit optimizer is built (CPU runs
of its 8-bit optimizers work from bitsandbytes 0.45 on; paging needs CUDA and
falls back to plain state on a CPU).
"""

from __future__ import annotations

from typing import Optional

import torch

QUANTIZATION_BLOCK = 256
"""Elements per block of bitsandbytes' 8-bit optimizer state (one absmax per block and moment; 0.50)."""
SLICE_ELEMENTS = 1 << 22
"""Elements of a tensor updated at once by :func:`adamw_8bit_class`'s optimizer (4,194,304: 16,384 quantization
blocks). Small enough that its temporaries are a few tens of MB, large enough that a 100M-element embedding
takes 25 kernel calls."""


def stochastic_round_to_bf16(values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random so that the expected result is ``values``.

    A bf16 number is the upper 16 bits of an fp32 one. Adding a uniform random
    integer in [0, 2**16) to the fp32 bit pattern and truncating the lower 16
    bits rounds up with probability (lower bits) / 2**16: exactly the fraction
    of the bf16 step between the two neighbours. Values that are already bf16
    are unchanged; infinities and NaNs pass through unchanged.

    Args:
        values: fp32 tensor, any shape (left unchanged).
        generator: random source (None: torch's default for the tensor's device).

    Returns:
        A bf16 tensor of the same shape.
    """
    if values.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16 takes fp32 values, got {values.dtype}")
    rounded = values.flatten().clone()  # flatten() may be a view of values: clone, which is rounded in place
    _stochastic_round_(rounded, generator)
    return rounded.view(values.shape).to(torch.bfloat16)  # exact: the lower 16 bits are zero


def _stochastic_round_(values: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
    """Round contiguous fp32 ``values`` in place to bf16-representable values (see :func:`stochastic_round_to_bf16`).

    Temporaries: one int32 noise tensor and one bool mask of ``values``' size (5 bytes per element).
    """
    bits = values.view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    # A non-finite value keeps its bits: noise on a NaN's payload could carry into the sign bit (NaN -> 0).
    noise.mul_(torch.isfinite(values))
    bits.add_(noise).bitwise_and_(-65536)  # keep the upper 16 bits (0xFFFF0000)


def _slice(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``tensor``'s flat elements ``start:end`` (a view); a paged state buffer's view stays marked paged."""
    part = tensor.view(-1)[start:end]
    if getattr(tensor, "is_paged", False):  # bitsandbytes checks devices by this attribute
        part.is_paged = True
        part.page_deviceid = tensor.page_deviceid
    return part


def adamw_8bit_class():
    """bitsandbytes' ``AdamW8bit`` updating 8-bit-state tensors in slices, and bf16 weights with stochastic rounding.

    See the module docstring. Checked against bitsandbytes 0.50's ``Optimizer2State.update_step``: the 8-bit
    branch below makes the same kernel call on each slice of the tensor, its moments and their absmax.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        raise ImportError(f"8-bit optimizer state needs bitsandbytes: pip install bitsandbytes ({exc})") from None

    class AdamW8bit(bnb.optim.AdamW8bit):
        """8-bit AdamW updating in slices; bf16 tensors are updated in fp32 and rounded stochastically back."""

        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            if self.state[p]["state1"].dtype == torch.uint8:
                return self._update_8bit_in_slices(group, p, gindex, pindex)
            if p.dtype != torch.bfloat16:
                return super().update_step(group, p, gindex, pindex)
            # A tensor under bitsandbytes' min_8bit_size (fp32 moments, at most 4096 elements): its kernels
            # update p in place from p.grad (same dtype): give them fp32 copies, then round back.
            weights, grad = p.data, p.grad
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

        def _update_8bit_in_slices(self, group, p, gindex, pindex):
            p.data = p.data.contiguous()
            p.grad = p.grad.contiguous()
            state = self.state[p]
            config = self.get_config(gindex, pindex, group)
            state["step"] += 1
            betas = config["betas"]
            half = p.dtype == torch.bfloat16
            total = p.numel()
            for start in range(0, total, SLICE_ELEMENTS):
                end = min(start + SLICE_ELEMENTS, total)
                blocks = slice(start // QUANTIZATION_BLOCK, -(-end // QUANTIZATION_BLOCK))
                weights, grad = _slice(p.data, start, end), _slice(p.grad, start, end)
                if half:
                    # The kernel's result in fp32, before any rounding; the gradient in fp32 as the kernel reads it.
                    weights, grad = weights.float(), grad.float()
                bnb_functional.optimizer_update_8bit_blockwise(
                    self.optimizer_name, grad, weights, _slice(state["state1"], start, end),
                    _slice(state["state2"], start, end), betas[0], betas[1], betas[2] if len(betas) >= 3 else 0.0,
                    config.get("alpha", 0.0), config["eps"], state["step"], config["lr"], state["qmap1"],
                    state["qmap2"], state["absmax1"][blocks], state["absmax2"][blocks], config["weight_decay"],
                    gnorm_scale=1.0, skip_zeros=config["skip_zeros"])
                if half:
                    # Each slice's noise comes from the device's default generator in turn: every element still
                    # gets its own independent uniform draw, as when the whole tensor was rounded at once.
                    _stochastic_round_(weights)
                    _slice(p.data, start, end).copy_(weights)  # exact: the lower 16 bits are zero
                del weights, grad

    return AdamW8bit


def adamw_8bit(learning_rate: float, *, paged: bool = False, weight_decay: float = 0.0):
    """``(optimizer class, kwargs)`` for the Trainer's ``optimizer_cls_and_kwargs``: bitsandbytes 8-bit AdamW.

    The Trainer's AdamW defaults (betas 0.9/0.999, eps 1e-8), so the 8-bit run optimises what the fp32 one does.
    ``paged`` keeps the state in CUDA unified memory (bitsandbytes' paged optimizers).
    """
    return adamw_8bit_class(), {"lr": learning_rate, "betas": (0.9, 0.999), "eps": 1e-8,
                                "weight_decay": weight_decay, "is_paged": paged}
