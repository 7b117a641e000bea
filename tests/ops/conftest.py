"""A real ``prefect server start`` (SQLite, own PREFECT_HOME, free loopback port) for the operations tests,
and one nightly-deployment run of the micro config through a process worker, shared by the deploy and UI tests.

Every process started here runs in its own process group and is stopped at teardown, whatever happened.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.flows.micro import micro_config

REPO = Path(__file__).resolve().parents[2]
POOL = "ftflow-local"
SERVER_START_S = 180
RUN_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start a process in its own process group, output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen | None, grace_s: float = 20) -> None:
    """Stop a process started by ``start`` and everything in its process group."""
    if process is None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            # The group may outlive its leader (a flow-run child): make sure it is gone too.
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
        break


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class OpsServer:
    """A running Prefect server and the environment of processes that talk to it."""

    url: str
    home: Path
    log: Path
    env: dict[str, str] = field(repr=False)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            with get_client(sync_client=True) as client:
                yield client

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``prefect <args>`` against this server from the repository root; fail with its output."""
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done


@pytest.fixture(scope="session")
def ops_server(tmp_path_factory) -> Iterator[OpsServer]:
    """``prefect server start`` on a free loopback port with SQLite under a temporary PREFECT_HOME."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    server_env = dict(
        base,
        PREFECT_HOME=str(root / "server-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'server-home' / 'prefect.db'}",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=f"{url}/api",  # what the UI in the browser calls
        # Runs are triggered by the tests; the nightly cron must not add runs of its own.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    client_env = dict(base, PREFECT_HOME=str(root / "client-home"), PREFECT_API_URL=f"{url}/api")
    log = root / "server.log"
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   server_env, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, f"prefect server exited ({server.returncode}):\n{tail(log)}"
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy after {SERVER_START_S} s:\n{tail(log)}"
            time.sleep(0.5)
        yield OpsServer(url=url, home=root, log=log, env=client_env)
    finally:
        stop(server)


def wait_for_task_runs(client: SyncPrefectClient, flow_run_id: UUID, timeout_s: float = 60) -> list:
    """The flow run's task runs once every one has a final state (they reach the server as events)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if runs and all(run.state is not None and run.state.is_final() for run in runs):
            return runs
        if time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


# Takes the first stage's lock for a config exactly as a run does (same task options, same key), renews it
# while it lives, and prints the lock file's path.
HOLD_FIRST_STAGE_LOCK = """
import sys, time
from ftflow.config import load_config
from tasks._stage import with_storage
from tasks.prepare_data import prepare_data
cfg = load_config(sys.argv[1])
out = str(cfg.artifacts_dir)
task = with_storage(prepare_data, out)
key = task.cache_policy.compute_key(None, {"data": cfg.data, "artifacts_dir": out}, {})
assert task.cache_policy.lock_manager.acquire_lock(key, "killed-run")
print(task.cache_policy.lock_manager._lock_path_for_key(key), flush=True)
time.sleep(600)
"""
HOLDER_LEASE_S = 5
# Two pipeline runs and a benchmark-only run of one config, at once (nightly has a concurrency limit of 1).
DEPLOYMENTS_RUN = ("ftflow-pipeline/nightly", "ftflow-pipeline/demo", "ftflow-benchmark/benchmark-only")


@dataclass
class DeployedRuns:
    """Runs of three deployments on one micro config, started together by one worker, finished."""

    runs: dict[str, UUID]  # deployment name -> flow run id
    config: Path
    deploy_output: str
    worker_log: Path
    lock_file: Path  # the stage lock a killed process left in the runs' way
    blocked_while_held: bool  # no run finished that stage while its holder lived

    @property
    def artifacts(self) -> Path:
        return self.config.parent / "artifacts"


@pytest.fixture(scope="session")
def deployed_runs(ops_server: OpsServer, tmp_path_factory) -> Iterator[DeployedRuns]:
    """Create the work pool, deploy prefect.yaml, and run three deployments on one micro config at once.

    A process holds the first stage's lock, as a run computing it would, while the runs start; once they
    all run (and wait on it), it is SIGKILLed: its lock must not block them.
    """
    ops_server.cli("work-pool", "create", POOL, "--type", "process")
    deploy = ops_server.cli("deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml"))
    config = micro_config(tmp_path_factory.mktemp("deployed-micro"))
    worker_log = ops_server.home / "worker.log"
    holder = worker = None
    try:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_FIRST_STAGE_LOCK, str(config)], cwd=REPO,
                                  env={**ops_server.env, "FTFLOW_LOCK_LEASE_S": str(HOLDER_LEASE_S)},
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        lock_file = Path(holder.stdout.readline().strip())
        assert lock_file.is_file(), "the lock holder did not start"
        parameters = {"config_path": str(config), "progress": False}
        with ops_server.client() as client:
            runs = {name: client.create_flow_run_from_deployment(client.read_deployment_by_name(name).id,
                                                                 parameters=parameters).id
                    for name in DEPLOYMENTS_RUN}
        # One poll, then the worker waits for the runs it picked up (side by side) to finish and exits.
        worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                        "--run-once"], ops_server.env, worker_log)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            with ops_server.client() as client:
                states = [client.read_flow_run(run_id).state for run_id in runs.values()]
            if all(state is not None and (state.is_running() or state.is_final()) for state in states):
                break
            assert worker.poll() is None and time.monotonic() < deadline, f"{states}\n{tail(worker_log)}"
            time.sleep(0.5)
        time.sleep(HOLDER_LEASE_S)  # a whole lease: only the holder's renewals keep the runs waiting
        prepared = config.parent / "artifacts" / "prepare_data"
        blocked = not (prepared.is_dir() and any(not p.name.startswith(".") for p in prepared.iterdir()))
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        try:
            worker.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not finish the runs in {RUN_TIMEOUT_S} s:\n{tail(worker_log)}")
        with ops_server.client() as client:
            for name, run_id in runs.items():
                state = client.read_flow_run(run_id).state
                assert state is not None and state.is_final(), f"{name} not finished ({state}):\n{tail(worker_log)}"
        yield DeployedRuns(runs=runs, config=config, deploy_output=deploy.stdout, worker_log=worker_log,
                           lock_file=lock_file, blocked_while_held=blocked)
    finally:
        stop(holder)
        stop(worker)
