"""`ftflow run` killed with SIGKILL leaves no process behind: its temporary Prefect server ends with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.flows.micro import micro_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MARKER = "FTFLOW_TEST_RUN_MARKER"


def marked_processes(marker: str) -> dict[int, str]:
    """{pid: command line} of every live process whose environment carries ``MARKER=marker`` (inherited by all
    the processes a run starts, whatever they re-parent to)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if f"{MARKER}={marker}".encode() in environ and stat[stat.rindex(")") + 2] != "Z":
            found[int(entry.name)] = command
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="walks /proc")
def test_killed_run_leaves_no_prefect_server_behind(tmp_path):
    config = micro_config(tmp_path)
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the run starts its own server
    env.update({MARKER: marker, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home")})
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"], cwd=ROOT,
                               env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        # The server is up and the flow has started (its first log line) when the run is killed.
        while "Beginning flow run" not in log.read_text():
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the flow run did not start: " + log.read_text()[-3000:]
            time.sleep(0.1)
        started = marked_processes(marker)
        assert len(started) >= 2, started  # the run and its server
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        left = marked_processes(marker)
        settle = time.monotonic() + 10
        while left and time.monotonic() < settle:
            time.sleep(0.1)
            left = marked_processes(marker)
        assert left == {}, f"still running 10 s after the run was killed: {left}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid in marked_processes(marker):  # processes this test started, only if the assertion failed
            os.kill(pid, signal.SIGKILL)
