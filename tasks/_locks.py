"""Stage locks on the artifacts volume: two runs of one config compute each stage once, and a dead run's lock expires.

Prefect's SERIALIZABLE isolation takes a lock on a task's cache key before it
looks the key up, so the second of two concurrent runs waits for the first to
commit and then reads its record (the task run is Cached) instead of computing
the stage again. Prefect's ``FileSystemLockManager`` is used with three changes:

- Expiry. Prefect's transactions take their locks with no hold timeout, so a
  lock file left by a killed process would block every later run forever. Here
  a lock is a lease: it expires ``lease_seconds`` after it was taken, and a
  thread of the holder renews it while the stage runs. A SIGKILLed run stops
  renewing, and its lock expires within one lease; on the machine (and in the
  PID namespace) where it ran, it is free at once, since its process is gone.
- Atomic take-over. Checking a lock file and writing one are two steps; they
  run under an ``flock`` on ``<lock dir>/.mutex`` (held for microseconds and
  released by the kernel if its process dies), so two waiters that both see an
  expired lock cannot both take it, and lock files are replaced whole.
- Nested keys. ftflow's cache keys are paths (``<stage>/<key>/prefect-result.json``),
  so a lock's parent directories are created on demand.
- Read-only artifacts. When the lock directory cannot be written (a finished
  artifacts directory shared read-only, a read-only mount), a lock is granted
  without a lock file and a warning says so: this process cannot write a stage's
  outputs or record either, so it can only read what is committed there, and
  the report of a fully cached run can still be produced. A stage that has to
  be computed fails at its first write (``ftflow run`` then says to copy the
  directory).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Optional

from prefect.locking.filesystem import FileSystemLockManager

from ftflow.artifacts import DISK_FULL_ERRNOS, disk_full
from ftflow.errors import UserError

logger = logging.getLogger("ftflow.tasks")

LEASE_ENV = "FTFLOW_LOCK_LEASE_S"
DEFAULT_LEASE_SECONDS = 60.0
POLL_SECONDS = 0.2
WRITE_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)


_WARNED_READ_ONLY: set[Path] = set()


class _LockDirectoryReadOnly(Exception):
    """The lock directory cannot be written."""


def lease_seconds_from_env() -> float:
    """How long a stage lock outlives its last renewal (``FTFLOW_LOCK_LEASE_S``, default 60 s)."""
    value = float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_SECONDS))
    if value <= 0:
        raise ValueError(f"{LEASE_ENV} must be > 0 seconds, got {value}")
    return value


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _process_start(pid: int) -> Optional[str]:
    """The start time of a running process (clock ticks since boot), None if it is gone or a zombie (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command) "
    return None if fields[0] == "Z" else fields[19]


def _this_process() -> Optional[dict]:
    """What identifies this process to another one on the same kernel and PID namespace (Linux only)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return {"boot_id": boot_id, "pid_namespace": pid_namespace, "pid": os.getpid(),
            "start": _process_start(os.getpid())}


def _holder_is_gone(process: Optional[dict]) -> bool:
    """True only when the lock's process ran here (same boot, same PID namespace) and no longer runs."""
    here = _this_process()
    if not process or here is None:
        return False
    if (process.get("boot_id"), process.get("pid_namespace")) != (here["boot_id"], here["pid_namespace"]):
        return False  # another machine or container: only the lease tells
    return _process_start(int(process["pid"])) != process.get("start")  # gone, a zombie, or the pid reused


