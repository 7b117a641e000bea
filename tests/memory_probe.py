"""Peak memory of a piece of code on a CPU, measured in a fresh Python process (as bench/memory_accuracy.py does).

A test names a module-level function (``"tests.unit.test_x:_probe"``) taking a :class:`Meter` and keyword
arguments (JSON values): it builds what must exist before the measurement, calls ``meter.start()``, runs the
code measured and returns a dict (``meter.peak()`` among its values). The process is a new interpreter, not a
fork of the test process: its resident set is its own and it inherits no OpenMP thread pool. glibc serves every
block over 64 KiB with ``mmap`` (freed tensors leave the resident set at once) and MKL keeps no buffer cache.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Meter:
    """Growth of this process's resident set: ``VmHWM`` since :meth:`start` above ``VmRSS`` at it."""

    def __init__(self) -> None:
        self.base = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self) -> None:
        gc.collect()
        _libc().malloc_trim(0)
        self.base = self._status("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident set

    def peak(self) -> int:
        return self._status("VmHWM") - self.base


def _libc():
    return ctypes.CDLL("libc.so.6")


def _child(target: str, kwargs: dict) -> dict:
    libc = _libc()
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(Meter(), **kwargs)


def measure(target: str, timeout: int = 600, **kwargs) -> dict:
    """Run ``target`` ("module:function") in a new Python process; return the dict it returned."""
    code = ("import json, sys; from tests.memory_probe import _child; "
            "print(json.dumps(_child(sys.argv[1], json.loads(sys.argv[2]))))")
    env = {**os.environ, "MKL_DISABLE_FAST_MM": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, target, json.dumps(kwargs)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{target} failed in its process:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
