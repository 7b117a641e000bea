"""ftflow.train.optimizers: the 8-bit AdamW updates in slices, exactly as bitsandbytes would whole, within its planned memory."""

from __future__ import annotations

import pytest
import torch

from ftflow.plan import predict as plan_predict
from ftflow.train import optimizers
from tests.memory_probe import measure

bnb = pytest.importorskip("bitsandbytes")

STATE = ("state1", "state2", "absmax1", "absmax2")


def _run(cls, weights: torch.Tensor, grads: list[torch.Tensor], **options):
    weight = torch.nn.Parameter(weights.clone())
    optimizer = cls([weight], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, **options)
    for grad in grads:
        weight.grad = grad.to(weight.dtype)
        optimizer.step()
    return weight.detach(), optimizer.state[weight]


def _data(n: int, steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator), [torch.randn(n, generator=generator) for _ in range(steps)]


def test_8bit_update_in_slices_is_bitsandbytes_own_update_of_the_whole_tensor(monkeypatch):
    # Slices of 512 elements (two quantization blocks) over 5077 elements: the last block and slice are partial.
    monkeypatch.setattr(optimizers, "SLICE_ELEMENTS", 512)
    weights, grads = _data(5077, 4)
    sliced, sliced_state = _run(optimizers.adamw_8bit_class(), weights, grads, weight_decay=0.1)
    whole, whole_state = _run(bnb.optim.AdamW8bit, weights, grads, weight_decay=0.1)
    # fp32 weights: the same kernel on the same blocks, so the same numbers to the bit.
    assert torch.equal(sliced, whole)
    assert all(torch.equal(sliced_state[key], whole_state[key]) for key in STATE)
    assert sliced_state["step"] == whole_state["step"] == 4


def test_8bit_update_of_bf16_weights_rounds_bitsandbytes_fp32_result_to_a_neighbour(monkeypatch):
    monkeypatch.setattr(optimizers, "SLICE_ELEMENTS", 512)
    weights, (grad,) = _data(5077, 1, seed=1)
    start = weights.to(torch.bfloat16)
    rounded, state = _run(optimizers.adamw_8bit_class(), start, [grad.to(torch.bfloat16)])
    # The reference: bitsandbytes' update of the same values in fp32 (what the slices compute before rounding).
    exact, exact_state = _run(bnb.optim.AdamW8bit, start.float(), [grad.to(torch.bfloat16).float()])
    assert all(torch.equal(state[key], exact_state[key]) for key in STATE)
    below = (exact.view(torch.int32) & -65536).view(torch.float32)  # the bf16 value truncation gives
    above = (below.view(torch.int32) + 65536).view(torch.float32)  # the next one away from zero
    got = rounded.float()
    assert bool(((got == below) | (got == above)).all())
    # Up with probability the fraction of the bf16 step covered: about half the elements here (5077 of them,
    # fractions uniform): 0.5 +- 5 standard deviations of a binomial mean.
    assert (got == above)[exact != below].float().mean().item() == pytest.approx(0.5, abs=5 * 0.5 / 5077 ** 0.5)


def test_stochastic_rounding_leaves_non_finite_values_alone():
    special = torch.tensor([0x7FFFFFFF, -1, 0x7F800000, 0xFF800000 - (1 << 32), 0x7FC00000], dtype=torch.int64)
    values = special.to(torch.int32).view(torch.float32)  # NaNs with full payloads (either sign), +-inf, NaN
    for _ in range(20):  # the noise is random: a payload carry into the sign bit would show on some draw
        rounded = optimizers.stochastic_round_to_bf16(values)
        assert torch.isnan(rounded[[0, 1, 4]]).all() and torch.equal(rounded[2:4].float(), values[2:4])


def _step_probe(meter, elements: int, slice_elements: int, precision: str) -> dict:
    """One 8-bit AdamW step on a tensor whose gradient and state exist: the step's own peak above them."""
    optimizers.SLICE_ELEMENTS = slice_elements
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(elements, generator=generator).to(dtype))
    cls, options = optimizers.adamw_8bit(1e-5)
    optimizer = cls([weight], **options)
    weight.grad = torch.randn(elements, generator=generator).to(dtype)
    optimizer.step()  # creates the state
    optimizer.step()  # and runs bitsandbytes' CPU kernels once, so nothing the library loads lazily counts
    meter.start()
    optimizer.step()
    return {"peak": meter.peak()}


def test_the_plan_slices_as_the_optimizer_does():
    assert plan_predict.ADAMW_8BIT_SLICE_ELEMENTS == optimizers.SLICE_ELEMENTS
    assert optimizers.SLICE_ELEMENTS % optimizers.QUANTIZATION_BLOCK == 0
    assert plan_predict.adamw_8bit_step_bytes([100, 4095], True, "cuda") == 0  # fp32 moments, updated whole
    assert plan_predict.adamw_8bit_step_bytes([4096, 10**8], True, "cuda") == 13 * optimizers.SLICE_ELEMENTS
    assert plan_predict.adamw_8bit_step_bytes([10**6], False, "cpu") == 20 * 10**6


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_8bit_step_holds_one_slice_of_temporaries_as_planned(precision):
    # 8M elements in slices of 1M: the step's temporaries are one slice's, what the plan counts per element of
    # it (ftflow.plan.predict.ADAMW_8BIT_STEP_BYTES_PER_ELEMENT; fp32 copies of weights and gradient, the rounding's noise and
    # bitsandbytes' CPU kernel: 28 bytes per slice element for bf16 weights, 20 for fp32), not the tensor's
    # (bf16: 235 MB before slicing). Tolerance: 10%, and 2 MB of page rounding and Python objects.
    elements, slice_elements = 1 << 23, 1 << 20
    measured = measure("tests.unit.train.test_optimizers:_step_probe", elements=elements, slice_elements=slice_elements,
                       precision=precision)["peak"]
    group = "half" if precision == "bf16" else "fp32"
    planned = plan_predict.ADAMW_8BIT_STEP_BYTES_PER_ELEMENT[("cpu", group)] * slice_elements
    assert abs(measured - planned) <= 0.1 * planned + 2e6, (measured, planned)
