"""Prefect flows that wire the tasks of ``tasks/`` into pipelines."""

import os

# Logs of ftflow's core modules show under each task run in the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ftflow")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
"""The config a flow or ``ftflow run`` uses when given none: the offline demo."""
