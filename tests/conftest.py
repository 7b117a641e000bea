"""Shared test setup: Prefect runs against a temporary local server, nothing leaves the machine."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(available, what, install): see tests/needs.py")


def pytest_runtest_setup(item):
    from tests.needs import missing

    for marker in item.iter_markers(name="needs"):
        if not marker.kwargs["available"]:
            missing(marker.kwargs["what"], marker.kwargs["install"])
