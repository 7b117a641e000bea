"""How long a no-op rerun of the demo takes next to its cold run.

Both runs go through the same Prefect server in one process, into a fresh
artifacts directory, so the ratio measures ftflow's own cost of finding that
every stage is Cached (hashing inputs, reading manifests), not the server's
start-up. With ``--cli`` both runs are full ``ftflow run`` commands instead:
the no-op one finds every stage cached before Prefect starts (``ftflow status``'s
check) and prints the results from disk; with ``--cli --record`` it is a recorded
Prefect run, starting its own temporary server, whose start-up the ratio then includes.

    python bench/rerun_overhead.py [--config configs/demo.yaml] [--cli [--record]]

Target: the no-op rerun takes under 5% of the cold run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET = 0.05


def timed_in_process(config: Path, artifacts: Path) -> tuple[float, float]:
    from flows.pipeline import pipeline

    times = []
    for _ in range(2):
        start = time.perf_counter()
        state = pipeline(config_path=str(config), overrides={"artifacts_dir": str(artifacts)}, progress=False,
                         return_state=True)
        times.append(time.perf_counter() - start)
        if not state.is_completed():
            raise SystemExit(f"pipeline failed: {state.message}")
    return times[0], times[1]


def timed_cli(config: Path, artifacts: Path, record: bool = False) -> tuple[float, float]:
    times = []
    for attempt in range(2):
        start = time.perf_counter()
        subprocess.run(["ftflow", "run", str(config), "--no-progress", "--set", f"artifacts_dir={artifacts}"]
                       + (["--record"] if record and attempt else []), check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--cli", action="store_true", help="time two `ftflow run` commands instead")
    parser.add_argument("--record", action="store_true", help="with --cli: the no-op run is a recorded Prefect run")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-") as tmp:
        artifacts = Path(tmp) / "artifacts"
        if args.cli:
            cold, rerun = timed_cli(args.config.resolve(), artifacts, record=args.record)
        else:
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=120):
                cold, rerun = timed_in_process(args.config.resolve(), artifacts)
    ratio = rerun / cold
    mode = ("ftflow run commands, the no-op one " + ("recorded (server start-up included)" if args.record else
                                                     "read from disk") if args.cli else
            "in one process, one Prefect server")
    print(f"config: {args.config}  ({mode})")
    print(f"cold run:      {cold:8.1f} s")
    print(f"no-op rerun:   {rerun:8.1f} s")
    print(f"rerun / cold:  {ratio:8.2%}   target < {TARGET:.0%}: {'PASS' if ratio < TARGET else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
