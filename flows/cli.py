"""The ``ftflow`` command line."""

from __future__ import annotations

import argparse
import copy
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from flows import DEFAULT_CONFIG
from ftflow.artifacts import disk_full, disk_full_cause
from ftflow.config import ConfigError, Overrides, PipelineConfig, load_checked_config, load_config
from ftflow.errors import UserError


def parse_overrides(pairs: list[str]) -> Overrides:
    """``["distill.alpha=0.3", "teacher.epochs=1"]`` -> nested mapping (values parsed as YAML), which remembers
    each ``--set`` as typed (so a problem in one is said to come from it)."""
    merged: dict = {}
    given: dict[tuple[str, ...], str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set distill.alpha=0.3")
        dotted, raw = pair.split("=", 1)
        node = merged
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--set {pair!r}: the value {raw!r} is not valid YAML ({problem}); quote a string "
                              "(--set 'name=\"my study\"') and close lists ([8, 16])") from None
        given[tuple(dotted.strip().split("."))] = pair
    return Overrides(merged, given)


def _load_checked(path: str, overrides: dict | None = None) -> PipelineConfig:
    """The config, validated, with every path it names checked (all problems in one ConfigError)."""
    return load_checked_config(path, overrides)


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (made if missing); root ignores mode bits, so try it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"the artifacts directory {directory} cannot be created ({exc.strerror}); set "
                        "artifacts_dir to a writable place (in the config, or --set artifacts_dir=DIR)") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".ftflow-write-probe-", dir=directory)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return False
        raise
    os.close(handle)
    os.unlink(probe)
    return True


def _copy_hint(artifacts: Path, config: str) -> str:
    copy = Path(tempfile.gettempdir()) / f"{artifacts.name}-copy"
    return (f"copy it somewhere writable and run there: cp -r {artifacts} {copy} && "
            f"ftflow run {config} --set artifacts_dir={copy}")


def _is_write_refused(exc: BaseException) -> bool:
    """Whether a failed run failed because a write was refused (in the exception chain, or in a summary's text)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return "PermissionError" in text or "Read-only file system" in text


def _hide_user_error_tracebacks() -> None:
    """Prefect's console logs show a user error's message without its traceback (the UI keeps it)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in logging.root.manager.loggerDict]
    for handler in {h for lg in loggers for h in getattr(lg, "handlers", ()) if isinstance(h, PrefectConsoleHandler)}:
        if not isinstance(handler.formatter, _WithoutUserTracebacks):
            handler.setFormatter(_WithoutUserTracebacks(handler.formatter or logging.Formatter()))


