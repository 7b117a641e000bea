"""Tests of ftflow/models/."""
