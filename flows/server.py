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
- The parent stops it (SIGTERM, then SIGKILL) when the run ends, however it ends.

Runs against a configured server (``prefect server start``, workers, Prefect
Cloud) are unaffected: the CLI only starts this one when no API URL is set.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARENT_POLL_S = 0.25
GRACE_S = 5.0  # the server's own shutdown (lifespan, open requests) before it is cut short
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What Prefect's own temporary server runs with: no UI, only the services an ephemeral server needs.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class ServerStartError(RuntimeError):
    """The temporary Prefect server did not come up; the message has its exit code and how to proceed."""


class TemporaryServer:
    """A started server: its API URL, and a wait for its first healthy answer."""

    def __init__(self, child: subprocess.Popen, port: int) -> None:
        self.child = child
        self.url = f"http://127.0.0.1:{port}/api"

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


@contextmanager
def temporary_server() -> Iterator[TemporaryServer]:
    """Start a Prefect API server in a child process for the duration of the block, stopped when it ends.

    The server boots while the caller goes on (imports, config checks); call
    :meth:`TemporaryServer.wait_ready` before the first API call.

    Yields:
        The server; its ``url`` is ``http://127.0.0.1:<port>/api``.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    env = {**os.environ, **SERVER_ENV}
    env.pop("PREFECT_API_URL", None)
    # The child imports this module by name: from where this copy of ftflow lives, whatever the cwd.
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    child = subprocess.Popen(
        [sys.executable, "-m", "flows.server", "--fd", str(listener.fileno()), "--parent", str(os.getpid())],
        env=env, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL,
    )
    listener.close()  # the child has its own copy
    try:
        yield TemporaryServer(child, port)
    finally:
        _stop(child)


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=GRACE_S + 5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# -- the child ---------------------------------------------------------------------------------


def _end_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` does, even if the parent is SIGKILLed."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            print(f"ftflow server: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); the watchdog "
                  "alone stops this server if its parent dies", file=sys.stderr)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown (a second one when PDEATHSIG came first)
        time.sleep(GRACE_S)
        os._exit(1)

    # Started before the server, and checked once after prctl: a parent that died before prctl took
    # effect is seen here (its child was re-parented, so getppid() differs).
    threading.Thread(target=watch, name="ftflow-server-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Child entry point: serve Prefect's API app on the inherited socket until the parent goes."""
    parser = argparse.ArgumentParser(prog="python -m flows.server")
    parser.add_argument("--fd", type=int, required=True, help="listening socket inherited from the parent")
    parser.add_argument("--parent", type=int, required=True, help="pid of the process this server lives for")
    args = parser.parse_args(argv)
    _end_with_parent(args.parent)
    import uvicorn

    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, lifespan="on", log_level="error")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
