"""Shared test setup: Prefect runs against a temporary local server, nothing leaves the machine."""

from __future__ import annotations

import inspect
import os
import re

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n N`), the cores are shared out between the workers: torch's intra-op threads (and those
# of the subprocesses the flow tests start, which inherit this) at cores / workers, so N workers do not each
# spin up every core's worth of threads. Tests assert nothing a thread count may change (kernels marker below).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(available, what, install): see tests/needs.py")
    config.addinivalue_line(
        "markers", "kernels: a unit test that trains or computes in reduced precision, whose figures the CPU's "
        "kernels can change; given by a rule (kernel_sensitive), rerun under other kernels by scripts/other_kernels.sh")


# A unit test is kernel-sensitive when its own code, or a fixture or helper of its module that it names, trains
# or computes in bf16/fp16/4-bit/8-bit: the figures such code produces change with the CPU's kernels (AVX-512
# against AVX2 rounds ties differently) and with the thread count, so scripts/other_kernels.sh reruns exactly
# these under a kernel path and thread count other than the machine's default. A rule, not a hand-kept list,
# so the next such test is rerun too.
_KERNEL_WORDS = re.compile(r"bf16|bfloat16|fp16|float16|\bhalf\b|nf4|4bit|8bit|8_bit|optimi\b|kahan"
                           r"|\btrain_(full|peft|lora|prefix)\b|\brun_job\b|\bfit\(|\.backward\(|\.step\(")


def kernel_sensitive(item) -> bool:
    """Whether a collected unit test trains or computes in reduced precision (see _KERNEL_WORDS)."""
    function = getattr(item, "function", None)
    if function is None or "tests/unit/" not in str(item.path).replace(os.sep, "/"):
        return False
    names = [item.name, *getattr(item, "fixturenames", ())]
    sources = []
    for name in [function.__name__, *names]:
        target = getattr(item.module, name.split("[")[0], None)
        target = getattr(target, "__wrapped__", target)
        if callable(target):
            try:
                sources.append(inspect.getsource(target))
            except (OSError, TypeError):
                pass
    # Helpers the test calls by name (module-level functions, e.g. _changed_fraction), one level deep.
    called = set(re.findall(r"\b(_?[a-z][a-z0-9_]*)\(", sources[0] if sources else ""))
    for name in called:
        helper = getattr(item.module, name, None)
        if inspect.isfunction(helper) and helper.__module__ == item.module.__name__:
            sources.append(inspect.getsource(helper))
    return any(_KERNEL_WORDS.search(source) for source in [item.name, *sources])


# The flow and operations tests run the Prefect engine, a server, workers or subprocesses: slow by where they live,
# so a new one is deselected by -m "not slow" too.
SLOW_FOLDERS = ("tests/flows/", "tests/ops/")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if kernel_sensitive(item):
            item.add_marker(pytest.mark.kernels)
        if any(folder in str(item.path).replace(os.sep, "/") for folder in SLOW_FOLDERS):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item):
    from tests.needs import missing

    for marker in item.iter_markers(name="needs"):
        if not marker.kwargs["available"]:
            missing(marker.kwargs["what"], marker.kwargs["install"])


def pytest_collection_finish(session):
    # Every test module is imported now: torch's, transformers', PEFT's and Prefect's objects live for the whole
    # session. Frozen, as a stage's process freezes them before its first model, so that each free_memory (and
    # accelerate's collection when a Trainer starts) walks only what a test made, not 600,000 objects each time.
    from ftflow.device import freeze_long_lived_objects
    freeze_long_lived_objects()
