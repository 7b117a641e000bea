"""Stages without Prefect: content cache keys, each stage's call, and what a run would do (status)."""