class _WithoutUserTracebacks(logging.Formatter):
    """Wraps a formatter: records carrying a :class:`UserError` or an interruption are formatted without the
    traceback (an interruption's is the interrupted code's, not a fault)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and (isinstance(record.exc_info[1], UserError) or _interruption_of(record.exc_info[1])):
            record = copy.copy(record)  # the same record goes on to the UI's handler, traceback and all
            record.exc_info, record.exc_text = None, None
        return self.inner.format(record)


@contextmanager
def _prefect_api(then: Callable[[], object] = lambda: None) -> Iterator[None]:
    """The configured Prefect API, or a temporary server that ends with this process (flows/server.py).

    ``then`` runs while the server boots (the heavy imports), before the wait for it. With the temporary
    server, nothing of the run stays outside its artifacts directory: the server's database, Prefect's local
    result storage and (set by :func:`_command_folder`) matplotlib's and torch inductor's caches live in the
    server's temporary home, the command's folder, removed when the run ends, or by the server if this process
    is killed.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    if PREFECT_API_URL.value():
        then()
        yield
        return
    from flows.server import temporary_server

    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 180)
    with temporary_server(_COMMAND_FOLDER, client_home=_PrefectHome.created) as server:
        # Library caches are already in the command's folder, which is the server's home (_command_folder).
        with _environment({"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(server.storage)}):
            then()
            url = server.wait_ready(max(timeout, 60.0))
            print(f"ftflow: Prefect API of this run: {url} (a temporary server, stopped when the run ends)",
                  file=sys.stderr, flush=True)
            # Threads and processes Prefect starts read the environment; this thread reads the settings context.
            with _environment({"PREFECT_API_URL": url}), temporary_settings(
                    updates={PREFECT_API_URL: url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: server.storage}):
                try:
                    yield
                finally:
                    _drain_prefect_workers()


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block, restored after it."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- Ctrl-C and SIGTERM ----------------------------------------------------------------------------------------

INTERRUPT_GRACE_S = 5.0  # for the run to record how it stopped, before it is cut short
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run got SIGINT (Ctrl-C) or SIGTERM (``timeout``, a job scheduler): it stops where it is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interruption_of(exc: BaseException | None) -> Optional[int]:
    """The signal an exception stands for (ours, Ctrl-C's KeyboardInterrupt, Prefect's TerminationSignal), or None."""
    if isinstance(exc, Interrupted):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if type(exc).__name__ == "TerminationSignal":  # prefect.exceptions, not imported for this
        return getattr(exc, "signal", signal.SIGTERM)
    return None


class _StopOnSignals:
    """SIGINT and SIGTERM stop ``ftflow run`` with one line, exit 128 + the signal's number and no traceback.

    The first signal raises :class:`Interrupted` in the main thread, so the run unwinds and Prefect records the
    flow run as crashed (Prefect's own SIGTERM handler, installed while a flow runs, raises its
    TerminationSignal there instead, then hands the signal on to this handler). A training run in a worker
    thread cannot be interrupted, and unwinding waits for it: a watchdog that sees every signal through
    ``signal.set_wakeup_fd`` (whoever's handler is installed) ends the process :data:`INTERRUPT_GRACE_S`
    after the signal if it is still there, as does a second signal at once. A run cut short is SIGKILL's
    case, which ftflow is made for: finished stages are recorded, unfinished ones leave no finished-looking
    directory, and an interrupted training run resumes from its last checkpoint; the temporary Prefect
    server ends with this process.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.stopped: list[str] = []  # the stages being computed when the signal came
        self.raised = False
        self.unwound = threading.Event()
        self._said = threading.Lock()
        self._previous: dict[int, object] = {}
        self._wakeup: Optional[tuple[socket.socket, socket.socket]] = None
        self._previous_wakeup_fd = -1

    def __enter__(self) -> "_StopOnSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        reader, writer = socket.socketpair()
        reader.setblocking(True)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(reader,), name="ftflow-signal-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._wakeup is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._wakeup[1].close()  # the watchdog's read returns: it ends, unless a signal already came

    def _received(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            stages = sys.modules.get("tasks._stage")  # not imported yet: nothing is being computed
            self.stopped = stages.computing() if stages is not None else []

    def _handle(self, signum: int, frame) -> None:
        self._received(signum)
        if self.raised:  # a second signal: stop now
            self.exit_now()
        self.raised = True
        raise Interrupted(signum)

    def _watch(self, reader: socket.socket) -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            received = [b for b in data if b in STOP_SIGNALS]
            if received:
                self._received(received[0])
                if not self.unwound.wait(INTERRUPT_GRACE_S):
                    self.exit_now()
                return

    def say(self, signum: int) -> None:
        """Print the one line that says what was interrupted and how to resume (once, whoever calls it)."""
        if not self._said.acquire(blocking=False):
            return
        where = f" while computing {', '.join(self.stopped)}" if self.stopped else ""
        print(f"ftflow: interrupted by {signal.Signals(signum).name}{where}; finished stages are cached, so "
              "running the same command again resumes the run (an interrupted training run continues from its "
              "last checkpoint)", file=sys.stderr, flush=True)

    def exit_now(self) -> None:
        """Say so and end the process at once (a worker thread may still be training: it is cut short)."""
        signum = self.signum or signal.SIGTERM
        self.say(signum)
        sys.stdout.flush()
        _PrefectHome.forget()
        _remove_command_folder()
        os._exit(128 + signum)


_STOP: Optional[_StopOnSignals] = None  # the run's, while ``ftflow run`` runs


def _drain_prefect_workers(timeout_s: float = 10.0) -> None:
    """Send the logs and events still queued to the server before it stops (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception as exc:  # best effort: the run's result does not depend on its last log lines
            print(f"ftflow: could not send the last {worker.__name__} items to the server: {exc}", file=sys.stderr)


def _cached_status(cfg: PipelineConfig):
    """What is cached for ``cfg`` (:func:`ftflow.stages.status.pipeline_status`), or None when that cannot be told."""
    from ftflow.stages.status import pipeline_status

    try:
        return pipeline_status(cfg)
    except Exception as exc:  # the check is a shortcut only: whatever stops it, the real run decides
        print(f"ftflow: could not check the cache beforehand ({type(exc).__name__}: {exc}); starting the run",
              file=sys.stderr)
        return None


def _hub_check(cfg: PipelineConfig, *, stop_when_none_left: bool) -> tuple[object, dict[str, str]]:
    """The hub check of the config's hub ids (:func:`ftflow.models.hub.check_candidates`), one ``ftflow:`` line per
    model it leaves out; with ``stop_when_none_left``, refused when no candidate is left."""
    from ftflow.models import hub

    report, problems = hub.check_candidates(cfg.models)
    if stop_when_none_left:
        hub.require_a_usable_candidate(cfg.models, problems)
    for line in hub.check_notes(report, problems):
        print(f"ftflow: {line}", file=sys.stderr)
    return report, problems


def _check_disk(cfg: PipelineConfig, report, problems: dict[str, str], status, source: str) -> None:
    """Say the downloads a study needs and refuse to start it when a file system lacks the disk
    (:func:`ftflow.plan.disk.run_disk`)."""
    from ftflow.plan import disk

    plan = disk.run_disk(cfg, report, problems, status.cached_labels if status is not None else ())
    if plan is None:
        return
    if plan.download_bytes:
        print(f"ftflow: {plan.lines()[0]}", file=sys.stderr)
    disk.refuse_short_disk(plan, source)


def _run(args: argparse.Namespace) -> int:
    global _STOP
    _PrefectHome.note()
    try:
        with _StopOnSignals() as _STOP:
            return _run_pipeline(args)
    finally:
        _PrefectHome.forget()


class _PrefectHome:
    """Importing Prefect creates its home folder (``~/.prefect``); a run whose server was its own leaves none."""

    created: Optional[Path] = None

    @classmethod
    def note(cls) -> None:
        """Call before Prefect is imported: the home that import would create, if it does not exist yet."""
        home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
        cls.created = None if "prefect" in sys.modules or home.exists() else home

    @classmethod
    def forget(cls) -> None:
        """Remove the home Prefect created during this run (the run used its own server).

        Whatever is in it was written by this run's Prefect client, after the temporary server's settings were
        restored (a worker thread still finishing an interrupted stage writes its result under the default
        storage): it is removed with the folder, unless a user file appeared there meanwhile. A run that is
        killed cannot: its temporary server does (flows/server.py).
        """
        from flows.server import remove_created_prefect_home

        home, cls.created = cls.created, None
        remove_created_prefect_home(home)


_COMMAND_FOLDER: Optional[Path] = None  # the command's temporary folder while it runs (see _command_folder)


@contextmanager
def _command_folder() -> Iterator[None]:
    """A temporary folder for the command, removed when it ends: library caches, and a run's Prefect server.

    Importing bitsandbytes makes torch inductor's ``<tmp>/torchinductor_<user>``; matplotlib caches its fonts
    under HOME. Each goes to this folder unless the user set ``TORCHINDUCTOR_CACHE_DIR`` or ``MPLCONFIGDIR``, so
    a command leaves nothing outside the artifacts directory whichever path imports them. A run's temporary
    Prefect server makes it its home, and removes it if this process is killed (flows/server.py); a run stopped
    by a signal removes it before it exits (:func:`_remove_command_folder`).
    """
    global _COMMAND_FOLDER
    names = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "MPLCONFIGDIR": "matplotlib"}
    unset = {name: folder for name, folder in names.items() if not os.environ.get(name)}
    _COMMAND_FOLDER = Path(tempfile.mkdtemp(prefix="ftflow-"))
    try:
        with _environment({name: str(_COMMAND_FOLDER / folder) for name, folder in unset.items()}):
            yield
    finally:
        _remove_command_folder()


def _remove_command_folder() -> None:
    global _COMMAND_FOLDER
    folder, _COMMAND_FOLDER = _COMMAND_FOLDER, None
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _run_pipeline(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    cfg = _load_checked(args.config, overrides)  # fail fast, before Prefect starts
    report, problems = _hub_check(cfg, stop_when_none_left=True)
    status = _cached_status(cfg)
    # Every stage cached: the results are on disk already, and a Prefect run would only record that (--record).
    if not args.record and status is not None and status.nothing_to_run:
        print("ftflow: nothing to run, every stage is cached (`ftflow status` lists them); the results below are "
              "read from disk and no Prefect run is recorded (--record for one)", file=sys.stderr)
        return _print_results(status.evaluation, cfg, args.config)
    read_only = not _writable(cfg.artifacts_dir)
    if read_only:
        print(f"ftflow: the artifacts directory {cfg.artifacts_dir} is not writable: the run reads what is cached "
              "there (without stage locks) and fails if a stage has to be computed", file=sys.stderr)
    else:
        _check_disk(cfg, report, problems, status, args.config)

    def prepare() -> None:
        if args.no_progress:  # also the libraries' own bars (loading and writing weights, datasets maps)
            import datasets
            import transformers

            transformers.utils.logging.disable_progress_bar()
            datasets.disable_progress_bars()
        import flows.pipeline  # noqa: F401  torch, transformers, Prefect's engine: while the server boots

        if not args.debug:
            _hide_user_error_tracebacks()

    with _prefect_api(then=prepare):
        from flows.pipeline import pipeline

        try:
            evaluation = pipeline(config_path=str(Path(args.config).resolve()), overrides=overrides,
                                  progress=not args.no_progress)
        except Exception as exc:
            if isinstance(exc, UserError):
                raise
            if (cause := disk_full_cause(exc)) is not None or "No space left on device" in str(exc):
                # A write outside a stage's own (Prefect's record, a lock): the stages' outputs are as they were.
                raise disk_full("the run's outputs", cfg.artifacts_dir,
                                cause or OSError(errno.ENOSPC, "No space left on device")) from exc
            if read_only and _is_write_refused(exc):
                raise UserError(
                    f"the run had to compute a stage, but the artifacts directory {cfg.artifacts_dir} is not "
                    "writable (every stage writes its outputs, its Prefect cache record and its lock there); "
                    f"{_copy_hint(cfg.artifacts_dir, args.config)}\n  cause: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
            raise
    return _print_results(evaluation, cfg, args.config)


def _print_results(evaluation: dict, cfg: PipelineConfig, config: str = "CONFIG") -> int:
    """The answer, the leaderboard, where the report is, and the models or runs without a result (exit 1 if any)."""
    from ftflow.study.recommend import evaluation_answer
    from ftflow.study.report import failure_summary

    report = Path(evaluation["dir"]) / evaluation["files"]["report"]
    print()
    if answer := evaluation_answer(evaluation, config):
        print(answer)
    print((Path(evaluation["dir"]) / evaluation["files"]["leaderboard_md"]).read_text(encoding="utf-8"))
    print(f"report: {report}")
    print(f"artifacts: {cfg.artifacts_dir}")
    failed = failure_summary(evaluation)
    if failed:
        print(f"\n{len(failed)} model(s) or run(s) have no result (details in the report):")
        for line in failed:
            print(f"  - {line}")
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    from ftflow.stages.status import pipeline_status, status_text
    from ftflow.study.recommend import evaluation_answer

    cfg = _load_checked(args.config, parse_overrides(args.set))
    _hub_check(cfg, stop_when_none_left=False)  # the models a run would leave out, one line each
    status = pipeline_status(cfg)
    if status.evaluation is not None and (answer := evaluation_answer(status.evaluation, args.config)):
        print(answer)  # a finished run: its answer first
    print(status_text(args.config, status), end="")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ftflow.models import hub

    bad = 0
    for path in args.configs:
        try:
            cfg = _load_checked(path)
            # Online, hub ids are asked of the hub too (exists, gated, token); offline only their form is checked.
            refused = hub.refused_by_the_hub(cfg.models)
            if refused:
                raise ConfigError(f"{path} has {len(refused)} problem(s):\n" + "\n".join(
                    f"  - models ({name}): {problem}" for name, problem in refused.items()))
        except ConfigError as exc:
            bad += 1
            print(f"ftflow: {exc}", file=sys.stderr)
            continue
        print(f"{path}: ok")
        if args.show:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    if bad:
        print(f"ftflow: {bad} of {len(args.configs)} config(s) have problems", file=sys.stderr)
    return 2 if bad else 0


def _plan(args: argparse.Namespace) -> int:
    from ftflow.plan import tables as plan_tables
    from ftflow.plan.candidates import plan_candidates
    from ftflow.plan.predict import GB

    cfg = load_config(args.config)
    if not cfg.models:
        print("ftflow plan: this config builds its models (zoo:) when it runs; plan a config with a models: "
              "list (hub ids or directories), e.g. configs/seed-20gb.yaml", file=sys.stderr)
        return 2
    candidates = plan_candidates(cfg, device=args.device, budget_gb=args.budget_gb, max_length=args.max_length,
                                 batch_size=args.batch_size)
    out = Path(args.out) if args.out else cfg.artifacts_dir / "plan"
    out.mkdir(parents=True, exist_ok=True)
    frame = plan_tables.write_plan(candidates.plans, candidates.budget_bytes, out)
    print(f"memory plan for {args.config}: budget {candidates.budget_bytes / GB:g} GB, {candidates.device}, "
          f"sequences of {candidates.max_length} tokens (worst case unless --max-length)\n")
    print(plan_tables.plan_markdown(frame))
    for plan in candidates.plans:
        print(f"- {plan.name}: {plan.reason}")
    for problem in candidates.problems:
        print(f"- {problem}", file=sys.stderr)
    print(f"\nwritten: {out}/plan.csv, plan.md, plan.png")
    problems = candidates.problems + _plan_training(cfg, args, candidates, out)
    return 1 if problems else 0


def _plan_training(cfg: PipelineConfig, args: argparse.Namespace, candidates, out: Path) -> list[str]:
    """Every training run the config implies (:func:`ftflow.plan.study.write_training_plan`); then the disk the
    study needs."""
    from ftflow.plan.candidates import plan_training
    from ftflow.plan.disk import size_text, study_disk
    from ftflow.plan.study import write_training_plan

    study = plan_training(cfg, candidates, args.family)
    if not study.runs:
        return study.problems
    print(write_training_plan(cfg, study, out, args.gpu, args.utilization))
    disk = study_disk(cfg, candidates.report, study)
    print(f"\ndisk: {size_text(disk.total_bytes)} for the whole study")
    for line in disk.lines():
        print(f"- {line}")
    for line in disk.shortfalls():
        print(f"- NOT ENOUGH: {line}; `ftflow run` will refuse to start")
    return study.problems


def _export(args: argparse.Namespace) -> int:
    from ftflow.stages.status import finished_evaluation
    from ftflow.study.export import export_run

    positional = list(args.what)
    if len(positional) > 2:
        raise UserError(f"export takes at most CONFIG and RUN, got {len(positional)} arguments: {positional}")
    config = str(DEFAULT_CONFIG)
    if positional and (positional[0].endswith((".yaml", ".yml")) or Path(positional[0]).is_file()):
        config = positional.pop(0)
    name = positional[0] if positional else None
    cfg = _load_checked(config, parse_overrides(args.set))
    evaluation = finished_evaluation(cfg, config)
    exported = export_run(evaluation, Path(args.to), name, device=args.device,
                          cuda_margin_gb=cfg.memory.cuda_margin_gb)
    print(f"exported {exported.name} ({exported.kind}) to {exported.directory}: {exported.how}")
    print("load it:")
    for line in exported.load:
        print(f"  {line}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from ftflow.study.init_config import next_commands, write_config

    models, directory = list(args.models), args.directory
    if directory is None and len(models) > 1:  # `--models ID... DIR`: --models took DIR too
        directory = models.pop()
    if directory is None:
        raise UserError("init needs DIR, the new directory for the config: ftflow init --train FILE --test FILE "
                        "[--models demo|seed|HUB_ID...] DIR")
    path, cfg, notes = write_config(Path(directory), Path(args.train), Path(args.test), models, args.budget_gb)
    print(f"wrote {path}: every field at its documented default, validated")
    for note in notes:
        print(f"- {note}")
    print("next:")
    for number, command in enumerate(next_commands(path, cfg), 1):
        print(f"  {number}. {command}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftflow", description="Which base model, method and precision give the "
                                     "lowest perplexity on your test set within your memory budget.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the whole pipeline (default config: the offline demo)")
    run.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/demo.yaml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set distill.alpha=0.3 (repeatable)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--record", action="store_true", help="start a Prefect run even when every stage is cached "
                     "(its task runs show Cached, the UI gets the report); without it such a run prints the "
                     "results from disk")
    run.set_defaults(handler=_run)
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of user "
                     "errors too (also in Prefect's console logs)")
    plan = commands.add_parser("plan", help="predict each model's peak memory and choose its precision, loading nothing")
    plan.add_argument("config", help="YAML config with a models: list")
    plan.add_argument("--budget-gb", type=float, help="memory budget in GB (default: the config's memory_budget_gb)")
    plan.add_argument("--max-length", type=int, help="tokens per sequence to plan for (default: the config's)")
    plan.add_argument("--batch-size", type=int, help="fixed evaluation batch size (default: the largest that fits)")
    plan.add_argument("--device", choices=["cuda", "cpu"], help="where the models will run (default: from config)")
    plan.add_argument("--out", help="folder for plan.csv/md/png (default: <artifacts_dir>/plan)")
    from ftflow.plan.study import DEFAULT_GPU, DEFAULT_UTILIZATION, GPU_PEAK_TFLOPS

    plan.add_argument("--gpu", choices=sorted(GPU_PEAK_TFLOPS), default=DEFAULT_GPU,
                      help=f"GPU whose peak the training time is estimated on (default: {DEFAULT_GPU})")
    plan.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION,
                      help=f"share of the GPU's peak the runs reach (default: {DEFAULT_UTILIZATION})")
    plan.add_argument("--family", help="plan the training runs as if this family were selected (default: the "
                      "family of the largest model)")
    plan.set_defaults(handler=_plan)
    plan.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    status = commands.add_parser("status", help="what a run would do: each stage cached, or to run and why")
    status.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML config (default: "
                        "configs/demo.yaml)")
    status.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as for run (repeatable)")
    status.set_defaults(handler=_status)
    status.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    export = commands.add_parser("export", help="write a finished run's model (default: the recommended one) as a "
                                 "standalone checkpoint")
    export.add_argument("what", nargs="*", metavar="[CONFIG] [RUN]", help="YAML config (default: configs/demo.yaml) "
                        "and the leaderboard name of the model to export (default: the recommended one)")
    export.add_argument("--to", required=True, metavar="DIR", help="new or empty directory to write")
    export.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the model is merged (default: cpu; its weights must fit there)")
    export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="the overrides the run was made with (repeatable)")
    export.set_defaults(handler=_export)
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    init = commands.add_parser("init", help="write a config for your own data, every field at its default")
    init.add_argument("directory", nargs="?", metavar="DIR", help="new or empty directory for ftflow.yaml (and the "
                      "artifacts)")
    init.add_argument("--train", required=True, metavar="FILE", help="training sentences (.txt, .jsonl, .csv)")
    init.add_argument("--test", required=True, metavar="FILE", help="test sentences (same formats)")
    init.add_argument("--models", nargs="+", default=["demo"], metavar="demo|seed|HUB_ID",
                      help="candidate models: demo (the offline zoo, default), seed (the study's hub models), or "
                      "hub ids / model directories")
    init.add_argument("--budget-gb", type=float, help="GPU memory budget in GB (default: the config's default, 20)")
    init.set_defaults(handler=_init)
    init.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    validate = commands.add_parser("validate", help="check config files without running anything")
    validate.add_argument("configs", nargs="+", help="YAML configs")
    validate.add_argument("--show", action="store_true", help="print the resolved config")
    validate.set_defaults(handler=_validate)
    validate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error (config, data, paths) is one ``ftflow:`` line and exit 2 (``--debug``: traceback)."""
    from ftflow.plan.budget import use_expandable_segments

    use_expandable_segments()  # before anything can start CUDA (the caching allocator reads it once)
    args = build_parser().parse_args(argv)
    try:
        with _command_folder():
            return args.handler(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"ftflow: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        signum = _interruption_of(exc)
        if signum is None or args.debug:
            raise
        if _STOP is None:  # not a run: nothing to resume
            print(f"ftflow: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
            return 128 + signum
        _STOP.unwound.set()
        _STOP.say(_STOP.signum or signum)
        # Anything still running (a training run in a worker thread, which no exception reaches) stops here.
        sys.stdout.flush()
        _PrefectHome.forget()
        _remove_command_folder()
        os._exit(128 + (_STOP.signum or signum))


if __name__ == "__main__":
    sys.exit(main())
