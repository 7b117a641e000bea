"""Issue 25's reliability battery, run as a new user would: the ``ftflow`` CLI in subprocesses on a finished run.

    python bench/reliability_battery.py [--quick] [--out DIR] [--keep]

A temporary folder holds a project (the config and its data) and an empty ``HOME`` and ``TMPDIR`` that every
command gets, with ``HF_TOKEN`` set to a marker value, ``HF_HUB_OFFLINE=1`` and no ``PREFECT_API_URL`` (each run
starts its own temporary Prefect server). The config is ``configs/demo.yaml``, or with ``--quick`` the flow
tests' micro config (``tests/flows/micro.py``) with one run per method, as ``tests/flows/test_cache_integrity.py``
keeps it. Its first ``ftflow run`` computes every stage; then, case by case (the issue's numbering, "clean" for
the cases it found clean):

1. the finished artifacts copied elsewhere and the original deleted: ``ftflow status`` and ``ftflow run`` there
   find every stage cached (``--record``: every Prefect task run Cached) and print the same report;
2. a hub id with a typo, offline: one ``ftflow:`` line, exit 2, in seconds;
3. a full disk: a fresh run with its artifacts on a small tmpfs (mounted in a user namespace, ``unshare -Urm``:
   no root needed), sized below the finished run's: one ``ftflow:`` line, exit 2, no unfinished output left;
4. nothing written under ``HOME`` (an empty folder for every command), nor in ``TMPDIR``, and the real
   ``~/.prefect`` untouched;
5. no copy of WordNet in the artifacts (their size, and no WordNet file in them);
6. ``ftflow validate`` all at once with the issue's examples;
7. SIGTERM, then SIGINT, mid-training (a checkpoint written): one line each, exit 143 and 130, no traceback,
   and the run after each resumes from the interrupted run's checkpoint;

clean: SIGKILL mid-training, then a rerun to the end gives the same leaderboard as an uninterrupted run of the
same command on a copy, and leaves no process of the run behind; a truncated manifest, a deleted model file and
flipped bytes each recompute exactly their stage run; two runs at once compute each stage run once; bad data and
a bad config give one ``ftflow:`` line; the ``HF_TOKEN`` marker appears in no file under any artifacts directory
and in no command's output.

Prints a Markdown table (case | what was done | expected | observed | verdict) and writes it with every
command's output under ``--out`` (default: a ``battery-<time>`` folder in the temporary folder's parent, kept).
Exit 1 when a case fails.

Measured here (2-core CPU shared with other jobs): ``--quick`` in 20 minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.processes import marked_processes  # noqa: E402

MARKER_VARIABLE = "FTFLOW_BATTERY_MARKER"
CLI = [sys.executable, "-m", "flows.cli"]  # the `ftflow` console script's main, in this checkout
TASK_STATE = re.compile(r"Task run '([^']+)' - Finished in state (\w+)")
WORDNET_FILES = {"data.noun", "index.noun", "index.sense", "lexnames", "data.verb"}


# -- the table and its verdicts (pure; tests/unit/bench/test_reliability_battery.py) ------------------------------

@dataclass
class Case:
    """One row of the battery's table."""

    case: str
    done: str
    expected: str
    observed: str = ""
    verdict: str = "FAIL"  # PASS, FAIL, or SKIP (could not be run here: the reason is in ``observed``)


def markdown_table(cases: list[Case]) -> str:
    """The battery's table: one row per case, cells on one line with their pipes escaped."""
    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| case | what was done | expected | observed | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {cell(c.case)} | {cell(c.done)} | {cell(c.expected)} | {cell(c.observed)} | {c.verdict} |"
              for c in cases]
    return "\n".join(lines)


def task_states(output: str) -> dict[str, list[str]]:
    """{task run name: [final state names]} from a run's console output (Prefect's "Finished in state" lines)."""
    states: dict[str, list[str]] = {}
    for name, state in TASK_STATE.findall(output):
        states.setdefault(name, []).append(state)
    return states


def computed(output: str) -> set[str]:
    """The task runs a run computed (finished in a state other than Cached); ``publish`` (which records the
    run's artifacts in Prefect, every run) left out."""
    return {name for name, states in task_states(output).items()
            if not name.startswith("publish") and any(s != "Cached" for s in states)}


@dataclass
class Result:
    """A finished command."""

    argv: list[str]
    returncode: int
    output: str  # stdout and stderr together, as a terminal shows them
    seconds: float


