"""Prefect flows that wire the tasks of ``tasks/`` into pipelines."""

import os

# Logs of ftflow's core modules show under each task run in the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ftflow")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
