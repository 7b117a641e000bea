"""The budget a stage plans against: configured on a CPU; on CUDA at most what is free less the margin (torch.cuda
patched: this machine has no GPU); expandable segments asked for unless the user configured the allocator."""

from __future__ import annotations

import pytest
import torch

from ftflow.plan import budget
from ftflow.plan.budget import EXPANDABLE_SEGMENTS, stage_budget, use_expandable_segments
from ftflow.plan.predict import GB, RUNTIME_OVERHEAD_BYTES


@pytest.fixture
def cuda(monkeypatch):
    """A CUDA device whose free memory the test sets (``cuda["free"]``); every call the measurement makes is fake."""
    card = {"free": 0, "total": int(20.9e9), "calls": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: card["calls"].append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: card["calls"].append("empty_cache"))

    def mem_get_info(*args):
        card["calls"].append("mem_get_info")
        return card["free"], card["total"]

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return card


def test_on_a_cpu_the_configured_budget_is_planned_against():
    planned = stage_budget(20.0, "cpu", margin_gb=1.0)
    assert (planned.budget_bytes, planned.measured) == (20 * GB, False)
    assert planned.line() == "memory budget 20.00 GB (configured; cpu)"


def test_on_cuda_a_card_with_less_free_than_the_budget_is_planned_for_what_it_has(cuda):
    cuda["free"] = int(19.9e9)  # a 20.9e9-byte MIG slice once its context (and another process) took 1 GB
    planned = stage_budget(20.0, "cuda", margin_gb=1.0)
    # The peaks count the context as RUNTIME_OVERHEAD_BYTES["cuda"]; the free figure has lost the real one already.
    assert planned.budget_bytes == int(19.9e9) + RUNTIME_OVERHEAD_BYTES["cuda"] - GB
    assert planned.budget_bytes < 20 * GB and planned.measured
    # The context exists before measuring, and this process's cached blocks are returned to the driver first.
    assert cuda["calls"] == ["synchronize", "empty_cache", "mem_get_info"]
    assert planned.line() == ("memory budget 19.44 GB, the measured one: configured 20.00 GB; measured on CUDA 19.44 "
                              "GB = 19.90 GB free of 20.90 GB + 0.54 GB context the peaks count - 1.00 GB margin "
                              "(memory.cuda_margin_gb)")
    assert planned.to_dict()["free_bytes"] == int(19.9e9) and planned.to_dict()["line"] == planned.line()


def test_on_cuda_a_larger_card_still_plans_for_the_configured_budget(cuda):
    cuda["free"], cuda["total"] = int(79e9), int(80e9)
    planned = stage_budget(20.0, "cuda", margin_gb=1.0)
    assert planned.budget_bytes == 20 * GB
    assert "the configured one" in planned.line()


def test_a_larger_margin_plans_for_less(cuda):
    cuda["free"] = int(19.9e9)
    assert stage_budget(20.0, "cuda", 2.0).budget_bytes == stage_budget(20.0, "cuda", 1.0).budget_bytes - GB
    cuda["free"] = 0
    assert stage_budget(20.0, "cuda", 1.0).budget_bytes == 0


def test_expandable_segments_are_asked_for_unless_the_user_configured_the_allocator():
    environ: dict = {}
    assert use_expandable_segments(environ) == EXPANDABLE_SEGMENTS
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in budget.ALLOC_CONF_VARIABLES:
        mine = {name: "max_split_size_mb:128"}
        assert use_expandable_segments(mine) == "max_split_size_mb:128"
        assert mine == {name: "max_split_size_mb:128"}


def test_the_cli_sets_it_before_a_command_runs_and_keeps_the_users(monkeypatch):
    import os

    import flows.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_validate", lambda args: seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF")) or 0)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert cli.main(["validate", "x.yaml"]) == 0
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    assert cli.main(["validate", "x.yaml"]) == 0
    assert seen == ["expandable_segments:True", "garbage_collection_threshold:0.6"]