def one_line_error(result: Result, returncode: int) -> tuple[bool, str]:
    """Whether ``result`` failed as a user error should: exit ``returncode``, no traceback, and its error one
    ``ftflow:`` message that ends the output (a message may list its problems on indented lines below it).

    Returns:
        (verdict, what was observed: exit status, seconds and the message, shortened).
    """
    text = result.output.rstrip()
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("ftflow: ")]
    # `ftflow validate` ends with a count ("1 of 1 config(s) have problems") after each file's message.
    while len(starts) > 1 and re.match(r"ftflow: \d+ of \d+ config\(s\) have problems", lines[starts[-1]]) and \
            all(line.startswith((" ", "\t")) for line in lines[starts[-2] + 1:starts[-1]]):
        starts = starts[:-1]
    last = starts[-1] if starts else None
    tail_ok = last is not None and all(line.startswith((" ", "\t")) or not line.strip() or
                                       re.match(r"ftflow: \d+ of \d+ config\(s\) have problems", line)
                                       for line in lines[last + 1:])
    message = " / ".join(line.strip() for line in lines[last:]) if last is not None else "(no ftflow: line)"
    traceback = "Traceback (most recent call last)" in text
    ok = result.returncode == returncode and tail_ok and not traceback
    observed = (f"exit {result.returncode}, {result.seconds:.1f} s" + (", a traceback" if traceback else "")
                + f": {shorten(message)}")
    return ok, observed


