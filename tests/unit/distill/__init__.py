"""Tests of ftflow/distill/."""