class LeasedFileLockManager(FileSystemLockManager):
    """A ``FileSystemLockManager`` whose locks are renewed leases that expire when their holder dies."""

    def __init__(self, lock_files_directory: Path, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        super().__init__(Path(lock_files_directory))
        self.lease_seconds = float(lease_seconds)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._renewers: dict[str, threading.Event] = {}
        self._renew_guard = threading.Lock()
        self._unlocked: dict[str, str] = {}  # key -> holder, granted without a file (read-only directory)

    # Task options are copied and pickled (Dask ships tasks to other processes): threads and
    # events are per process and start empty there.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_renewers", "_renew_guard", "_unlocked"):
            state.pop(name, None)
        state["_locks"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, LeasedFileLockManager) and other.lock_files_directory == self.lock_files_directory
                and other.lease_seconds == self.lease_seconds)

    def __hash__(self) -> int:
        return hash((self.lock_files_directory, self.lease_seconds))

    # -- the lock file ------------------------------------------------------------------

    @contextmanager
    def _mutex(self) -> Iterator[None]:
        try:
            self.lock_files_directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_files_directory / ".mutex", "a")
        except OSError as exc:
            if exc.errno in WRITE_REFUSED:
                raise _LockDirectoryReadOnly(str(exc)) from exc
            raise
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self, key: str) -> Optional[dict]:
        """The lock's holder and expiration, or None when there is no live lock."""
        path = self._lock_path_for_key(key)
        try:
            raw = path.read_bytes()
            modified = path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
            expiration = info.get("expiration")
            info["expiration"] = datetime.fromisoformat(expiration) if expiration else None
        except (ValueError, AttributeError):
            # Not written by this manager (or torn): treat it as a lease taken when the file was written.
            info = {"holder": None, "expiration": None}
        if info["expiration"] is None:
            info["expiration"] = datetime.fromtimestamp(modified, timezone.utc) + timedelta(seconds=self.lease_seconds)
        if info["expiration"] <= _now() or _holder_is_gone(info.get("process")):
            return None
        info["path"] = path
        return info

    def _write(self, key: str, holder: str, hold_seconds: float) -> None:
        path = self._lock_path_for_key(key)
        body = {"holder": holder, "expiration": (_now() + timedelta(seconds=hold_seconds)).isoformat(),
                "host": os.uname().nodename, "process": _this_process()}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(body), encoding="utf-8")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk_full("a stage lock", self.lock_files_directory, exc) from exc
            raise
        os.replace(tmp, path)

    def _remove_empty_parents(self, path: Path) -> None:
        # Under the mutex, so no lock is being written into a directory removed here.
        for parent in path.parents:
            if parent == self.lock_files_directory or self.lock_files_directory not in parent.parents:
                return
            try:
                parent.rmdir()
            except OSError:  # not empty
                return

    # -- LockManager protocol ------------------------------------------------------------

    def acquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                     hold_timeout: Optional[float] = None) -> bool:
        """Take the lock, waiting while another live holder has it; renew it until released.

        With ``hold_timeout`` the lock is held that long and not renewed (Prefect's own meaning).
        """
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            try:
                with self._mutex():
                    current = self._read(key)
                    if current is None or current["holder"] == holder:
                        self._write(key, holder, hold_timeout if hold_timeout is not None else self.lease_seconds)
                        break
            except _LockDirectoryReadOnly as exc:
                self._grant_read_only(key, holder, exc)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        if hold_timeout is None:
            self._start_renewing(key, holder)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: Optional[float] = None,
                            hold_timeout: Optional[float] = None) -> bool:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        """Release the lock if ``holder`` still has it (a lease lost to expiry is only logged)."""
        if self._unlocked.pop(key, None) is not None:
            return
        self._stop_renewing(key)
        with self._mutex():
            current = self._read(key)
            if current is not None and current["holder"] == holder:
                path = self._lock_path_for_key(key)
                path.unlink(missing_ok=True)
                self._remove_empty_parents(path)
                return
        logger.warning("lock %s was no longer held by this run when released (its lease had expired)", key)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        return self._read(key) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        if self._unlocked.get(key) == holder:
            return True
        current = self._read(key)
        return current is not None and current["holder"] == holder

    def wait_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: Optional[float] = None) -> bool:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)

    def _grant_read_only(self, key: str, holder: str, exc: Exception) -> None:
        self._unlocked[key] = holder
        if self.lock_files_directory not in _WARNED_READ_ONLY:  # once per directory, not once per stage
            _WARNED_READ_ONLY.add(self.lock_files_directory)
            logger.warning("the lock directory %s is not writable (%s): stages are read without locks; a stage "
                           "that is not cached cannot be computed here (its outputs could not be written either)",
                           self.lock_files_directory, exc)

    # -- renewal ------------------------------------------------------------------------

    def _start_renewing(self, key: str, holder: str) -> None:
        with self._renew_guard:
            if key in self._renewers:
                return
            stop = self._renewers[key] = threading.Event()
        thread = threading.Thread(target=self._renew, args=(key, holder, stop), daemon=True,
                                  name=f"ftflow-lock-renewer[{key}]")
        thread.start()

    def _stop_renewing(self, key: str) -> None:
        with self._renew_guard:
            stop = self._renewers.pop(key, None)
        if stop is not None:
            stop.set()

    def _renew(self, key: str, holder: str, stop: threading.Event) -> None:
        # Three renewals per lease: one late wake-up on a busy machine does not lose the lock.
        while not stop.wait(self.lease_seconds / 3):
            with self._mutex():
                if stop.is_set():
                    return
                current = self._read(key)
                if current is None or current["holder"] != holder:
                    logger.warning("lock %s expired before it was renewed; another run may take it", key)
                    return
                try:
                    self._write(key, holder, self.lease_seconds)
                except (OSError, UserError) as exc:  # a full disk: the next renewal tries again
                    logger.warning("lock %s could not be renewed: %s", key, exc)