def shorten(text: str, limit: int = 220) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def leaderboard_of(output: str) -> str:
    """The leaderboard table a finished ``ftflow run`` prints (its header opens with ``| rank``); empty without."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| rank ")), None)
    if start is None:
        return ""
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def report_path_of(output: str) -> Optional[Path]:
    found = re.search(r"^report: (.+)$", output, flags=re.M)
    return Path(found.group(1)) if found else None


# -- running the CLI -------------------------------------------------------------------------------------------

@dataclass
class Battery:
    """The battery's folders, environment and config; every command it runs is logged under ``out``."""

    work: Path
    out: Path
    quick: bool
    token: str = field(default_factory=lambda: f"hf_battery{uuid.uuid4().hex}")
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    outputs: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home, self.tmp, self.project = self.work / "home", self.work / "tmp", self.work / "project"
        for folder in (self.home, self.tmp, self.project, self.out):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PREFECT_API_URL", "PREFECT_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR",
                                 "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME")}
        self.env.update({"HOME": str(self.home), "TMPDIR": str(self.tmp), "HF_TOKEN": self.token,
                         "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), MARKER_VARIABLE: self.marker,
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        self.config = self._write_config()

    def _write_config(self) -> Path:
        import yaml

        if self.quick:
            from tests.flows.micro import micro_config

            path = micro_config(self.project)
            raw = yaml.safe_load(path.read_text())
            # One run per method (LoRA, full fine-tuning, distillation), as tests/flows/test_cache_integrity.py.
            for section, values in {"lora": {"r": [2]}, "qlora": {"enabled": False},
                                    "prefix": {"enabled": False}, "distill": {"top_k": [2]}}.items():
                raw[section].update(values)
        else:
            raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
            raw["artifacts_dir"] = "artifacts"
            path = self.project / "demo.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    def command(self, args: list[str], label: str, *, env: Optional[dict] = None, timeout: float = 3600,
                prefix: Optional[list[str]] = None) -> Result:
        """Run ``ftflow ARGS`` (or ``PREFIX`` then it) to its end; its output is logged under ``label``."""
        argv = prefix if prefix is not None else CLI + args
        start = time.monotonic()
        done = subprocess.run(argv, cwd=self.project, env=env or self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        return self._logged(Result(argv, done.returncode, done.stdout, time.monotonic() - start), label)

    def _logged(self, result: Result, label: str) -> Result:
        self.outputs.append(result)
        (self.out / f"{len(self.outputs):02d}-{label}.log").write_text(
            "$ " + " ".join(result.argv) + f"\n# exit {result.returncode}, {result.seconds:.1f} s\n" + result.output,
            encoding="utf-8")
        print(f"  [{result.seconds:6.1f} s] exit {result.returncode:3d}  {label}", flush=True)
        return result

    def stopped(self, args: list[str], label: str, until: Callable[[str], bool], signum: int,
                whole_group: bool = True, timeout: float = 1800) -> Result:
        """Start ``ftflow ARGS``, send ``signum`` once ``until(output so far)`` holds (to its process group, as
        ``timeout``, a scheduler or Ctrl-C do; or to the run's process alone), and wait for it to end."""
        log = self.work / f"{label}.running.log"
        start = time.monotonic()
        with open(log, "w") as sink:
            run = subprocess.Popen(CLI + args, cwd=self.project, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            while not until(log.read_text()):
                if run.poll() is not None or time.monotonic() - start > timeout:
                    break
                time.sleep(0.2)
            time.sleep(2.0)  # well into the training run, not at its first line
            if run.poll() is None:
                if whole_group:
                    os.killpg(run.pid, signum)
                else:
                    run.send_signal(signum)
            run.wait(timeout=120)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        return self._logged(Result(CLI + args, run.returncode, log.read_text(), time.monotonic() - start), label)

    def processes_left(self, settle_s: float = 15.0) -> dict[int, str]:
        """{pid: command line} of live processes started by the battery's commands, after up to ``settle_s``."""
        deadline = time.monotonic() + settle_s
        while True:
            found = marked_processes(self.marker, MARKER_VARIABLE)
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def everything_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


def du_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime ns)} of everything under ``directory`` (empty when it does not exist)."""
    if not directory.exists():
        return {}
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in [directory, *directory.rglob("*")]
            if not p.is_symlink()}


def checkpoints(artifacts: Path) -> list[Path]:
    """Checkpoints of unfinished training runs."""
    return sorted((artifacts / "train").glob(".*.work/trainer/checkpoint-*"))


# -- the cases -------------------------------------------------------------------------------------------------

def run_battery(battery: Battery) -> list[Case]:
    from ftflow.artifacts import read_json, resolved_paths

    b = battery
    cases: list[Case] = []
    real_prefect = Path(os.path.expanduser("~")) / ".prefect"
    real_prefect_before = snapshot(real_prefect)
    config = str(b.config)
    original = b.project / "artifacts"

    print("cold run", flush=True)
    cold = b.command(["run", config, "--no-progress"], "cold-run")
    if cold.returncode != 0:
        return [Case("setup", f"`ftflow run {b.config.name}` (cold)", "exit 0", f"exit {cold.returncode}: "
                     + shorten(cold.output[-600:]), "FAIL")]
    report = report_path_of(cold.output)
    report_text = report.read_text(encoding="utf-8") if report else ""
    finished_bytes = du_bytes(original)
    home_after_cold, tmp_after_cold = everything_under(b.home), everything_under(b.tmp)

    # 5. WordNet
    wordnet = [p for p in original.rglob("*") if p.name in WORDNET_FILES or "wordnet" in p.name.lower()]
    cases.append(Case("5 WordNet not copied", f"du of the finished run's artifacts; files named as WordNet's "
                      f"({', '.join(sorted(WORDNET_FILES))}) or *wordnet*",
                      "no WordNet file; the artifacts far below WordNet's 28 MB",
                      f"{finished_bytes / 2**20:.1f} MiB in all, {len(wordnet)} WordNet file(s)"
                      + (f": {wordnet[:3]}" if wordnet else ""),
                      "PASS" if not wordnet and finished_bytes < 28 * 2**20 else "FAIL"))

    # 1. copy, delete the original, rerun
    print("1 copied artifacts", flush=True)
    copy = b.work / "elsewhere" / "artifacts-copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    at_copy = ["--set", f"artifacts_dir={copy}"]
    status = b.command(["status", config, *at_copy], "copy-status")
    rows = [line for line in status.output.splitlines() if re.match(r"^(cached|will run|after)\s", line)]
    not_cached = [line for line in rows if not line.startswith("cached")]
    outside = [line for line in rows if line.startswith("cached") and str(copy.resolve()) not in line
               and str(copy) not in line]
    again = b.command(["run", config, "--no-progress", *at_copy], "copy-run")
    shown = report_path_of(again.output)
    same_report = shown is not None and shown.is_file() and shown.read_text(encoding="utf-8") == report_text
    recorded = b.command(["run", config, "--no-progress", "--record", *at_copy], "copy-run-recorded")
    recorded_states = task_states(recorded.output)
    # Nothing printed in the copy may send the user to the deleted original (a load line, the report, a model).
    naming_original = [r for r in (status, again, recorded) if str(original) in r.output]
    ok = (not naming_original and status.returncode == 0 and rows and not not_cached and not outside and again.returncode == 0
          and "nothing to run, every stage is cached" in again.output and same_report
          and shown is not None and copy.resolve() in shown.parents and recorded.returncode == 0
          and recorded_states and computed(recorded.output) == set())
    cases.append(Case(
        "1 artifacts copied, original deleted",
        "cp -r the finished artifacts elsewhere, rm -r the original; `ftflow status`, `ftflow run` and "
        "`ftflow run --record` with `--set artifacts_dir=COPY`",
        "every stage cached (status, run, and every Prefect task run Cached); the same report, in the copy; no "
        "output names the deleted original",
        f"status: {len(rows) - len(not_cached)} of {len(rows)} stage runs cached"
        + (f" ({len(outside)} outside the copy)" if outside else "")
        + f"; run: exit {again.returncode}, " + ("nothing to run" if "nothing to run" in again.output else "ran")
        + f", report {'in the copy, identical' if same_report else 'DIFFERENT: ' + str(shown)}; --record: exit "
        f"{recorded.returncode}, {sum(s == ['Cached'] for s in recorded_states.values())} of "
        f"{len(recorded_states)} task runs Cached, computed {sorted(computed(recorded.output)) or 'none'}; "
        f"{len(naming_original)} of the 3 outputs name the deleted original"
        + (": " + shorten(next(line for line in naming_original[0].output.splitlines() if str(original) in line),
                          160) if naming_original else ""),
        "PASS" if ok else "FAIL"))

    # 7 + clean: SIGTERM, SIGINT, SIGKILL mid-training, then a rerun to the end, against an uninterrupted run
    print("7 signals", flush=True)
    # Long enough that a signal sent 2 s after the first checkpoint still finds that run training (a micro epoch
    # is a few steps: 30 epochs once lasted long enough, then ended within those 2 s once stages got faster).
    longer = ["--set", f"distill.epochs={200 if b.quick else 6}"]
    reference = b.work / "elsewhere" / "artifacts-reference"
    shutil.copytree(copy, reference)
    uninterrupted = b.command(["run", config, "--no-progress", *longer, "--set", f"artifacts_dir={reference}"],
                              "uninterrupted-reference")
    args = ["run", config, "--no-progress", *longer, *at_copy]

    def checkpoint_written(_: str) -> bool:
        return bool(checkpoints(copy))

    def resumed(output: str) -> bool:  # what a training run that resumes says in the run's log
        return ("found the work directory of an interrupted run, resuming from it" in output
                or re.search(r"resumed from checkpoint-\d+", output) is not None)

    for signum, label, until in ((signal.SIGTERM, "sigterm", checkpoint_written),
                                 (signal.SIGINT, "sigint", resumed)):
        had_checkpoint = bool(checkpoints(copy))
        result = b.stopped(args, label, until, signum)
        left = b.processes_left()
        ok, observed = one_line_error(result, 128 + signum)
        name = signal.Signals(signum).name
        line_ok = re.search(rf"^ftflow: interrupted by {name} while computing .*running the same command again "
                            "resumes the run", result.output, flags=re.M) is not None
        noise = [w for w in ("ConnectError", "Error logging to API") if w in result.output]
        resumed_here = resumed(result.output)
        ok = ok and line_ok and not noise and not left and (signum == signal.SIGTERM or resumed_here)
        cases.append(Case(
            f"7 {name} mid-training",
            f"`ftflow run` with {' '.join(longer[1:])} on the copy; {name} to its process group "
            + ("once a training checkpoint was written" if signum == signal.SIGTERM else
               "once the rerun said it resumed from the interrupted run's checkpoint"),
            f"exit {128 + signum}, one `ftflow: interrupted by {name} while computing ...` line naming how to "
            "resume, no traceback, no process left" + ("; this rerun resumed" if signum == signal.SIGINT else ""),
            observed + (f"; also {noise}" if noise else "") + (f"; {len(left)} process(es) left" if left else
                                                                 "; no process left")
            + (f"; resumed from a checkpoint: {resumed_here}" if signum == signal.SIGINT else
               f"; checkpoint written before: {had_checkpoint or bool(checkpoints(copy))}"),
            "PASS" if ok else "FAIL"))

    killed = b.stopped(args, "sigkill", resumed, signal.SIGKILL, whole_group=False)
    left = b.processes_left()
    tmp_left = everything_under(b.tmp)
    final = b.command(args, "after-sigkill")
    same = bool(leaderboard_of(final.output)) and leaderboard_of(final.output) == leaderboard_of(uninterrupted.output)
    ok = (killed.returncode == -signal.SIGKILL and not left and not tmp_left and final.returncode == 0
          and uninterrupted.returncode == 0 and resumed(final.output) and same)
    cases.append(Case(
        "clean: SIGKILL mid-training",
        "SIGKILL to the run's process (not its server) once it resumed training; then the same command to the end; "
        "compared with the same command run uninterrupted on a copy made before the signals",
        "no process of the run left, its server's temporary home gone; the rerun resumes and its leaderboard is "
        "identical",
        f"killed: {'no process left' if not left else f'{len(left)} process(es) left: {list(left.values())[:2]}'}"
        f", TMPDIR {'empty' if not tmp_left else tmp_left[:3]}; rerun: exit {final.returncode}, "
        f"resumed from a checkpoint: {resumed(final.output)}, leaderboard "
        + ("identical to the uninterrupted run's" if same else "DIFFERENT (see the logs)"),
        "PASS" if ok else "FAIL"))

    # clean: damaged outputs each recompute exactly their stage run
    print("clean: damage", flush=True)
    # The training runs of this command (the copy also holds those of the commands before the signals).
    listed = b.command(["status", config, *longer, *at_copy], "damage-status")
    runs: dict[str, dict] = {}
    for directory in re.findall(r"^cached\s+\S+\s+(\S+)\s*$", listed.output, flags=re.M):
        directory = Path(directory) if Path(directory).is_absolute() else b.project / directory
        if directory.parent.name == "train":
            manifest = resolved_paths(read_json(directory / "manifest.json"), copy.resolve())
            runs.setdefault(manifest["method"], manifest)
    distilled = Path(runs["distill"]["dir"])
    (distilled / "manifest.json").write_bytes((distilled / "manifest.json").read_bytes()[:200])
    (weights,) = (Path(runs["lora"]["dir"]) / "model").glob("*.safetensors")
    weights.unlink()
    flipped = Path(runs["full"]["dir"]) / "model" / "model.safetensors"
    if not flipped.is_file():
        (flipped,) = (Path(runs["full"]["dir"]) / "model").glob("*.safetensors")
    data = bytearray(flipped.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - v for v in data[middle:middle + 8])
    flipped.write_bytes(bytes(data))
    damaged = {runs["distill"]["title"], runs["lora"]["title"], runs["full"]["title"]}
    repair = b.command(["run", config, "--no-progress", *longer, *at_copy], "damaged-rerun")
    redone = computed(repair.output)
    moved_aside = len(list((copy / "train").glob(".*.corrupt-*")))
    ok = repair.returncode == 0 and redone == damaged and bool(leaderboard_of(repair.output)) and \
        leaderboard_of(repair.output) == leaderboard_of(final.output)
    cases.append(Case(
        "clean: damaged outputs",
        f"truncated the manifest of {runs['distill']['title']}, deleted the adapter weights of "
        f"{runs['lora']['title']}, flipped 8 bytes in the weights of {runs['full']['title']}; the same command",
        "exactly those three stage runs computed again (the rest Cached), the damaged ones kept aside, the same "
        "leaderboard",
        f"exit {repair.returncode}; computed {sorted(redone)}; {moved_aside} kept aside; leaderboard "
        + ("unchanged" if leaderboard_of(repair.output) == leaderboard_of(final.output) else "CHANGED"),
        "PASS" if ok else "FAIL"))

    # clean: two runs at once
    print("clean: two at once", flush=True)
    both = ["run", config, "--no-progress", *longer, "--set", "distill.alpha=0.3", *at_copy]
    predicted = b.command(["status", config, *both[3:]], "two-at-once-status")
    will_run = [line for line in predicted.output.splitlines() if re.match(r"^(will run|after)\s", line)]
    procs = []
    start = time.monotonic()
    for index in range(2):
        log = b.work / f"two-at-once-{index}.log"
        with open(log, "w") as sink:
            procs.append((subprocess.Popen(CLI + both, cwd=b.project, env=b.env, stdout=sink,
                                           stderr=subprocess.STDOUT), log))
    pair = []
    for index, (proc, log) in enumerate(procs):
        proc.wait(timeout=3600)
        pair.append(b._logged(Result(CLI + both, proc.returncode, log.read_text(), time.monotonic() - start),
                              f"two-at-once-{index}"))
    first, second = (computed(r.output) for r in pair)
    twice = first & second
    ok = (all(r.returncode == 0 for r in pair) and not twice and (first | second)
          and bool(leaderboard_of(pair[0].output)) and leaderboard_of(pair[0].output) == leaderboard_of(pair[1].output))
    cases.append(Case(
        "clean: two runs at once",
        "two `ftflow run --set distill.alpha=0.3` started together on the copy",
        "both exit 0 with the same leaderboard; each stage run computed by one of them only",
        f"exits {[r.returncode for r in pair]}; computed {len(first)} + {len(second)} stage runs "
        f"({len(first | second)} distinct; status predicted {len(will_run)} rows to run), {len(twice)} computed "
        f"twice{': ' + str(sorted(twice)) if twice else ''}; leaderboards "
        + ("identical" if leaderboard_of(pair[0].output) == leaderboard_of(pair[1].output) else "DIFFERENT"),
        "PASS" if ok else "FAIL"))

    # 3. a full disk
    print("3 full disk", flush=True)
    cases.append(full_disk_case(b, finished_bytes))

    # 2. a hub id with a typo, offline
    print("2 hub typo", flush=True)
    cases.append(hub_typo_case(b))

    # 6. validate all at once, and the small ones
    print("6 validate", flush=True)
    cases.extend(validate_cases(b))

    # clean: bad data and a bad config
    print("clean: bad data, bad config", flush=True)
    cases.extend(bad_input_cases(b))

    # 4. nothing under HOME, nothing in TMPDIR, ~/.prefect untouched (after every command above)
    home_after, tmp_after = everything_under(b.home), everything_under(b.tmp)
    real_after = snapshot(real_prefect)
    ok = not home_after_cold and not home_after and not tmp_after_cold and not tmp_after and \
        real_after == real_prefect_before
    cases.append(Case(
        "4 nothing outside artifacts_dir",
        f"every command above with HOME and TMPDIR empty folders of their own, no PREFECT_API_URL "
        f"({len(b.outputs)} commands, {sum('run' in r.argv for r in b.outputs)} of them `ftflow run`)",
        "HOME and TMPDIR still empty (no ~/.prefect, no prefect.db, no pickled exception, no cache); the real "
        "~/.prefect untouched",
        f"HOME: {len(home_after_cold)} entries after the cold run, {len(home_after)} at the end"
        + (f" {home_after[:4]}" if home_after else "") + f"; TMPDIR: {len(tmp_after)} at the end"
        + (f" {tmp_after[:4]}" if tmp_after else "")
        + f"; real ~/.prefect {'untouched' if real_after == real_prefect_before else 'CHANGED'}",
        "PASS" if ok else "FAIL"))

    # clean: HF_TOKEN nowhere
    token = b.token.encode()
    leaked_files = [str(p) for root in (copy, reference, b.work / "typo", b.work / "bad")
                    if root.exists() for p in root.rglob("*") if p.is_file() and token in p.read_bytes()]
    leaked_outputs = [r for r in b.outputs if b.token in r.output]
    cases.append(Case(
        "clean: HF_TOKEN never written",
        "HF_TOKEN set to a marker value for every command; searched every file of every artifacts directory and "
        "every command's output",
        "the marker nowhere",
        f"in {len(leaked_files)} file(s), {len(leaked_outputs)} output(s) of {len(b.outputs)}"
        + (f": {leaked_files[:3]}" if leaked_files else ""),
        "PASS" if not leaked_files and not leaked_outputs else "FAIL"))
    return cases


def full_disk_case(b: Battery, finished_bytes: int) -> Case:
    """A fresh run with its artifacts on a tmpfs a third the size of a finished run's artifacts (mounted in a
    user namespace: no root needed); what it leaves is listed from inside the namespace, before the mount goes."""
    size_kib = max(512, finished_bytes // 3 // 1024)
    mount = b.work / "small-disk"
    mount.mkdir()
    artifacts = mount / "artifacts"
    script = (f"mount -t tmpfs -o size={size_kib}k tmpfs {mount} || exit 97\n"
              f"{' '.join(CLI)} run {b.config} --no-progress --set artifacts_dir={artifacts}\n"
              "rc=$?\n"
              f"find {artifacts} -mindepth 2 -maxdepth 2 -name '.*' -printf '@@left %P\\n'\n"
              f"find {artifacts} -mindepth 3 -maxdepth 3 -name manifest.json -printf '@@finished %P\\n'\n"
              "exit $rc\n")
    if shutil.which("unshare") is None:
        return Case("3 disk full", "artifacts on a small tmpfs", "one ftflow: line", "unshare is not installed",
                    "SKIP")
    result = b.command([], "full-disk", prefix=["unshare", "-Urm", "sh", "-c", script])
    if result.returncode == 97:
        return Case("3 disk full", "artifacts on a small tmpfs in a user namespace", "one ftflow: line",
                    "could not mount a tmpfs without root here: " + shorten(result.output), "SKIP")
    shown = "\n".join(line for line in result.output.splitlines() if not line.startswith("@@"))
    ok, observed = one_line_error(Result(result.argv, result.returncode, shown, result.seconds), 2)
    left = re.findall(r"^@@left (.+)$", result.output, flags=re.M)
    finished = re.findall(r"^@@finished (.+)/manifest.json$", result.output, flags=re.M)
    unfinished = [name for name in left if ".partial" in name]
    named = f"no space is left on the device of {artifacts}" in shown
    return Case(
        "3 disk full",
        f"a fresh `ftflow run` with artifacts_dir on a {size_kib} KiB tmpfs (a third of the finished run's "
        "artifacts; `unshare -Urm`, no root)",
        "exit 2, one `ftflow:` line naming the directory and the space, no traceback; no unfinished output left, "
        "finished stages kept",
        f"{observed}; {len(finished)} finished stage run(s) kept, {len(unfinished)} unfinished output(s) left"
        + (f" {unfinished}" if unfinished else ""),
        "PASS" if ok and named and not unfinished else "FAIL")


def hub_typo_case(b: Battery) -> Case:
    import yaml

    folder = b.work / "typo"
    folder.mkdir()
    (folder / "train.txt").write_text("a sentence\nanother sentence\n")
    (folder / "test.txt").write_text("a sentence\n")
    config = folder / "typo.yaml"
    config.write_text(yaml.safe_dump({"data": {"train_file": "train.txt", "test_file": "test.txt"},
                                      "augment": {"enabled": False}, "ablation": {"enabled": False},
                                      "models": [{"name": "qwen", "path": "Qwen/Qwen2.5-0.5BB", "family": "qwen"}]}))
    env = dict(b.env, HF_HUB_CACHE=str(folder / "hf-cache"))
    validated = b.command(["validate", str(config)], "hub-typo-validate", env=env)
    run = b.command(["run", str(config), "--no-progress"], "hub-typo-run", env=env)
    ok, observed = one_line_error(run, 2)
    says = all(w in run.output for w in ("Qwen/Qwen2.5-0.5BB", "HF_HUB_OFFLINE", "did you mean Qwen/Qwen2.5-0.5B"))
    return Case(
        "2 hub id typo, offline",
        "`Qwen/Qwen2.5-0.5BB` in models, HF_HUB_OFFLINE=1, an empty HF cache: `ftflow validate`, then `ftflow run`",
        "validate: exit 0 (offline only the id's form is checked); run: exit 2 in seconds, one `ftflow:` line "
        "naming the model, the cache it looked in, HF_HUB_OFFLINE and the close id",
        f"validate exit {validated.returncode}; run {observed}",
        "PASS" if ok and says and validated.returncode == 0 and run.seconds < 60 else "FAIL")


def validate_cases(b: Battery) -> list[Case]:
    import yaml

    folder = b.work / "validate"
    folder.mkdir()
    base = yaml.safe_load(b.config.read_text())
    for name in ("train.txt", "test.txt"):
        shutil.copy(b.project / name, folder / name) if (b.project / name).exists() else None
    if "train_file" not in base["data"]:  # the demo's generated data: files for the examples that need them
        from tests.flows.micro import write_data

        write_data(folder)
        base["data"] = {"train_file": "train.txt", "test_file": "test.txt"}
    cases = []

    def config(name: str, raw: dict) -> Path:
        path = folder / name
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    widths = yaml.safe_load(yaml.safe_dump(base))
    widths["zoo"]["families"][0]["student"].update(hidden_size=65, num_heads=2)
    widths["zoo"]["corpus_file"] = "no-such-corpus.txt"
    both = b.command(["validate", str(config("widths-and-corpus.yaml", widths))], "validate-widths-and-corpus")
    ok, observed = one_line_error(both, 2)
    found = ("hidden_size 65 is not divisible" in both.output, "no-such-corpus.txt" in both.output)
    cases.append(Case("6 validate: bad zoo widths + missing corpus file",
                      "one config with a student's hidden_size 65 over 2 heads and zoo.corpus_file missing",
                      "exit 2, both problems in one pass",
                      observed, "PASS" if ok and all(found) else "FAIL"))

    typo = yaml.safe_load(yaml.safe_dump(base))
    typo["qlroa"] = typo.pop("qlora", {"enabled": False})
    result = b.command(["validate", str(config("qlroa.yaml", typo))], "validate-qlroa")
    ok, observed = one_line_error(result, 2)
    cases.append(Case("6 validate: section `qlroa`", "`qlroa:` instead of `qlora:`",
                      "exit 2, one message with \"did you mean 'qlora'\"", observed,
                      "PASS" if ok and re.search(r"did you mean .?qlora", result.output) else "FAIL"))

    result = b.command(["validate", str(folder)], "validate-directory")
    ok, observed = one_line_error(result, 2)
    cases.append(Case("6 validate: a directory as config", "`ftflow validate DIR`",
                      "exit 2, one message saying it is a directory (not \"does not exist\")", observed,
                      "PASS" if ok and "directory" in result.output and "does not exist" not in result.output
                      else "FAIL"))

    good = config("good.yaml", base)
    result = b.command(["run", str(good), "--no-progress", "--set", "nosuch.key=1"], "set-nosuch-key")
    ok, observed = one_line_error(result, 2)
    cases.append(Case("6 `--set nosuch.key=1`", "`ftflow run CONFIG --set nosuch.key=1`",
                      "exit 2, one message blaming the `--set`, not the YAML file", observed,
                      "PASS" if ok and "--set" in result.output and "nosuch" in result.output else "FAIL"))

    negative = yaml.safe_load(yaml.safe_dump(base))
    negative["lora"]["learning_rate"] = -0.001
    result = b.command(["validate", str(config("negative-lr.yaml", negative))], "validate-negative-lr")
    ok, observed = one_line_error(result, 2)
    cases.append(Case("6 validate: negative learning rate", "lora.learning_rate: -0.001",
                      "exit 2, one message on learning_rate, without \"Tuple should have at least 1 item\"",
                      observed, "PASS" if ok and "learning_rate" in result.output and "Tuple should" not in
                      result.output else "FAIL"))
    return cases


def bad_input_cases(b: Battery) -> list[Case]:
    import yaml

    folder = b.work / "bad"
    folder.mkdir()
    base = yaml.safe_load(b.config.read_text())
    lines = [f'{{"text": "sentence number {i} of the training file"}}' for i in range(20)]
    lines[6] = '{"text": "an unclosed line'
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[:5]) + "\n")
    base["data"] = {"train_file": "train.jsonl", "test_file": "test.jsonl"}
    data_config = folder / "bad-data.yaml"
    data_config.write_text(yaml.safe_dump(base))
    result = b.command(["run", str(data_config), "--no-progress"], "bad-data")
    ok, observed = one_line_error(result, 2)
    cases = [Case("clean: bad data", "`ftflow run` on a JSONL train file whose line 7 is not valid JSON",
                  "exit 2, one `ftflow:` line naming the file and line", observed,
                  "PASS" if ok and "train.jsonl" in result.output and "line 7" in result.output else "FAIL")]
    bad = yaml.safe_load(b.config.read_text())
    bad["seed"] = "nope"
    config = folder / "bad-config.yaml"
    config.write_text(yaml.safe_dump(bad))
    for name in ("train.txt", "test.txt"):
        if (b.project / name).exists():
            shutil.copy(b.project / name, folder / name)
    result = b.command(["run", str(config), "--no-progress"], "bad-config")
    ok, observed = one_line_error(result, 2)
    cases.append(Case("clean: bad config", "`ftflow run` on a config with `seed: nope`",
                      "exit 2, one `ftflow:` line naming the field", observed,
                      "PASS" if ok and "seed" in result.output else "FAIL"))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the flow tests' micro config instead of the demo")
    parser.add_argument("--out", type=Path, help="folder for the table and every command's output")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftflow-battery-"))
    out = (args.out or work.parent / f"battery-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    battery = Battery(work, out, args.quick)
    started = time.monotonic()
    try:
        cases = run_battery(battery)
    finally:
        for pid in battery.processes_left(settle_s=0):  # only if a case left them: processes this battery started
            os.kill(pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = markdown_table(cases)
    what = "the micro config (--quick)" if args.quick else "configs/demo.yaml"
    summary = (f"{sum(c.verdict == 'PASS' for c in cases)} of {len(cases)} cases pass on {what} "
               f"({(time.monotonic() - started) / 60:.1f} minutes)")
    print(f"\n{table}\n\n{summary}\ncommand outputs: {out}" + (f"\nkept: {work}" if args.keep else ""))
    (out / "battery.md").write_text(f"{table}\n\n{summary}\n", encoding="utf-8")
    return 0 if all(c.verdict != "FAIL" for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
