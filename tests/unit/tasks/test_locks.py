"""Stage locks: one holder at a time, renewed while held, expired when the holder is killed."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tasks._locks import LeasedFileLockManager

REPO = Path(__file__).resolve().parents[3]
KEY = "benchmark/0123456789abcdef0123/prefect-result.json"


@pytest.mark.slow
def test_second_holder_waits_until_the_first_releases(tmp_path):
    locks = LeasedFileLockManager(tmp_path / ".locks", lease_seconds=30)
    assert locks.acquire_lock(KEY, "run-a")
    assert locks.is_locked(KEY) and locks.is_lock_holder(KEY, "run-a") and not locks.is_lock_holder(KEY, "run-b")
    assert not locks.acquire_lock(KEY, "run-b", acquire_timeout=0.5)
    locks.release_lock(KEY, "run-a")
    assert not locks.is_locked(KEY)
    assert locks.acquire_lock(KEY, "run-b", acquire_timeout=0.5)
    locks.release_lock(KEY, "run-b")
    # Nested keys get directories while locked; nothing is left behind after release.
    assert list((tmp_path / ".locks").iterdir()) == [tmp_path / ".locks" / ".mutex"]


@pytest.mark.slow  # waits out leases (seconds)
def test_a_held_lock_is_renewed_past_its_lease(tmp_path):
    holder = LeasedFileLockManager(tmp_path, lease_seconds=0.6)
    other = LeasedFileLockManager(tmp_path, lease_seconds=0.6)
    assert holder.acquire_lock(KEY, "run-a")
    try:
        time.sleep(2.0)  # over three leases: only renewal keeps it
        assert other.is_locked(KEY)
        assert not other.acquire_lock(KEY, "run-b", acquire_timeout=0.5)
    finally:
        holder.release_lock(KEY, "run-a")
    assert other.acquire_lock(KEY, "run-b", acquire_timeout=1)
    other.release_lock(KEY, "run-b")


HOLD_AND_SLEEP = """
import sys, time
from pathlib import Path
from tasks._locks import LeasedFileLockManager
locks = LeasedFileLockManager(Path(sys.argv[1]), lease_seconds=float(sys.argv[2]))
assert locks.acquire_lock(sys.argv[3], "killed-run")
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # waits out leases (seconds)
def test_the_lock_of_a_killed_process_on_this_machine_is_free_once_it_is_gone(tmp_path):
    lease = 1.5
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_SLEEP, str(tmp_path), str(lease), KEY], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        locks = LeasedFileLockManager(tmp_path, lease_seconds=lease)
        # Alive, it renews: the lock holds for longer than one lease.
        assert not locks.acquire_lock(KEY, "next-run", acquire_timeout=2 * lease)
        holder.send_signal(signal.SIGKILL)
        # Not yet reaped (a zombie) or gone: either way its lock is free, without waiting for the lease.
        assert locks.acquire_lock(KEY, "next-run", acquire_timeout=30)
        assert locks.is_lock_holder(KEY, "next-run")
        locks.release_lock(KEY, "next-run")
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.slow  # waits out leases (seconds)
def test_a_lock_taken_on_another_machine_holds_until_its_lease_expires(tmp_path):
    locks = LeasedFileLockManager(tmp_path, lease_seconds=30)
    path = locks._lock_path_for_key(KEY)
    path.parent.mkdir(parents=True)
    elsewhere = {"boot_id": "another-machine", "pid_namespace": "pid:[1]", "pid": 1, "start": "1"}
    expiration = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    path.write_text(json.dumps({"holder": "remote-run", "expiration": expiration.isoformat(), "process": elsewhere}))
    assert locks.is_locked(KEY)  # its process is not visible from here: only the lease tells
    assert locks.acquire_lock(KEY, "next-run", acquire_timeout=30)  # once the lease has run out
    assert datetime.now(timezone.utc) >= expiration
    locks.release_lock(KEY, "next-run")


@pytest.mark.parametrize("body", [
    {"holder": "gone", "expiration": str(datetime.now(timezone.utc) - timedelta(hours=1))},  # Prefect's format
    None,  # torn or foreign file: counts as taken when written, expires a lease later
])
@pytest.mark.slow
def test_stale_lock_files_are_taken_over(tmp_path, body):
    locks = LeasedFileLockManager(tmp_path, lease_seconds=0.5)
    path = locks._lock_path_for_key(KEY)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(body) if body else "", encoding="utf-8")
    assert locks.acquire_lock(KEY, "next-run", acquire_timeout=10)
    assert json.loads(path.read_text())["holder"] == "next-run"
    locks.release_lock(KEY, "next-run")
    assert not path.exists()


def test_pickled_copy_shares_the_lock_files_but_not_the_renewers(tmp_path):
    locks = LeasedFileLockManager(tmp_path, lease_seconds=30)
    assert locks.acquire_lock(KEY, "run-a")
    copy = pickle.loads(pickle.dumps(locks))
    assert copy == locks and copy._renewers == {}
    assert copy.is_lock_holder(KEY, "run-a")
    locks.release_lock(KEY, "run-a")
    assert not copy.is_locked(KEY)


@pytest.mark.slow
def test_release_after_losing_the_lease_does_not_remove_the_new_holders_lock(tmp_path):
    slow = LeasedFileLockManager(tmp_path, lease_seconds=0.3)
    assert slow.acquire_lock(KEY, "run-a", hold_timeout=0.3)  # a fixed hold, not renewed
    time.sleep(0.5)
    other = LeasedFileLockManager(tmp_path, lease_seconds=30)
    assert other.acquire_lock(KEY, "run-b", acquire_timeout=1)
    slow.release_lock(KEY, "run-a")  # logged, not raised
    assert other.is_lock_holder(KEY, "run-b")
    other.release_lock(KEY, "run-b")
