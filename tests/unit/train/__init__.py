"""Tests of ftflow/train/."""
