"""A missing install step skips a test on a developer's machine and fails it under CI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import needs

REPO = Path(__file__).resolve().parents[2]


def test_missing_piece_skips_outside_ci(monkeypatch):
    monkeypatch.setattr(needs, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="WordNet is missing; install it with: apt-get install wordnet-base"):
        needs.missing("WordNet", "apt-get install wordnet-base")


def test_missing_piece_fails_under_ci(monkeypatch):
    monkeypatch.setattr(needs, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match=r"WordNet is missing; install it with: apt-get install "
                                                     r"wordnet-base \(CI=true: a fresh install must provide it"):
        needs.missing("WordNet", "apt-get install wordnet-base")


def test_missing_module_is_reported_by_name(monkeypatch):
    monkeypatch.setattr(needs, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="Python module no_such_module_ftflow"):
        needs.needs_module("no_such_module_ftflow", "pip install no-such-module")
    assert needs.needs_module("json", "stdlib").dumps([1]) == "[1]"


@pytest.mark.slow
@pytest.mark.parametrize("ci, outcome", [("false", "1 passed, 1 skipped"), ("true", "1 passed, 1 error")])
def test_the_marker_skips_or_fails_at_setup(tmp_path, ci, outcome):
    (tmp_path / "test_marked.py").write_text(
        "from tests.needs import needs\n\n"
        "@needs(False, 'Chromium', 'apt-get install chromium')\n"
        "def test_missing():\n    pass\n\n"
        "@needs(True, 'WordNet', 'apt-get install wordnet-base')\n"
        "def test_present():\n    pass\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_marked.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert outcome in done.stdout, done.stdout
    if ci == "true":
        assert "Chromium is missing; install it with: apt-get install chromium (CI=true" in done.stdout
