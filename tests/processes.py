"""Finding the processes a run started, by a marker in their environment (tests and bench/reliability_battery.py)."""

from __future__ import annotations

from pathlib import Path

MARKER = "FTFLOW_TEST_RUN_MARKER"


def marked_processes(marker: str, variable: str = MARKER) -> dict[int, str]:
    """{pid: command line} of every live process whose environment carries ``variable=marker`` (inherited by all
    the processes a run starts, whatever they re-parent to)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if f"{variable}={marker}".encode() in environ and stat[stat.rindex(")") + 2] != "Z":
            found[int(entry.name)] = command
    return found
