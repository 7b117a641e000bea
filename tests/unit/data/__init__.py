"""Tests of ftflow/data/."""
