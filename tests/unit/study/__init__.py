"""Tests of ftflow/study/."""
