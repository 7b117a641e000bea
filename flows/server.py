"""A temporary Prefect API server for one ``ftflow run`` that cannot outlive the process that started it.

With no ``PREFECT_API_URL`` configured, Prefect starts its own temporary server
(``SubprocessASGIServer``: uvicorn in a child process, about 230 MB) and stops it
at exit; a run killed with SIGKILL cannot stop it, and the server stays up as an
orphan. ``ftflow run`` therefore starts the same server itself, here:

- The listening socket is bound by the parent (port 0: the kernel picks a free
  port, no race with another process) and handed to the child, so the API is up
  as soon as the child accepts on it.
- The child ends with its parent: on Linux the kernel sends it SIGTERM when the
  parent dies (``PR_SET_PDEATHSIG``), and on every platform a watchdog thread
  polls the parent and shuts the server down (forcibly after a grace period) as
  soon as it is gone.
- The parent stops it by closing a pipe the child watches (its lifeline; a dead
  parent's end closes too), then SIGKILL if it lingers, when the run ends,
  however it ends. SIGINT and SIGTERM sent to the child while its parent lives
  (Ctrl-C reaches the whole process group; ``timeout`` and job schedulers signal
  every process of the job) are ignored: the run, which got them too, still
  needs its server to record how it stopped, and stops it afterwards.
- Nothing of it stays outside the run: its SQLite database, and the result
  storage of the run that uses it, are in a temporary directory
  (:attr:`TemporaryServer.home`) that is removed when the server stops (by the
  child itself when its parent was killed). So is the Prefect home the run's
  client created by importing Prefect (``~/.prefect``, when there was none), which
  a killed run cannot remove itself (:func:`remove_created_prefect_home`).

Runs against a configured server (``prefect server start``, workers, Prefect
Cloud) are unaffected: the CLI only starts this one when no API URL is set.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

PARENT_POLL_S = 0.25
GRACE_S = 5.0  # the server's own shutdown (lifespan, open requests) before it is cut short
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What Prefect's own temporary server runs with: no UI, only the services an ephemeral server needs.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not come up; the message has its exit code and how to proceed."""


class TemporaryServer:
    """A started server: its API URL, its temporary Prefect home, and a wait for its first healthy answer."""

    def __init__(self, child: subprocess.Popen, port: int, home: Path) -> None:
        self.child = child
        self.url = f"http://127.0.0.1:{port}/api"
        self.home = home
        self.storage = home / "storage"  # Prefect's local result storage for the run that uses this server

    def wait_ready(self, timeout_s: float = 180.0) -> str:
        """Wait until the API answers its health check (a busy machine needs tens of seconds: database
        migrations, block registration); return the API URL."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.child.poll() is not None:
                raise ServerStartError(f"the temporary Prefect server exited with code {self.child.returncode} "
                                       "before it answered (see its output above); or start one yourself "
                                       "(`prefect server start`) and set PREFECT_API_URL")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServerStartError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s; on a busy "
                               "machine start one yourself (`prefect server start`) and set PREFECT_API_URL")


# What a user's own Prefect setup keeps in a Prefect home (a profile, `prefect server start`'s database): a home
# holding one is never removed.
USER_FILES = ("profiles.toml", "prefect.db")


def remove_created_prefect_home(home: Optional[Path]) -> None:
    """Remove a Prefect home the run's client created (importing Prefect makes ``~/.prefect``), with what that
    client wrote there, unless a user file (:data:`USER_FILES`) appeared there meanwhile."""
    if home is None or not home.is_dir() or any((home / name).exists() for name in USER_FILES):
        return
    shutil.rmtree(home, ignore_errors=True)


@contextmanager
def temporary_server(home: Optional[Path] = None, client_home: Optional[Path] = None) -> Iterator[TemporaryServer]:
    """Start a Prefect API server in a child process for the duration of the block, stopped when it ends.

    The server boots while the caller goes on (imports, config checks); call
    :meth:`TemporaryServer.wait_ready` before the first API call.

    Yields:
        The server; its ``url`` is ``http://127.0.0.1:<port>/api``; its ``home`` (database, result storage)
        is removed when the block ends.

    Args:
        home: an existing empty folder to use as its home (the command's own temporary folder, so the server
            removes it if this process dies); default: a new temporary one.
        client_home: the Prefect home this process's import of Prefect created, if it did: the server removes it
            if this process dies (:func:`remove_created_prefect_home`); this process removes it otherwise.
    """
    home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="ftflow-prefect-"))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    lifeline, keep_alive = os.pipe()  # the child reads; this process holds the write end until it stops the server
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "flows.server", "--fd", str(listener.fileno()), "--parent", str(os.getpid()),
             "--lifeline", str(lifeline), "--home", str(home)]
            + (["--client-home", str(client_home)] if client_home is not None else []),
            env=server_environment(home), pass_fds=(listener.fileno(), lifeline), stdin=subprocess.DEVNULL,
        )
    except BaseException:
        os.close(keep_alive)
        shutil.rmtree(home, ignore_errors=True)
        raise
    finally:
        listener.close()  # the child has its own copies
        os.close(lifeline)
    try:
        yield TemporaryServer(child, port, home)
    finally:
        _stop(child, keep_alive)
        shutil.rmtree(home, ignore_errors=True)


def server_environment(home: Path) -> dict[str, str]:
    """The temporary server's environment: no UI, and its state (SQLite database, memo store) under ``home``.

    The user's Prefect profile still applies, except its database: a temporary server never writes into the
    database configured for ``prefect server start``.
    """
    from prefect.settings import PREFECT_PROFILES_PATH

    env = {**os.environ, **SERVER_ENV}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    env.update(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(PREFECT_PROFILES_PATH.value()),
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    # The child imports this module by name: from where this copy of ftflow lives, whatever the cwd.
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _stop(child: subprocess.Popen, keep_alive: int) -> None:
    os.close(keep_alive)  # the child's lifeline ends: it shuts down
    try:
        child.wait(timeout=GRACE_S + 5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


# -- the child ---------------------------------------------------------------------------------


class _Stop:
    """Why the child stops: its parent asked (the lifeline closed) or is gone; other SIGINT/SIGTERM are ignored."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self.requested = threading.Event()

    def parent_gone(self) -> bool:
        return os.getppid() != self.parent_pid

    def wanted(self) -> bool:
        return self.requested.is_set() or self.parent_gone()


