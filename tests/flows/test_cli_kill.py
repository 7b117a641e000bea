"""`ftflow run` stopped from outside: SIGKILL leaves no process and no file behind (its temporary Prefect server
ends with it); SIGTERM and SIGINT stop it with one line and a rerun resumes; nothing stays outside artifacts_dir."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.flows.micro import micro_config
from tests.processes import MARKER, marked_processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="walks /proc")
def test_killed_run_leaves_no_prefect_server_behind(tmp_path):
    config = micro_config(tmp_path)
    marker = uuid.uuid4().hex
    # The run starts its own server, and its Prefect client creates ~/.prefect in an empty HOME.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "MPLCONFIGDIR")}
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env.update({MARKER: marker, "PYTHONPATH": str(ROOT), "HOME": str(home), "TMPDIR": str(tmp)})
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
        # The server's temporary home (its database) went with it, and so did the ~/.prefect the killed run's
        # client had created (the run cannot remove it: its server does).
        assert _everything_under(tmp) == []
        assert _everything_under(home) == []
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid in marked_processes(marker):  # processes this test started, only if the assertion failed
            os.kill(pid, signal.SIGKILL)


def _wait_for(log: Path, pattern: str, run: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, log.read_text()):
        assert run.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{pattern!r} never came: " + log.read_text()[-3000:]
        time.sleep(0.2)


def _everything_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="walks /proc")
def test_sigterm_and_sigint_stop_a_run_in_one_line_a_rerun_resumes_and_nothing_stays_outside_artifacts(tmp_path):
    """As a job scheduler (SIGTERM) and Ctrl-C (SIGINT) stop a run: the signal goes to every process of the run,
    the temporary server included, while a training run is under way in a worker thread."""
    config = micro_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw.update(qlora={"enabled": False}, prefix={"enabled": False})
    raw["lora"].update(r=[2], epochs=40)  # a LoRA run long enough to be stopped in the middle of
    raw["distill"].update(top_k=[2])
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "MPLCONFIGDIR")}
    env.update({MARKER: marker, "PYTHONPATH": str(ROOT), "HOME": str(home), "TMPDIR": str(tmp)})
    training = r"Task run 'lora\[qwen2-teacher\|r2[^']*' - .*predicted"

    def stopped_run(signum: int, log: Path) -> str:
        with open(log, "w") as out:
            run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for(log, training, run)
            time.sleep(1.0)  # well into its epochs
            os.killpg(run.pid, signum)  # the whole process group, as `timeout`, a scheduler or Ctrl-C does
            assert run.wait(timeout=60) == 128 + signum, log.read_text()[-3000:]
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        settle = time.monotonic() + 10  # its server ends with it (a run cut short: within its shutdown grace)
        while marked_processes(marker) and time.monotonic() < settle:
            time.sleep(0.1)
        assert marked_processes(marker) == {}
        text = log.read_text()  # what the server wrote while it stopped included
        assert "Traceback" not in text and "ConnectError" not in text and "Error logging to API" not in text, text
        lines = [line for line in text.splitlines() if line.startswith("ftflow: interrupted")]
        assert lines == [text.rstrip().splitlines()[-1]], text[-3000:]  # one line, the last
        assert lines[0].startswith(f"ftflow: interrupted by {signal.Signals(signum).name} while computing "
                                   "lora[qwen2-teacher|r2,"), lines
        assert "running the same command again resumes the run" in lines[0]
        assert _everything_under(home) == [] and _everything_under(tmp) == []
        return text

    first = stopped_run(signal.SIGTERM, tmp_path / "sigterm.log")
    assert "Finished in state Completed()" in first
    second = stopped_run(signal.SIGINT, tmp_path / "sigint.log")
    # The rerun resumed: what the first run finished was Cached.
    for stage in ("prepare_data", "augment", "zoo", "plan_memory", "select_family"):
        assert re.search(rf"Task run '{stage}-\w+' - Finished in state Cached", second), stage

    # A run to its end (shorter LoRA runs) leaves nothing outside the artifacts directory either.
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress", "--set",
                           "lora.epochs=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _everything_under(home) == [] and _everything_under(tmp) == []
