"""Tests that need something outside Python: skipped where it is missing, failed under CI.

A fresh install (``scripts/install.sh``) provides all of it, so under CI (``CI=true``) a missing
piece is an install bug that must show, not a skip that hides it.
"""

from __future__ import annotations

import importlib
import os

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def needs(available: bool, what: str, install: str):
    """A marker: skip the test when ``what`` is not ``available`` (fail instead under CI)."""
    return pytest.mark.needs(available=available, what=what, install=install)


def needs_module(name: str, install: str):
    """Import ``name`` for a test; skip when it is missing (fail instead under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"Python module {name} ({exc})", install)


def missing(what: str, install: str):
    message = f"{what} is missing; install it with: {install}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a fresh install must provide it, so this is not skipped)", pytrace=False)
    pytest.skip(message)
