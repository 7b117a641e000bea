"""Stage locks in an artifacts directory that cannot be written (a finished study shared read-only)."""

from __future__ import annotations

import builtins
import errno
import logging
import os

import pytest

from tasks._locks import LeasedFileLockManager

KEY = "evaluate/0123456789abcdef0123/prefect-result.json"


def test_a_read_only_lock_directory_grants_locks_without_files_and_says_so(tmp_path, monkeypatch, caplog):
    locks_dir = tmp_path / "artifacts" / ".locks"
    locks_dir.mkdir(parents=True)
    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):  # root ignores mode bits: refuse as a read-only mount
        if str(file).startswith(str(locks_dir)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only_open)
    caplog.set_level(logging.WARNING, logger="ftflow.tasks")
    first, second = (LeasedFileLockManager(locks_dir, lease_seconds=30) for _ in range(2))
    assert first.acquire_lock(KEY, "run-a", acquire_timeout=1)
    assert first.is_lock_holder(KEY, "run-a") and not first.is_lock_holder(KEY, "run-b")
    assert second.acquire_lock("zoo/abc/prefect-result.json", "run-a", acquire_timeout=1)
    first.release_lock(KEY, "run-a")
    assert not first.is_lock_holder(KEY, "run-a")
    assert list(locks_dir.iterdir()) == []  # nothing was written
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"the lock directory {locks_dir} is not writable ([Errno 30] Read-only file system: "
                        f"'{locks_dir / '.mutex'}'): stages are read without locks; a stage that is not cached "
                        "cannot be computed here (its outputs could not be written either)"]


def test_other_lock_directory_errors_are_not_taken_for_read_only(tmp_path):
    blocker = tmp_path / "artifacts"
    blocker.write_text("a file where the directory should be")
    locks = LeasedFileLockManager(blocker / ".locks", lease_seconds=30)
    with pytest.raises(NotADirectoryError):  # a real problem: not silently lock-free
        locks.acquire_lock(KEY, "run-a", acquire_timeout=1)
