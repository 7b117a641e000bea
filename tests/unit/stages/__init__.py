"""Tests of ftflow/stages/."""
