"""bench/reliability_battery.py: its table and the verdicts it reads from command outputs (no run)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT))

from bench.reliability_battery import (  # noqa: E402
    Case, Result, computed, leaderboard_of, markdown_table, one_line_error, report_path_of, task_states,
)


def _result(output: str, returncode: int) -> Result:
    return Result(["ftflow", "run"], returncode, output, 1.25)


def test_the_table_has_one_row_per_case_on_one_line_with_pipes_escaped():
    table = markdown_table([Case("1 copy", "cp -r a b", "all cached", "status:\n  3 | 3 cached", "PASS"),
                            Case("2 typo", "run", "exit 2", "exit 1", "FAIL")])
    assert table.splitlines() == [
        "| case | what was done | expected | observed | verdict |",
        "|---|---|---|---|---|",
        "| 1 copy | cp -r a b | all cached | status: 3 \\| 3 cached | PASS |",
        "| 2 typo | run | exit 2 | exit 1 | FAIL |",
    ]


def test_a_user_error_is_one_ftflow_message_that_ends_the_output_without_traceback():
    listed = ("ftflow: Prefect API of this run: http://127.0.0.1:1/api\n"
              "ftflow: c.yaml has 2 problem(s):\n  - zoo: widths\n  - zoo.corpus_file: missing\n")
    ok, observed = one_line_error(_result(listed, 2), 2)
    assert ok and observed == "exit 2, 1.2 s: ftflow: c.yaml has 2 problem(s): / - zoo: widths / - zoo.corpus_file: missing"
    # The wrong exit status, a traceback, output after the message, or no message at all: each fails.
    assert not one_line_error(_result(listed, 1), 2)[0]
    traceback = "Traceback (most recent call last):\n  File x\nOSError: [Errno 28]\nftflow: no space\n"
    ok, observed = one_line_error(_result(traceback, 2), 2)
    assert not ok and ", a traceback" in observed
    assert not one_line_error(_result("ftflow: interrupted by SIGTERM\nhttpx.ConnectError: refused\n", 143), 143)[0]
    assert one_line_error(_result("raw error\n", 2), 2) == (False, "exit 2, 1.2 s: (no ftflow: line)")
    # validate's count line after the message: the message is what is shown.
    counted = "ftflow: c.yaml has 1 problem(s):\n  - seed: not an integer\nftflow: 1 of 1 config(s) have problems\n"
    assert one_line_error(_result(counted, 2), 2) == (True, "exit 2, 1.2 s: ftflow: c.yaml has 1 problem(s): / - seed: "
                                                            "not an integer / ftflow: 1 of 1 config(s) have problems")


def test_task_states_and_what_a_run_computed():
    output = "\n".join([
        "16:01:02.123 | INFO    | Task run 'prepare_data-1a2' - Finished in state Cached(type=COMPLETED)",
        "16:01:03.000 | INFO    | Task run 'lora[granite-teacher|r2,a16,d0.05,lr0.001]' - Finished in state "
        "Completed()",
        "16:01:04.000 | INFO    | Task run 'distill[granite-student|top2,T1,a0.5,lr5e-05]' - Finished in state "
        "Failed('x')",
        "16:01:05.000 | INFO    | Task run 'publish-9f0' - Finished in state Completed()",
    ])
    assert task_states(output) == {"prepare_data-1a2": ["Cached"], "lora[granite-teacher|r2,a16,d0.05,lr0.001]":
                                   ["Completed"], "distill[granite-student|top2,T1,a0.5,lr5e-05]": ["Failed"],
                                   "publish-9f0": ["Completed"]}
    assert computed(output) == {"lora[granite-teacher|r2,a16,d0.05,lr0.001]",
                                "distill[granite-student|top2,T1,a0.5,lr5e-05]"}


def test_the_leaderboard_and_report_path_are_read_from_a_finished_runs_output():
    output = ("Recommended: x\n\n| model | figure |\n|---|---|\n| a | 1 |\n\n"
              "| rank | model | kind | test PPL |\n|---|---|---|---|\n| 1 | a | lora | 4.1 |\n\n"
              "| model | training set |\n|---|---|\n| c | x |\n"
              "report: /tmp/a/evaluate/k/report.md\nartifacts: /tmp/a\n")
    assert leaderboard_of(output) == "| rank | model | kind | test PPL |\n|---|---|---|---|\n| 1 | a | lora | 4.1 |"
    assert report_path_of(output) == Path("/tmp/a/evaluate/k/report.md")
    assert leaderboard_of("no table") == "" and report_path_of("no report") is None
