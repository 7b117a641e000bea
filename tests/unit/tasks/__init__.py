"""Tests of tasks/: the stage runner's output integrity and the stage locks."""
