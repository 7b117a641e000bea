"""Tests of ftflow/plan/."""