def _remove_after_parent(home: Optional[Path], client_home: Optional[Path]) -> None:
    """What a dead parent would have removed: the server's temporary home, and the Prefect home its client made."""
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)
    remove_created_prefect_home(client_home)


def _end_with_parent(stop: _Stop, lifeline: Optional[int], home: Optional[Path],
                     client_home: Optional[Path] = None) -> None:
    """Make this process end when its parent closes ``lifeline`` or dies, even if the parent is SIGKILLed; then
    remove ``home``, and the Prefect home the parent's client created (``client_home``), if the parent is gone
    (it cannot any more)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            print(f"ftflow server: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); the watchdog "
                  "alone stops this server if its parent dies", file=sys.stderr)

    def watch() -> None:
        while not stop.parent_gone():
            if lifeline is not None and select.select([lifeline], [], [], PARENT_POLL_S)[0]:
                if not os.read(lifeline, 1):  # end of file: the parent closed it, or died
                    break
            elif lifeline is None:
                time.sleep(PARENT_POLL_S)
        stop.requested.set()
        # The run has said all it had to; what a server says while it stops (cancelled services, a lifespan
        # cut short when its parent died) is noise after the run's last line.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown (a second one when PDEATHSIG came first)
        time.sleep(GRACE_S)
        if stop.parent_gone():
            _remove_after_parent(home, client_home)
        os._exit(1)

    # Started before the server, and checked once after prctl: a parent that died before prctl took
    # effect is seen here (its child was re-parented, so getppid() differs).
    threading.Thread(target=watch, name="ftflow-server-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Child entry point: serve Prefect's API app on the inherited socket until the parent goes."""
    parser = argparse.ArgumentParser(prog="python -m flows.server")
    parser.add_argument("--fd", type=int, required=True, help="listening socket inherited from the parent")
    parser.add_argument("--parent", type=int, required=True, help="pid of the process this server lives for")
    parser.add_argument("--lifeline", type=int, help="read end of a pipe whose end of file means: stop")
    parser.add_argument("--home", type=Path, help="temporary Prefect home, removed here if the parent died")
    parser.add_argument("--client-home", type=Path,
                        help="the Prefect home the parent's client created, removed here if the parent died")
    args = parser.parse_args(argv)
    stop = _Stop(args.parent)

    # Until uvicorn takes the signals over (and after it hands them back): a SIGINT or SIGTERM meant for the
    # whole run is the run's to handle; one that means this server must stop ends it.
    def starting(sig: int, frame) -> None:
        if stop.wanted():
            sys.exit(0)

    signal.signal(signal.SIGINT, starting)
    signal.signal(signal.SIGTERM, starting)
    _end_with_parent(stop, args.lifeline, args.home, args.client_home)
    try:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                # Not recorded as a captured signal: uvicorn would raise it again once stopped, killing this
                # process before it cleans up. Never forced (PDEATHSIG and the watchdog may both signal): the
                # watchdog ends a shutdown that takes too long.
                if stop.wanted():
                    self.should_exit = True

        sock = socket.socket(fileno=args.fd)
        config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, lifespan="on",
                                log_level="error")
        Server(config).run(sockets=[sock])
    finally:
        if stop.parent_gone():  # nobody else is left to remove them
            _remove_after_parent(args.home, args.client_home)
    # Stopped: end now, as uvicorn does by raising the signal again, rather than wait for threads its services
    # leave behind (seconds).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
